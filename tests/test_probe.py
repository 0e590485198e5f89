"""Linear probes of the class label: the probe itself, and the acceptance run on the shipped model."""
import csv
from pathlib import Path

import pytest
import torch

from minidiff import load
from minidiff.cli import main as cli_main
from minidiff.probe import CONTROL, pooled_features, probe_accuracy, probe_trajectories, split_mask

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


def test_probe_reads_separable_labels_and_not_random_ones():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(100)
    centres = torch.randn(4, 16, generator=g) * 3
    features = centres[labels] + torch.randn(400, 16, generator=g)
    train = split_mask(400)
    assert train.sum() == 200
    accuracy, fitted = probe_accuracy(features, labels, train, 4)
    assert accuracy >= 0.97 and fitted >= 0.97
    shuffled = labels[torch.randperm(400, generator=g)]
    accuracy, fitted = probe_accuracy(features, shuffled, train, 4)
    assert accuracy < 0.4  # chance is 0.25


@pytest.fixture(scope="module")
def pipe():
    return load(WEIGHTS / "digits-cond")


def test_features_are_read_under_the_null_class(pipe):
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    features = pooled_features(pipe, x, 500, ["mid"])
    seen = []
    pipe.unet.recorder = lambda name, h: seen.append(h.mean(dim=(-2, -1))) if name == "mid" else None
    try:
        with torch.no_grad():
            pipe.unet(x, 500, torch.full((3,), 10))
    finally:
        pipe.unet.recorder = None
    assert torch.equal(features["mid"], seen[0])
    assert torch.equal(features[CONTROL], x.flatten(1))


@pytest.mark.parametrize("model", ["digits-cond", "digits-dit"])
def test_probe_cli_chance_when_noisy_readable_when_clean(model, tmp_path):
    """Acceptance: near chance at t=999 (no better than a probe on pure noise), >= 0.8 at t=0 for some layer."""
    if not (WEIGHTS / model / "config.json").exists():
        pytest.skip(f"weights/{model} is not in this checkout")
    out = tmp_path / "probe"
    assert cli_main(["analyze", "probe", "--model", str(WEIGHTS / model), "--out", str(out), "--count", "400",
                     "--timesteps", "999", "0", "--no-trajectories"]) == 0
    with open(out / "probe.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:3] == ["layer", "timestep", "accuracy"]
    layers = {r["layer"] for r in rows} - {CONTROL}
    accuracy = {(r["layer"], int(r["timestep"])): float(r["accuracy"]) for r in rows}
    noise = max(accuracy[(name, -1)] for name in layers)  # the pure-noise control: chance plus selection luck
    noisiest = max(accuracy[(name, 999)] for name in layers)
    cleanest = max(accuracy[(name, 0)] for name in layers)
    assert noise < 0.25
    assert noisiest < max(noise, 0.1) + 0.1
    assert cleanest >= 0.8 and cleanest > noise + 0.5
    assert (out / "probe_heatmap.png").stat().st_size > 0 and "chance 0.10" in (out / "summary.txt").read_text()


def test_trajectory_probe_rows(pipe):
    result = probe_trajectories(pipe, per_class=2, steps=6, every=3, layers=["mid"])
    assert [(r["layer"], r["step"]) for r in result.rows] == [(CONTROL, 0), ("mid", 0), (CONTROL, 3), ("mid", 3)]
    assert all(r["n_train"] == 10 and r["n_test"] == 10 for r in result.rows)
