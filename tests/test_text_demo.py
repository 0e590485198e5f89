"""`minidiff demo` on a text-to-image model: a tiny random text pipeline saved to a folder and a tiny
random scenes classifier; the table's shares are checked against SceneMetric.follows by hand."""
import re

import pytest
import torch
from conftest import randomize, randomize_near_unit_norms
from PIL import Image
from test_text_cli import TEXT, UNET, VAE  # the tiny text model's configs

import minidiff
from minidiff.autoencoder import Autoencoder
from minidiff.cli import main
from minidiff.images import _font, _text_height
from minidiff.metrics import psnr
from minidiff.pipeline import Pipeline
from minidiff.scenes import COLOUR_NAMES, HELD_OUT, PLACES, RELATIONS, SHAPES, parse_caption
from minidiff.scenes_metric import SceneClassifier, SceneClassifierConfig, SceneMetric, demo_prompts, \
    load_scene_metric
from minidiff.schedules import SchedulerConfig
from minidiff.text import CLIPTextEncoder, CLIPTokenizer
from minidiff.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")

FOLLOWING = ["colour", "shape", "place", "relation", "all"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(model, classifier): a tiny text model whose config.json names a default guidance of 3, and a
    tiny random scenes classifier."""
    root = tmp_path_factory.mktemp("textdemo")
    pipe = Pipeline(randomize_near_unit_norms(UNet(UNET), seed=1), SchedulerConfig(),
                    autoencoder=randomize(Autoencoder(VAE), seed=2),
                    text_encoder=randomize_near_unit_norms(CLIPTextEncoder(TEXT), seed=3),
                    tokenizer=CLIPTokenizer.default(), meta={"guidance_scale": 3.0})
    pipe.save(root / "model")
    classifier = randomize_near_unit_norms(SceneClassifier(SceneClassifierConfig(width=8, feature_dim=8)), seed=4)
    SceneMetric(classifier, torch.zeros(8), torch.eye(8)).save(root / "classifier")
    return root / "model", root / "classifier"


def recorded_generate(monkeypatch) -> list:
    """Every image batch Pipeline.generate returns from now on."""
    seen = []
    generate = Pipeline.generate

    def recording(self, **kwargs):
        seen.append(generate(self, **kwargs))
        return seen[-1]

    monkeypatch.setattr(Pipeline, "generate", recording)
    return seen


def parse_table(text: str) -> dict:
    """{run name: {column: cell}} of the printed table (cells apart by two or more spaces)."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("run "))
    header = re.split(r"\s{2,}", lines[at].strip())
    rows = {}
    for line in lines[at + 2:]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != len(header):
            break
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def shares_by_hand(metric, images, prompts) -> dict:
    """demo_prompts holds 10 single objects, then 6 pairs: place is scored over the first, relation
    over the second, the rest over all 16."""
    follows = metric.follows(images, prompts)
    assert [("left of" in p or "right of" in p or "above" in p or "below" in p) for p in prompts] == [False] * 10 + [True] * 6
    return {"colour": follows["colour"].float().mean(), "shape": follows["shape"].float().mean(),
            "place": follows["place"][:10].float().mean(), "relation": follows["relation"][10:].float().mean(),
            "all": follows["all"].float().mean()}


def test_demo_prompts_cover_every_seen_pair_place_and_relation():
    prompts = demo_prompts()
    parsed = [parse_caption(p) for p in prompts]
    singles, pairs = parsed[:10], parsed[10:]
    assert len(prompts) == 16 and all(p["relation"] is None for p in singles) and all(p["relation"] for p in pairs)
    seen = {(c, s) for c in COLOUR_NAMES for s in SHAPES} - set(HELD_OUT)
    assert sorted((p["objects"][0]["colour"], p["objects"][0]["shape"]) for p in singles) == sorted(seen)
    assert {p["place"] for p in singles} == set(PLACES)
    assert {p["relation"] for p in pairs} == set(RELATIONS)
    assert not {(o["colour"], o["shape"]) for p in pairs for o in p["objects"]} & set(HELD_OUT)
    assert demo_prompts() == prompts  # fixed


@pytest.mark.parametrize("guidance", [None, 1.0])
def test_text_demo_table_follows_the_scene_metric_and_caches_like_generate(folders, tmp_path, capsys, monkeypatch,
                                                                           guidance):
    model, classifier = folders
    seen = recorded_generate(monkeypatch)
    out = tmp_path / "demo"
    extra = [] if guidance is None else ["--guidance", str(guidance)]
    assert main(["demo", "--model", str(model), "--classifier", str(classifier), "--steps", "8", "--interval", "4",
                 "--schedule", "nonuniform", "--repeats", "1", "--out", str(out), "--scale", "1", "--threads", "1",
                 *extra]) == 0
    text = capsys.readouterr().out
    rows = parse_table(text)
    assert list(rows) == ["uncached", "N=4 nonuniform b=0"]
    assert ("guidance 3" if guidance is None else "no guidance") in text

    prompts = demo_prompts()
    pipe = minidiff.load(model)
    kw = dict(prompt=prompts, batch_size=16, steps=8, seed=0, progress=False, guidance_scale=guidance)
    want_uncached = pipe.generate(**kw)
    want_cached = pipe.generate(**kw, cache_interval=4, cache_schedule="nonuniform")
    assert len(seen) == 3 + 2  # warm-up, uncached, cached; then the two above
    assert torch.equal(seen[1], want_uncached) and torch.equal(seen[2], want_cached)
    assert not torch.equal(want_cached, want_uncached)  # the caching did something

    metric = load_scene_metric(classifier)
    for name, images in (("uncached", want_uncached), ("N=4 nonuniform b=0", want_cached)):
        shares = shares_by_hand(metric, images, prompts)
        assert {k: rows[name][k] for k in FOLLOWING} == {k: f"{float(v):.3f}" for k, v in shares.items()}
    assert rows["N=4 nonuniform b=0"]["PSNR dB"] == f"{psnr(want_cached, want_uncached):.1f}"
    assert rows["uncached"]["full"] == "8" and rows["uncached"]["shallow"] == "0"
    # the check can fail: the shares are not all 0 or 1, and the cached run's differ from the uncached run's
    assert {rows["uncached"][k] for k in FOLLOWING} - {"0.000", "1.000"}
    assert [rows["uncached"][k] for k in FOLLOWING] != [rows["N=4 nonuniform b=0"][k] for k in FOLLOWING]

    # 16 px tiles at scale 1 in a 4 x 4 grid, each with three caption lines of the 10 px font under it
    line = _text_height(_font(10))
    with Image.open(out / "demo_uncached.png") as grid, Image.open(out / "demo_side_by_side.png") as both:
        assert grid.size == (4 * (16 + 2) + 2, 4 * (16 + 3 * line + 2 + 2) + 2)
        assert both.width == 2 * grid.width + 3 * 12 and both.height > grid.height
    assert "uncached | cached N=4, branch 0, nonuniform schedule" in text


def test_classifier_none_drops_the_following_columns(folders, tmp_path, capsys):
    model, _ = folders
    assert main(["demo", "--model", str(model), "--classifier", "none", "--steps", "2", "--repeats", "1",
                 "--out", str(tmp_path / "d"), "--scale", "1", "--threads", "1"]) == 0
    rows = parse_table(capsys.readouterr().out)
    assert list(rows["uncached"]) == ["run", "steps", "full", "shallow", "wall s", "speedup", "MAC bound", "PSNR dB"]
    assert rows["N=5 uniform b=0"]["PSNR dB"] != "-" and rows["uncached"]["PSNR dB"] == "-"


@pytest.mark.parametrize("extra, words", [
    (["--per-class", "2"], "--per-class does not apply to a text model"),
    (["--classifier", "CLS_DIGITS"], "not a scenes classifier"),
])
def test_options_that_do_not_fit_a_text_model_are_refused_in_one_line(folders, tmp_path, capsys, extra, words):
    model, _ = folders
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "config.json").write_text('{"format": "minidiff-toy-classifier"}')
    extra = [str(tmp_path / "digits") if e == "CLS_DIGITS" else e for e in extra]
    assert main(["demo", "--model", str(model), "--steps", "2", "--out", str(tmp_path / "d"), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "d").exists()
