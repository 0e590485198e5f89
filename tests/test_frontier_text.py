"""The composed frontier on a text model: planner.measure's rows against generate(), psnr and the
scenes metric run by hand, `minidiff plan` on a tiny random text model (at its stored default
guidance, with the scenes classifier beside it), and benchmarks/composed_frontier.py's verdicts on
hand-made rows."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import randomize, randomize_near_unit_norms, tiny_pipeline
from test_text_cli import TEXT, UNET, VAE  # the tiny text model's configs

import minidiff
from minidiff import planner
from minidiff.autoencoder import Autoencoder
from minidiff.cli import main
from minidiff.cli.plan import FULL_COUNT, QUICK, SMALL, SMALL_COUNT
from minidiff.metrics import psnr
from minidiff.pipeline import Pipeline
from minidiff.planner import Config, Grid
from minidiff.scenes_metric import SceneClassifier, SceneClassifierConfig, SceneMetric, demo_prompts, \
    load_scene_metric
from minidiff.schedules import SchedulerConfig
from minidiff.text import CLIPTextEncoder, CLIPTokenizer
from minidiff.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")

GUIDANCE = 3.0  # the tiny model's stored default
STEPS = 4
CONFIGS = [Config(STEPS), Config(2), Config(STEPS, "uniform", 2, 0, 0), Config(3, "uniform", 2, 0, 2),
           Config(STEPS, "adaptive", 1, 0, 2, 0.7)]


def load_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "composed_frontier.py"
    spec = importlib.util.spec_from_file_location("composed_frontier", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(model, classifier): a tiny random text model trained on "scenes" (so scenes-classifier beside
    it is its default classifier) with a stored guidance of 3, and a tiny random scenes classifier."""
    root = tmp_path_factory.mktemp("frontier_text")
    pipe = Pipeline(randomize_near_unit_norms(UNet(UNET), seed=1), SchedulerConfig(),
                    autoencoder=randomize(Autoencoder(VAE), seed=2),
                    text_encoder=randomize_near_unit_norms(CLIPTextEncoder(TEXT), seed=3),
                    tokenizer=CLIPTokenizer.default(),
                    meta={"guidance_scale": GUIDANCE, "training": {"config": {"dataset": "data/scenes"}}})
    pipe.save(root / "model")
    classifier = randomize_near_unit_norms(SceneClassifier(SceneClassifierConfig(width=8, feature_dim=8)), seed=5)
    SceneMetric(classifier, torch.zeros(8), torch.eye(8)).save(root / "scenes-classifier")
    return root / "model", root / "scenes-classifier"


def by_hand(pipe, metric, config, seeds):
    """What one row should hold, from generate(), psnr and SceneMetric.follows / toy_fid run directly:
    demo_prompts is 10 single objects then 6 pairs, repeated per seed."""
    prompts = demo_prompts() * len(seeds)
    noise = torch.cat([pipe.initial_noise(16, generator=torch.Generator().manual_seed(s)) for s in seeds])
    common = dict(noise=noise, prompt=prompts, guidance_scale=GUIDANCE, batch_size=len(prompts),
                  seed=seeds[0], progress=False)
    reference = pipe.generate(steps=STEPS, sampler="ddim", **common)
    images = pipe.generate(**config.kwargs("ddim"), **common)
    follows = metric.follows(images, prompts)
    single = torch.tensor(([True] * 10 + [False] * 6) * len(seeds))
    return images, {"psnr": min(psnr(images, reference, per_image=True), planner.PSNR_CAP),
                    "colour": float(follows["colour"].float().mean()), "shape": float(follows["shape"].float().mean()),
                    "place": float(follows["place"][single].float().mean()),
                    "relation": float(follows["relation"][~single].float().mean()),
                    "all": float(follows["all"].float().mean()), "toy_fid": metric.toy_fid(images),
                    "count": len(prompts)}


def test_measure_on_a_text_model_equals_generate_psnr_and_the_scene_metric_by_hand(folders):
    model, classifier = folders
    pipe, metric = minidiff.load(model), load_scene_metric(classifier)
    seeds = (1, 2)
    rows = planner.measure(pipe, CONFIGS, reference_steps=STEPS, seeds=seeds, metric=metric)  # guidance: default
    assert [Config.from_dict(r) for r in rows] == CONFIGS
    for config, row in zip(CONFIGS, rows):
        images, want = by_hand(pipe, metric, config, seeds)
        assert {k: row[k] for k in want} == want, config
        if config.kind != "adaptive":
            assert row["cost"] == pytest.approx(config.steps / STEPS * pipe.last_run.mac_fraction, abs=1e-12)
    assert rows[0]["psnr"] == planner.PSNR_CAP and all(r["psnr"] < planner.PSNR_CAP for r in rows[1:])
    # A text model's calibration is 16 prompts per seed and takes no class labels; prompts go with text only.
    noise, labels, prompts = planner.calibration_batch(pipe, seeds)
    assert noise.shape[0] == 32 and labels is None and prompts == demo_prompts() * 2
    with pytest.raises(ValueError, match="need a text model"):
        planner.calibration_batch(tiny_pipeline(seed=4), seeds, prompts=["a red circle"])


def test_plan_cli_on_a_text_model_writes_the_default_guidance_plan_with_quality_columns(folders, capsys):
    model, classifier = folders
    args = ["plan", "--model", str(model), "--grid", "quick", "--steps", str(STEPS), "--seeds", "1", "--threads", "1"]
    assert main(args) == 0  # no --classifier: scenes-classifier beside the model
    out = capsys.readouterr().out
    assert f"guidance {GUIDANCE:g}" in out and "x 16 prompts" in out
    data = json.loads((model / "plan.json").read_text())
    (entry,) = data["plans"]
    assert (entry["sampler"], entry["guidance_scale"], entry["steps"], entry["seeds"]) == ("ddim", GUIDANCE, STEPS, [1])
    pipe, metric = minidiff.load(model), load_scene_metric(classifier)
    configs = [Config.from_dict(r) for r in entry["rows"]]
    assert configs == planner.grid_configs(Grid(**QUICK), STEPS, pipe.denoiser.num_branches)
    again = planner.measure(pipe, configs, reference_steps=STEPS, seeds=(1,), metric=metric)
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [drop(r) for r in entry["rows"]] == [drop(r) for r in again]
    assert {"colour", "shape", "place", "all", "toy_fid"} <= set(entry["rows"][0])

    # The plan is keyed by the guidance the runs used, so the default finds it from the API too.
    chosen = planner.plan_for(model, 0.9, steps=STEPS, guidance=GUIDANCE)
    kw = dict(prompt="a red circle", steps=STEPS, seed=3, progress=False)
    within = planner.generate_within(pipe, 0.9, **kw)
    assert torch.equal(within, pipe.generate(**{**kw, **chosen}))
    assert torch.equal(within, pipe.generate(**kw, budget=0.9))
    with pytest.raises(planner.NoPlan, match="guidance 1 "):
        planner.generate_within(pipe, 0.9, guidance_scale=1.0, **kw)

    # A second run at the same (default) guidance is refused in one line; --classifier none drops the columns.
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "guidance 3 with 4 steps" in err[0] and "--overwrite" in err[0]
    assert main(args + ["--overwrite", "--classifier", "none"]) == 0
    assert "all" not in json.loads((model / "plan.json").read_text())["plans"][0]["rows"][0]


def test_the_named_grids_hold_the_counts_the_help_states():
    assert len(planner.grid_configs(Grid(), 50, num_branches=9)) == FULL_COUNT
    small = planner.grid_configs(Grid(**SMALL), 50, num_branches=9)
    assert len(small) == SMALL_COUNT and {planner.family(c, 50) for c in small} == \
        {"reference", "fewer steps", "caching", "composed"}


def row(steps, psnr_db, cost, *, kind="none", all_share=None, accuracy=None, fid=1.0, count=100, budget=None):
    r = dict(steps=steps, kind=kind, interval=3 if kind == "uniform" else 1, branch=0, forecast=2,
             budget=budget, cost=cost, psnr=psnr_db, toy_fid=fid, count=count)
    if all_share is not None:
        r.update(colour=all_share, shape=all_share, place=all_share, relation=all_share, all=all_share)
    if accuracy is not None:
        r["accuracy"] = accuracy
    return r


def test_the_verdicts_by_psnr_and_by_quality_on_hand_made_rows():
    bench = load_benchmark()
    fewer = row(10, 30.0, 0.2, all_share=0.50, fid=2.0)
    cached = row(50, 33.0, 0.2, kind="adaptive", budget=0.2, all_share=0.55, fid=1.5)
    composed = row(25, 35.0, 0.18, kind="uniform", all_share=0.80, fid=1.8)
    (b, best), = bench.family_bests([fewer, cached, composed], 50, [0.2])
    assert best["fewer steps"] is fewer and best["50-step adaptive"] is cached and best["composed fixed"] is composed
    assert bench.psnr_verdict(best) == "yes, by 2.00 dB"
    # 0.80 vs the best part's 0.55 over n=100: 2 SE = 2 sqrt(2 x 0.675 x 0.325 / 100) = 0.1325 < 0.25.
    assert bench.quality_verdict(best) == "yes: all 0.800 vs 0.550"

    close = dict(composed, all=0.60)  # 0.05 above: inside 2 SE (2 sqrt(2 x 0.575 x 0.425 / 100) = 0.1398), a tie reported with the toy FIDs
    best["composed fixed"] = close
    assert bench.quality_verdict(best) == ("tie: all 0.600 vs 0.550 (2 SE 0.140, n=100); toy FID 1.80 vs the "
                                           "parts' best 1.50")
    worse = dict(composed, psnr=32.0, all=0.30)  # below both parts by PSNR and by quality: two separate noes
    best["composed fixed"] = worse
    assert bench.psnr_verdict(best) == "**no**: 1.00 dB short"
    assert bench.quality_verdict(best) == "**no**: all 0.300 vs 0.550"
    mixed = dict(composed, psnr=32.0)  # loses by PSNR, wins by quality: the verdicts disagree, as they may
    best["composed fixed"] = mixed
    assert (bench.psnr_verdict(best), bench.quality_verdict(best)) == ("**no**: 1.00 dB short", "yes: all 0.800 vs 0.550")

    digits = {g: None for g in bench.GROUPS}
    digits.update({"fewer steps": row(10, 30.0, 0.2, accuracy=1.0, fid=1.4),
                   "composed adaptive": row(30, 31.0, 0.18, kind="adaptive", budget=0.3, accuracy=1.0, fid=1.6)})
    assert bench.quality_verdict(digits) == ("tie: accuracy 1.000 vs 1.000 (2 SE 0.000, n=100); toy FID 1.60 vs "
                                             "the parts' best 1.40")
    assert bench.quality_verdict({**digits, "composed adaptive": None}) == "no composed point fits"
    table = bench.quality_table([(0.2, best)], 50)
    assert "| 0.20 | composed fixed | 25 st 1:3 b0 f2 | 0.180 | 32.00 | 0.800 | 0.800 | 0.800 | 0.800 | 0.800 | 1.80 |" \
        in table
    assert "| 0.20 | **no**: 1.00 dB short | yes: all 0.800 vs 0.550 |" in table
