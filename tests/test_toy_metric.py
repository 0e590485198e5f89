"""Toy metric (a small digit classifier; not Inception FID) and the shipped models it scores."""
import math

import pytest
import torch

from minidiff.checkpoint import CheckpointError
from minidiff.cache import mac_bound
from minidiff.data import find_weights
from minidiff.pipeline import load
from minidiff.metrics import frechet_distance, load_metric, psnr


@pytest.fixture(scope="module")
def metric():
    return load_metric(find_weights("digits-classifier"))


def test_frechet_distance_closed_forms():
    mean, cov = torch.randn(5, dtype=torch.float64), torch.eye(5, dtype=torch.float64) * 2
    assert abs(frechet_distance(mean, cov, mean, cov)) < 1e-9
    # Diagonal covariances: |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 4.0, 1.0])
    shift = torch.tensor([1.0, 0.0, 2.0])
    expected = 5.0 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2
    assert math.isclose(frechet_distance(shift, torch.diag(a), torch.zeros(3), torch.diag(b)), expected, rel_tol=1e-9)


def test_real_digits_score_high_and_noise_low(metric):
    pytest.importorskip("sklearn")
    from minidiff.data import digits

    data = digits(16)
    picks = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:100]
    real = metric.score(data.images[picks].float() / 255, data.labels[picks])
    noise = metric.score(torch.rand(100, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert real.confident >= 0.95 and real.accuracy >= 0.95 and real.toy_fid < 10
    assert noise.confident <= 0.1 and noise.accuracy is None and noise.toy_fid > 10 * real.toy_fid
    # Other resolutions are scored at the classifier's own 16 px.
    assert metric.score(torch.nn.functional.interpolate(data.images[picks].float() / 255, size=32)).confident >= 0.9


def test_bad_inputs(metric, tmp_path):
    with pytest.raises(ValueError, match=r"images must be \(B, 1, H, W\)"):
        metric.score(torch.rand(4, 3, 16, 16))
    with pytest.raises(ValueError, match="at least 2 images"):
        metric.score(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="got 3 labels for 4 images"):
        metric.score(torch.rand(4, 1, 16, 16), [1, 2, 3])
    with pytest.raises(CheckpointError, match="not a toy-metric classifier folder"):
        load_metric(tmp_path)


def test_shipped_model_samples_are_confident_digits(metric):
    """20 uncached DDIM-25 samples, 2 per class: measured 20/20 confident, 20/20 correct (threshold 0.9)."""
    pipe = load(find_weights("digits-cond"))
    labels = torch.arange(10).repeat(2)
    images = pipe.generate(steps=25, batch_size=20, class_labels=labels, seed=0, progress=False)
    scores = metric.score(images, labels)
    assert scores.confident >= 0.9, scores.row()
    assert scores.accuracy >= 0.9, scores.row()


def test_demo_helpers():
    x = torch.rand(2, 1, 4, 4)
    assert psnr(x, x) == math.inf and 19 < psnr(x, (x + 0.1).clamp(0, 1)) < 25
    assert mac_bound(10, 40, 10 / 100) == pytest.approx(50 * 100 / (10 * 100 + 40 * 10))
