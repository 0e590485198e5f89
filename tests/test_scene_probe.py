"""Attribute probes on a text model (minidiff.scene_probe), on a tiny random text-to-image pipeline:
the probe itself on features of known content, the features it reads, the rows and their controls,
the trajectory states, the summary's reading, and the CLI."""
import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize, randomize_near_unit_norms
from test_text_cli import TEXT, UNET, VAE  # the tiny text model's configs

import minidiff
from minidiff.autoencoder import Autoencoder
from minidiff.cli import main
from minidiff.pipeline import Pipeline
from minidiff.probe import CONTROL, split_mask
from minidiff.scene_probe import (ATTRIBUTES, COLUMNS, encode_scenes, first_readable, grid_features,
                                  probe_attributes, probe_real_scenes, real_scenes, summarize, SceneProbeResult,
                                  trajectory_states)
from minidiff.scenes import HEADS, IGNORE, scene_batch, targets
from minidiff.schedules import NoiseSchedule, SchedulerConfig, make_timesteps
from minidiff.text import CLIPTextEncoder, CLIPTokenizer
from minidiff.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(randomize_near_unit_norms(UNet(UNET), seed=1), SchedulerConfig(),
                    autoencoder=randomize(Autoencoder(VAE), seed=2),
                    text_encoder=randomize_near_unit_norms(CLIPTextEncoder(TEXT), seed=3),
                    tokenizer=CLIPTokenizer.default())


@pytest.fixture(scope="module")
def folder(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("text") / "model"
    pipe.save(out)
    return out


def _onehots(labels: dict) -> torch.Tensor:
    """(N, 25): every head's one-hot, a zero row where the head does not apply."""
    return torch.cat([F.one_hot(labels[h].clamp_min(0), len(c)) * (labels[h] != IGNORE)[:, None]
                      for h, c in HEADS.items()], 1).float()


def test_a_linear_function_of_the_labels_is_read_exactly_and_random_features_at_chance():
    _, scenes = scene_batch(7, 0, 600)
    labels = targets(scenes)
    # an invertible linear function of all the labels (25 one-hot columns -> 32 features)
    g = torch.Generator().manual_seed(0)
    signal = _onehots(labels) @ torch.randn(25, 32, generator=g)
    train = split_mask(600, 3)
    rows = probe_attributes({"signal": signal, "random": torch.randn(600, 32, generator=g)}, labels, train,
                            source="real", timestep=0, step="")
    assert [(r["attribute"], r["layer"]) for r in rows] == [(a, f) for a in ATTRIBUTES for f in ("signal", "random")]
    for r in rows:
        y = labels[ATTRIBUTES[r["attribute"]]]
        keep = y != IGNORE
        assert (r["n_train"], r["n_test"]) == (int((keep & train).sum()), int((keep & ~train).sum()))
        majority = torch.bincount(y[keep & train]).argmax()
        assert r["chance"] == round(float((y[keep & ~train] == majority).float().mean()), 4)
        if r["layer"] == "signal":
            assert r["accuracy"] == 1.0 and r["train_accuracy"] == 1.0
        else:  # >= 100 scored rows each: 0.15 is about 3 standard errors above chance
            assert r["accuracy"] <= r["chance"] + 0.15, r
    assert {r["attribute"]: r["n_train"] + r["n_test"] for r in rows if r["layer"] == "signal"}["relation"] \
        == int((labels["axis"] != IGNORE).sum()) < 600  # relation rows are the pairs only


def test_features_are_the_network_read_under_the_empty_prompt_pooled_to_a_grid(pipe):
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    features = grid_features(pipe, x, 500, ["enc.0", "mid"], grid=2)
    seen = {}
    pipe.denoiser.recorder = lambda name, h: seen.setdefault(name, h.clone())
    try:
        with torch.no_grad():
            pipe.denoiser(x, 500, pipe.encode_prompt(["", "", ""]))
    finally:
        pipe.denoiser.recorder = None
    for name in ("enc.0", "mid"):
        b, c, hgt, wid = seen[name].shape
        quadrants = seen[name].reshape(b, c, 2, hgt // 2, 2, wid // 2).mean(dim=(3, 5))  # (B, C, 2, 2)
        assert features[name].shape == (3, c * 4)
        assert torch.allclose(features[name], quadrants.flatten(1), atol=1e-6)
    assert torch.equal(features[CONTROL], x.flatten(1))
    images, _ = scene_batch(0, 0, 2, size=16)
    latents = encode_scenes(pipe, images)
    assert torch.allclose(latents, pipe.autoencoder.encode(images.float() / 255 * 2 - 1), atol=1e-5)


@pytest.fixture(scope="module")
def real(pipe):
    """Probes on "latents" that are a known linear function of the scenes' labels."""
    _, labels = real_scenes(pipe, 400)
    latents = (_onehots(labels) @ torch.randn(25, 4 * 8 * 8, generator=torch.Generator().manual_seed(5)))
    return probe_real_scenes(pipe, latents.reshape(400, 4, 8, 8), labels, [999, 0], layers=["mid"]), labels


def test_real_scene_rows_and_controls(real):
    result, labels = real
    rows = result.rows
    assert result.layers == [CONTROL, "mid"] and all(list(r) == COLUMNS for r in rows)
    assert [(r["source"], r["timestep"], r["attribute"], r["layer"]) for r in rows] == [
        (s, t, a, n) for s, t in (("noise", -1), ("real", 999), ("real", 0)) for a in ATTRIBUTES
        for n in (CONTROL, "mid")]
    at = {(r["source"], r["timestep"], r["attribute"], r["layer"]): r for r in rows}
    for r in rows:
        assert r["pixels"] == at[(r["source"], r["timestep"], r["attribute"], CONTROL)]["accuracy"]
        assert r["noise"] == at[("noise", -1, r["attribute"], r["layer"])]["accuracy"]
        assert r["n_train"] + r["n_test"] == int((labels[ATTRIBUTES[r["attribute"]]] != IGNORE).sum())
        assert r["dim"] == (4 * 8 * 8 if r["layer"] == CONTROL else 32 * 4)
        if r["source"] == "noise" or (r["timestep"] == 999 and r["layer"] == CONTROL):
            # pure noise, or x_999 (signal x 0.006 under unit noise): chance, within ~3 standard errors
            assert abs(r["accuracy"] - r["chance"]) <= 0.18, r
        if r["timestep"] == 0 and r["layer"] == CONTROL:  # x_0 is the labels' linear image: read exactly
            assert r["accuracy"] == 1.0, r


def test_trajectory_states_are_the_inputs_of_the_probed_steps(pipe):
    prompts = ["a red circle", "a blue square above a yellow triangle"]
    states = trajectory_states(pipe, prompts, steps=6, every=3, guidance_scale=1.0, seed=4)
    timesteps = make_timesteps(pipe.scheduler, 6).tolist()
    assert [(s, t) for s, (t, _) in sorted(states.items())] == [(0, timesteps[0]), (3, timesteps[3]), (6, 0)]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(states[0][1], noise)
    # three DDIM steps by hand, from the noise, under the prompts
    alphas = NoiseSchedule.from_config(pipe.scheduler).alphas_cumprod
    context, x = pipe.encode_prompt(prompts), noise
    with torch.no_grad():
        for t, t_prev in zip(timesteps[:3], timesteps[1:4]):
            eps = pipe.denoiser(x, t, context)
            x0 = (x - (1 - alphas[t]).sqrt() * eps) / alphas[t].sqrt()
            x = alphas[t_prev].sqrt() * x0 + (1 - alphas[t_prev]).sqrt() * eps
    assert torch.allclose(states[3][1], x, atol=1e-5)
    final = pipe.generate(prompt=prompts, noise=noise, steps=6, guidance_scale=1.0, output="latent", progress=False)
    assert torch.equal(states[6][1], final)


def _rows(curves: dict, noise: dict, chance: float = 0.25) -> list:
    """Trajectory rows of colour_a: {layer: accuracies at steps 0, 5, 10, 15}."""
    return [{"attribute": "colour_a", "layer": name, "source": "trajectory", "timestep": 900 - 60 * i, "step": 5 * i,
             "accuracy": a, "noise": noise[name], "chance": chance} for name, curve in curves.items()
            for i, a in enumerate(curve)]


def test_decided_is_the_first_step_from_which_a_layer_stays_readable():
    noise = {CONTROL: 0.25, "enc.0": 0.3, "mid": 0.28}
    rows = _rows({CONTROL: [0.25, 0.3, 0.5, 0.92], "enc.0": [0.3, 0.95, 0.5, 0.97], "mid": [0.28, 0.9, 0.95, 1.0]},
                 noise)
    found = first_readable(rows, "colour_a", "trajectory", 0.9)
    # level 0.9 x 1.0: enc.0 reaches 0.95 at step 5 but drops, so mid (0.9 from step 5 on) reads it first
    assert found["readable"] and found["layer"] == "mid" and found["row"]["step"] == 5
    assert found["pixels"]["step"] == 15 and found["level"] == pytest.approx(0.9)
    text = summarize(None, SceneProbeResult(rows, [CONTROL, "enc.0", "mid"]))
    assert "decided at step 5 (t=840), first read by layer mid (0.90 >= 0.90); pixels from step 15" in text
    flat = _rows({CONTROL: [0.25, 0.26, 0.27, 0.3], "enc.0": [0.3, 0.3, 0.31, 0.33], "mid": [0.28, 0.3, 0.3, 0.3]},
                 noise)
    assert not first_readable(flat, "colour_a", "trajectory", 0.9)["readable"]  # 0.33 < noise 0.3 + 0.05
    assert first_readable(_rows({CONTROL: [0.2] * 4, "enc.0": [0.3, 0.4, 0.5, 0.64], "mid": [0.3] * 4}, noise, 0.6),
                          "colour_a", "trajectory", 0.9)["readable"] is False  # 0.64 < chance 0.6 + 0.05


def test_cli_writes_the_csv_heatmaps_and_summary(folder, tmp_path):
    out = tmp_path / "probe"
    assert main(["analyze", "probe", "--model", str(folder), "--out", str(out), "--count", "40", "--prompts", "40",
                 "--timesteps", "0", "--steps", "2", "--every", "2", "--threads", "1"]) == 0
    with open(out / "probe.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS
    layers = len(minidiff.load(folder).denoiser.layer_names()) + 1
    first = make_timesteps(minidiff.load(folder).scheduler, 2)[0]
    assert len(rows) == len(ATTRIBUTES) * layers * (2 + 2)  # noise, t=0; step 0, the finished sample
    assert {(r["source"], r["timestep"], r["step"]) for r in rows} == {
        ("noise", "-1", ""), ("real", "0", ""), ("trajectory", str(int(first)), "0"), ("trajectory", "0", "2")}
    for attribute in ATTRIBUTES:
        assert (out / f"probe_{attribute}.png").stat().st_size > 0
        assert (out / f"probe_{attribute}_trajectory.png").stat().st_size > 0
    summary = (out / "summary.txt").read_text()
    assert all(f"\n{a} (" in summary for a in ATTRIBUTES) and summary.count("trajectories: ") == len(ATTRIBUTES)


@pytest.mark.parametrize("extra, words", [
    (["--grid", "0"], "grid must be an int in [1, 8]"),
    (["--level", "1.5"], "level must be a number in (0, 1]"),
    (["--count", "10"], "count must be an int in [40, 100000]"),
    (["--per-class", "3"], "--per-class applies only to class-conditional models"),
    (["--steps", "4", "--every", "9"], "every must be an int in [1, 4]"),
    (["--timesteps", "1000"], "timesteps must be ints in [0, 999]"),
    (["--guidance-scale", "-1"], "guidance scale must be a number in [0, 100]"),
])
def test_bad_arguments_are_refused_in_one_line_before_any_file(folder, tmp_path, capsys, extra, words):
    out = tmp_path / "probe"
    assert main(["analyze", "probe", "--model", str(folder), "--out", str(out), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (out / "probe.csv").exists()


def test_text_options_are_refused_for_a_class_model(tmp_path, capsys):
    if not (WEIGHTS / "digits-cond" / "config.json").exists():
        pytest.skip("weights/digits-cond is not in this checkout")
    assert main(["analyze", "probe", "--model", str(WEIGHTS / "digits-cond"), "--out", str(tmp_path / "p"),
                 "--prompts", "50"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--prompts applies only to text models" in err[0], err


def test_the_digits_summary_of_a_short_run_leaves_out_the_switch_window():
    """The digits probe's summary names the switch experiment's window (steps 20-40) only when the run has them."""
    from minidiff.probe import ProbeResult, summarize as digits_summary

    rows = [{"source": s, "layer": n, "timestep": t, "accuracy": a} for s, t in (("real", 500), ("real", 0),
            ("noise", -1)) for n, a in ((CONTROL, 0.5), ("mid", 0.9 if t == 0 else 0.2))]
    result = ProbeResult(rows, [CONTROL, "mid"], 0.1)
    assert "switch-experiment" not in digits_summary(result, ddim_timesteps=list(range(980, -1, -160)))
    assert "switch-experiment decision window (steps 20-40 of 50, t=580..180)" in digits_summary(
        result, ddim_timesteps=list(range(980, -1, -20)))
