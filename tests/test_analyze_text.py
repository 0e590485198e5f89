"""`minidiff analyze similarity|depth` on a text model with several prompts in one run, on a tiny random
text-to-image pipeline saved the way the scenes model is."""
import csv

import numpy as np
import pytest
import torch
from conftest import randomize, randomize_near_unit_norms
from test_text_cli import TEXT, UNET, VAE

import minidiff
from minidiff.analysis import layer_names
from minidiff.autoencoder import Autoencoder
from minidiff.cli import main
from minidiff.pipeline import Pipeline
from minidiff.schedules import SchedulerConfig
from minidiff.text import CLIPTextEncoder, CLIPTokenizer
from minidiff.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red circle on the left", "a blue square above a yellow triangle", "a big green square"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A saved tiny text model with a default guidance of 3 (so the batch holds two rows per prompt)."""
    pipe = Pipeline(randomize_near_unit_norms(UNet(UNET), seed=1), SchedulerConfig(),
                    autoencoder=randomize(Autoencoder(VAE), seed=2),
                    text_encoder=randomize_near_unit_norms(CLIPTextEncoder(TEXT), seed=3),
                    tokenizer=CLIPTokenizer.default(), meta={"guidance_scale": 3.0})
    out = tmp_path_factory.mktemp("text") / "model"
    pipe.save(out)
    return out


def _by_hand(folder, prompts, steps):
    """Every layer's output at every step of pipe.generate with these prompts, by the recorder hook
    alone, and the step x step cosine of each, averaged over the rows by hand."""
    pipe = minidiff.load(folder)
    kept = {}
    pipe.denoiser.recorder = lambda name, h: kept.setdefault(name, []).append(h.double().flatten(1).clone())
    try:
        pipe.generate(prompt=prompts, batch_size=len(prompts), steps=steps, seed=0, progress=False)
    finally:
        pipe.denoiser.recorder = None
    out = {}
    for name, per_step in kept.items():
        rows = per_step[0].shape[0]
        sim = np.zeros((steps, steps))
        for i in range(steps):
            for j in range(steps):
                sim[i, j] = sum(float(torch.nn.functional.cosine_similarity(per_step[i][r], per_step[j][r], dim=0))
                                for r in range(rows)) / rows
        out[name] = sim
    return out, rows


def test_similarity_with_several_prompts_is_one_run_of_all_of_them(folder, tmp_path, capsys):
    steps = 4
    assert main(["analyze", "similarity", "--model", str(folder), "--prompt", *PROMPTS, "--steps", str(steps),
                 "--project", "0", "--out", str(tmp_path / "sim"), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"x {steps} steps x 3 images (6 rows: unconditional and conditional" in printed
    got = np.load(tmp_path / "sim" / "similarity.npz")
    want, rows = _by_hand(folder, PROMPTS, steps)
    assert rows == 6  # guided: [uncond; cond] for the three prompts
    assert sorted(got.files) == sorted(layer_names(minidiff.load(folder).denoiser)) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, err_msg=name)
    # the prompts differ, so their features differ: a run of the first prompt alone measures otherwise
    alone, _ = _by_hand(folder, PROMPTS[:1], steps)
    assert max(np.abs(alone[n] - want[n]).max() for n in want) > 1e-3


def test_depth_with_several_prompts_and_one_prompt_over_a_batch(folder, tmp_path):
    assert main(["analyze", "depth", "--model", str(folder), "--prompt", *PROMPTS, "--steps", "3",
                 "--out", str(tmp_path / "many"), "--threads", "1"]) == 0
    assert main(["analyze", "depth", "--model", str(folder), "--prompt", PROMPTS[0], "--batch", "2", "--steps", "3",
                 "--out", str(tmp_path / "one"), "--threads", "1"]) == 0
    many = list(csv.DictReader(open(tmp_path / "many" / "depth.csv")))
    one = list(csv.DictReader(open(tmp_path / "one" / "depth.csv")))
    assert [r["layer"] for r in many] == [r["layer"] for r in one] == layer_names(minidiff.load(folder).denoiser)
    assert any(abs(float(a["adjacent_mean"]) - float(b["adjacent_mean"])) > 1e-4 for a, b in zip(many, one))


def test_a_batch_that_does_not_match_the_prompts_is_refused_in_one_line(folder, tmp_path, capsys):
    assert main(["analyze", "depth", "--model", str(folder), "--prompt", *PROMPTS, "--batch", "2", "--steps", "3",
                 "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch 2 does not match the 3 prompts" in err[0], err
    assert not (tmp_path / "x").exists()
