"""`analyze switch` on a text model: the prompt switched at step k, scored per attribute by a scenes
classifier, the deep features' way to the new run, and the switch rerun with the cache on. Checked
against a switch driven by hand (the sampler over the raw U-Net, the prompt's tokens swapped at
call k) on a tiny random text-to-image pipeline and a tiny random scenes classifier."""
import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_near_unit_norms
from test_text_cli import TEXT, UNET, VAE

from minidiff import analysis as A
from minidiff.autoencoder import Autoencoder
from minidiff.cache import make_schedule
from minidiff.cli import main
from minidiff.metrics import psnr
from minidiff.pipeline import Pipeline
from minidiff.samplers import sample_ddim
from minidiff.scenes_metric import SceneClassifier, SceneClassifierConfig, SceneMetric, load_scene_metric
from minidiff.schedules import SchedulerConfig
from minidiff.text import CLIPTextEncoder, CLIPTokenizer
from minidiff.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")

OLD, NEW = "a red circle on the left", "a blue square above a green triangle"  # one object, then a pair
STEPS, BATCH, SEED, GUIDANCE = 6, 8, 0, 4.0
THRESHOLD = 0.92  # the mid features' cosine to the new run crosses it 0-2 steps after these switches


@pytest.fixture(scope="module")
def pipe():
    """Cross-attention scaled up so that the prompt changes the picture (PSNR ~22 dB between OLD and NEW)."""
    unet = randomize_near_unit_norms(UNet(UNET), seed=1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "attn2" in name:
                p.mul_(20)
    return Pipeline(unet, SchedulerConfig(), autoencoder=randomize_near_unit_norms(Autoencoder(VAE), seed=2),
                    text_encoder=randomize_near_unit_norms(CLIPTextEncoder(TEXT), seed=3),
                    tokenizer=CLIPTokenizer.default(), meta={"guidance_scale": GUIDANCE})


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    network = randomize_near_unit_norms(SceneClassifier(SceneClassifierConfig(width=8, feature_dim=16)), seed=5)
    out = tmp_path_factory.mktemp("scenes") / "classifier"
    SceneMetric(network, torch.zeros(16), torch.eye(16)).save(out)
    return out


@pytest.fixture(scope="module")
def metric(classifier_dir):
    return load_scene_metric(classifier_dir)


@pytest.fixture(scope="module")
def result(pipe, metric):
    return A.switch_experiment(pipe, old=OLD, new=NEW, steps=STEPS, at_steps=[1, 2, 4], batch_size=BATCH, seed=SEED,
                               layers=["mid"], classifier=metric, threshold=THRESHOLD, cache={"cache_interval": 3})


def noise(pipe):
    return pipe.initial_noise(BATCH, generator=torch.Generator().manual_seed(SEED))


def hand_switch(pipe, k):
    """The sampler over the U-Net with raw (unprojected) prompt tokens, NEW's from call k on, guided by
    hand; returns the final images and the conditional half of `mid` at every call."""
    unet = pipe.denoiser
    old, new, empty = (pipe.encode_prompt([p] * BATCH) for p in (OLD, NEW, ""))
    calls, mids = [0], []

    def eps(x, t):
        tokens = new if calls[0] >= k else old
        calls[0] += 1
        uncond, cond = unet(torch.cat([x, x]), t, torch.cat([empty, tokens])).chunk(2)
        return uncond + GUIDANCE * (cond - uncond)

    with A.recording(unet, lambda name, h: mids.append(h[-BATCH:].flatten(1).clone()) if name == "mid" else None):
        x = sample_ddim(eps, noise(pipe), pipe.scheduler, STEPS, progress=False)
    return pipe.decode(x), torch.stack(mids)


def test_the_shares_are_the_classifiers_reading_of_a_switch_driven_by_hand(pipe, metric, result):
    readings = set()
    for row in result.rows:
        k = row["switch_at"]
        images, _ = hand_switch(pipe, k)
        assert (images - result.images[k]).abs().max() < 1e-5, k
        for which, prompt in (("old", OLD), ("new", NEW)):
            follows = metric.follows(images, [prompt] * BATCH)
            for attribute in metric.attributes(prompt):
                assert row[f"{attribute}_{which}"] == float(follows[attribute].float().mean()), (k, which, attribute)
                readings.add(row[f"{attribute}_{which}"])
    assert "place_old" in row and "relation_new" in row  # OLD is one object, NEW a pair
    assert "relation_old" not in row and "place_new" not in row
    assert len(readings) >= 3  # the classifier reads these images in more than one way


def test_switching_at_the_first_call_is_the_new_prompt_and_after_the_last_the_old(pipe, result):
    calls = STEPS
    generate = dict(noise=noise(pipe), steps=STEPS, progress=False)
    assert torch.equal(result.images[0], pipe.generate(prompt=NEW, **generate))
    assert torch.equal(result.images[calls], pipe.generate(prompt=OLD, **generate))
    assert psnr(result.images[0], result.images[calls]) < 30  # the prompt matters in this model
    cached = dict(generate, cache_interval=3)
    assert torch.equal(result.cached_images[0], pipe.generate(prompt=NEW, **cached))
    assert torch.equal(result.cached_images[calls], pipe.generate(prompt=OLD, **cached))


def test_steps_to_the_new_run_follow_the_hand_recorded_features(pipe, result):
    _, new_mid = hand_switch(pipe, 0)
    counted = []
    for row in result.rows[1:-1]:
        k = row["switch_at"]
        _, mid = hand_switch(pipe, k)
        cos = F.cosine_similarity(mid.double(), new_mid.double(), dim=-1).mean(-1).tolist()  # (calls,)
        want = None
        if cos[-1] > THRESHOLD:
            want = 0
            for s in range(k, STEPS):
                if cos[s] <= THRESHOLD:
                    want = s - k + 1
        assert row["mid_to_new_steps"] == want, (k, cos)
        counted.append(want)
    assert len(set(counted)) > 1 and None not in counted
    assert A.steps_above(np.array([0.5, 0.99, 0.9, 0.97, 0.96]), 1, 0.95) == 2
    assert A.steps_above(np.array([0.99, 0.99, 0.9]), 0, 0.95) is None
    assert A.steps_above(np.array([0.5, 0.99, 0.99]), 1, 0.95) == 0


def test_with_the_cache_each_switch_step_is_marked_as_the_schedule_runs_it(pipe, metric, result):
    full = make_schedule("uniform", STEPS, 3)
    assert full == [0, 3]
    for row in result.rows:
        k = row["switch_at"]
        assert row["step_k"] == ("-" if k == STEPS else "full" if k in full else "shallow")
        assert row["psnr_cached_vs_uncached"] == psnr(result.cached_images[k], result.images[k], per_image=True)
        follows = metric.follows(result.cached_images[k], [NEW] * BATCH)
        assert row["all_new_cached"] == float(follows["all"].float().mean())
    # Branch 0's shallow path has no cross-attention in this U-Net: a switch on a shallow step reaches
    # the picture only through the next full step.
    switched = {k: A.switch_experiment(pipe, old=OLD, new=NEW, steps=STEPS, at_steps=[k], batch_size=2, seed=SEED,
                                       layers=["mid"], cache={"cache_interval": 3}).cached_images[k] for k in (1, 3)}
    assert torch.equal(switched[1], switched[3])


def test_last_followed_and_its_summary():
    rows = [{"switch_at": k, "colour_new": share, "colour_new_cached": cached}
            for k, share, cached in ((0, 1.0, 1.0), (2, 0.5, 0.25), (4, 0.75, 0.0), (6, 0.0, 0.0), (8, 0.0, 0.0))]
    assert A.last_followed(rows, "colour_new", 8) == 4
    assert A.last_followed(rows, "colour_new_cached", 8) == 0
    assert A.last_followed(rows, "colour_new", 8, share=0.8) == 0
    assert A.last_followed([dict(r, colour_new=0.0) for r in rows], "colour_new", 8) is None
    line, = A.format_decided(rows, 8)
    assert line.startswith("colour:") and line.endswith("of 8 calls: 4 (not 6); cached: 0 (not 2)")


def test_the_cli_writes_the_table_and_the_summary(pipe, classifier_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model = tmp_path / "model"
    pipe.save(model)
    out = tmp_path / "switch"
    assert main(["analyze", "switch", "--model", str(model), "--from", OLD, "--to", NEW, "--steps", str(STEPS),
                 "--batch", "2", "--at", "0", "2", "--layers", "mid", "--classifier", str(classifier_dir),
                 "--cache-interval", "3", "--out", str(out), "--threads", "1"]) == 0
    rows = list(csv.DictReader((out / "switch.csv").open()))
    assert [r["switch_at"] for r in rows] == ["0", "2", "6"] and [r["step_k"] for r in rows] == ["full", "shallow", "-"]
    assert {"colour_old", "place_old", "relation_new", "all_new_cached", "mid_to_new_steps"} <= set(rows[0])
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == ["colour", "shape", "relation", "all"]
    numeric = [{"switch_at": int(r["switch_at"]), "all_new": float(r["all_new"])} for r in rows]
    k = A.last_followed(numeric, "all_new", STEPS)
    assert summary[-1].split("calls: ")[1].startswith("none" if k is None else str(k))
    assert (out / "switch.png").exists() and "colour:" in capsys.readouterr().out


@pytest.mark.parametrize("extra, words", [
    (["--from", "a purple moon"], "--from: 'a purple moon' is not a scenes caption"),
    (["--cache-interval", "0"], "--cache-interval must be an int in [1, 10000]"),
    (["--cache-threshold", "0.1"], "--cache-threshold=0.1 does not apply"),
])
def test_bad_switch_arguments_are_refused_in_one_line(pipe, classifier_dir, tmp_path, capsys, extra, words):
    model = tmp_path / "model"
    pipe.save(model)
    args = ["analyze", "switch", "--model", str(model), "--from", OLD, "--to", NEW, "--steps", "2", "--batch", "1",
            "--classifier", str(classifier_dir), "--out", str(tmp_path / "out"), *extra]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "out").exists()
