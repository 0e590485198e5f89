"""The DiT: its residual cut, the caching contract it shares with the U-Net, loading and training."""
from pathlib import Path

import pytest
import torch
from conftest import randomize

from minidiff import load
from minidiff.analysis import cached_layer, depth_profile, record_features, similarity_matrices
from minidiff.calibration import calibrate
from minidiff.cache import CachedUNet
from minidiff.dit import DiT, DiTConfig
from minidiff.pipeline import Pipeline
from minidiff.samplers import SAMPLERS
from minidiff.schedules import SchedulerConfig
from minidiff.trainer import PRESETS, TrainConfig, train

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "digits-dit"


@pytest.fixture(scope="module")
def dit():
    return randomize(DiT(DiTConfig(hidden_size=32, depth=6, num_heads=2, num_classes=5, sample_size=8)))


@pytest.fixture(scope="module")
def pipe(dit):
    return Pipeline(dit, SchedulerConfig(), null_class=4)


def _inputs(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 8, 8, generator=g), torch.tensor([999, 500, 10][:batch]), torch.tensor([0, 3, 4][:batch])


def test_branches_keep_two_b_plus_two_blocks_live(dit):
    assert dit.num_branches == 2  # depth 6: branch 0 caches blocks 1-4, branch 1 caches blocks 2-3
    x, t, y = _inputs()
    for branch in range(dit.num_branches):
        counts = dit.macs(x[:1], 500, y[:1], branch=branch)
        live = 2 * (branch + 1)
        per_block = (counts["full"] - counts["shallow"]) / (6 - live)  # blocks are identical
        assert counts["shallow"] == pytest.approx(counts["full"] - (6 - live) * per_block)
        assert 0 < counts["shallow"] < counts["full"]
    with pytest.raises(ValueError, match=r"cache branch must be an int in \[0, 1\]"):
        dit.forward_full(x, t, y, branch=2)


def test_forward_full_and_fresh_shallow_step_equal_forward(dit):
    """A shallow step reusing the residual of the same input is the whole network (up to float sums)."""
    x, t, y = _inputs()
    with torch.no_grad():
        plain = dit(x, t, y)
        for branch in range(dit.num_branches):
            out, cache = dit.forward_full(x, t, y, branch=branch)
            assert torch.equal(out, plain)
            assert cache.hidden.shape == (3, 32, 4, 4)
            torch.testing.assert_close(dit.forward_shallow(x, t, y, cache=cache), plain, atol=1e-5, rtol=1e-5)


def test_shallow_step_reuses_the_middle_residual_exactly(dit):
    """forward_shallow = blocks 0..b, + cached residual, last b+1 blocks: checked block by block."""
    x, t, y = _inputs()
    x2 = x + 0.3 * torch.randn_like(x)
    with torch.no_grad():
        _, cache = dit.forward_full(x, t, y, branch=0)
        emb = dit.embed(x2, t, y)
        h = dit.blocks[0](dit._tokens(x2), emb)
        h = h + cache.hidden.flatten(2).transpose(1, 2)
        expected = dit._image(dit.blocks[5](h, emb), emb, x2.shape[2])
        torch.testing.assert_close(dit.forward_shallow(x2, t, y, cache=cache), expected, atol=0, rtol=0)
        assert not torch.allclose(expected, dit(x2, t, y), atol=1e-4)  # the cut is not a no-op


def test_recorder_names_and_cache_residual(dit):
    x, t, y = _inputs()
    seen = {}
    dit.recorder = lambda name, h: seen.__setitem__(name, h.clone())
    try:
        with torch.no_grad():
            _, cache = dit.forward_full(x, t, y, branch=1)
    finally:
        dit.recorder = None
    assert list(seen) == dit.layer_names()
    assert cached_layer(dit, 1) == "cache.1"
    assert torch.equal(seen["cache.1"], cache.hidden)
    torch.testing.assert_close(seen["cache.1"], seen["block.3"] - seen["block.1"])  # h_4 - h_2


def test_cached_sampling_equals_hand_driven_steps(pipe):
    """cache_interval=3 through generate = forward_full / forward_shallow driven by hand."""
    dit = pipe.unet
    labels = [0, 1, 2]
    cached = pipe.generate(steps=7, batch_size=3, class_labels=labels, seed=0, cache_interval=3, progress=False)
    plain = pipe.generate(steps=7, batch_size=3, class_labels=labels, seed=0, progress=False)
    assert (cached - plain).abs().max() > 1e-4
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pipe.generate(steps=7, class_labels=labels, noise=noise, cache_interval=3, progress=False),
                       _hand_driven(pipe, noise, torch.tensor(labels), steps=7, interval=3))
    assert pipe.last_run.full_calls == 3 and pipe.last_run.shallow_calls == 4
    assert isinstance(CachedUNet(dit, 7, [0, 3, 6]), CachedUNet)


@torch.no_grad()
def _hand_driven(pipe, noise, labels, *, steps, interval):
    state = {"step": 0, "cache": None}

    def model(x, t):
        i = state["step"]
        state["step"] += 1
        if i % interval == 0:
            out, state["cache"] = pipe.unet.forward_full(x, t, labels, branch=0)
            return out
        return pipe.unet.forward_shallow(x, t, labels, cache=state["cache"])

    return pipe.decode(SAMPLERS["ddim"](model, noise.clone(), pipe.scheduler, steps))


def test_analysis_runs_on_a_dit(pipe, tmp_path):
    record = record_features(pipe, steps=6, batch_size=2, class_labels=[0, 1], seed=0)
    matrices = similarity_matrices(record)
    assert list(matrices) == pipe.unet.layer_names()
    rows = depth_profile(matrices, pipe.unet, record.shapes)
    assert rows[0]["role"] == "live at every branch" and "cached at branch 0" in rows[-2]["role"]
    calibration = calibrate(pipe, steps=6, batch_size=2, class_labels=[0, 1], branches=[0, 1])
    assert set(calibration["segments"]) == {"0", "1"}
    pipe.calibration = calibration
    try:
        images = pipe.generate(steps=6, batch_size=2, class_labels=[0, 1], seed=0, cache_interval=2,
                               cache_schedule="calibrated", progress=False)
    finally:
        pipe.calibration = None
    assert images.shape == (2, 1, 8, 8) and pipe.last_run.full_calls == 3


def test_save_load_round_trip_and_old_unet_folders(pipe, tmp_path):
    pipe.save(tmp_path / "dit")
    config = (tmp_path / "dit" / "config.json").read_text()
    assert '"dit"' in config and '"unet"' not in config
    loaded = load(tmp_path / "dit")
    assert isinstance(loaded.unet, DiT) and loaded.null_class == 4
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded.unet(x, t, y), pipe.unet(x, t, y))


def test_dit_config_errors_are_sentences():
    with pytest.raises(ValueError, match="cannot be split into 3 heads"):
        DiTConfig(hidden_size=32, num_heads=3)
    with pytest.raises(ValueError, match="depth must be at least 3"):
        DiTConfig(depth=2)
    with pytest.raises(ValueError, match="not divisible by the patch size 2"):
        DiT(DiTConfig(hidden_size=16, depth=3, num_heads=2))(torch.zeros(1, 1, 7, 8), 1)


def test_trainer_trains_a_dit_and_resumes_exactly(tmp_path):
    base = dict(dataset="digits", image_size=8, batch_size=8, log_every=2, ckpt_every=2, sample_every=0,
                progress=False, **{**PRESETS["dit-small"], "hidden_size": 32, "depth": 3, "num_heads": 2})
    straight = train(TrainConfig(**base, steps=4, out_dir=str(tmp_path / "a")))
    train(TrainConfig(**base, steps=2, out_dir=str(tmp_path / "b")))
    resumed = train(TrainConfig(**base, steps=4, out_dir=str(tmp_path / "b")), resume=tmp_path / "b")
    assert isinstance(straight.model, DiT)
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    assert isinstance(load(tmp_path / "b" / "checkpoint" / "model").unet, DiT)


# -- the shipped model --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    if not (SHIPPED / "config.json").exists():
        pytest.skip("weights/digits-dit is not in this checkout")
    return load(SHIPPED)


def test_shipped_dit_samples_and_caches(shipped):
    assert isinstance(shipped.unet, DiT) and shipped.null_class == 10
    size = sum(f.stat().st_size for f in SHIPPED.iterdir())
    assert size < 10_000_000
    labels = list(range(4))
    noise = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = shipped.generate(steps=12, class_labels=labels, noise=noise, progress=False)
    cached = shipped.generate(steps=12, class_labels=labels, noise=noise, cache_interval=3, progress=False)
    assert shipped.last_run.full_calls == 4
    assert (cached - plain).abs().max() > 1e-3
    assert torch.equal(cached, _hand_driven(shipped, noise, torch.tensor(labels), steps=12, interval=3))
    record = record_features(shipped, steps=5, batch_size=2, class_labels=[3, 7], seed=0)
    assert set(similarity_matrices(record)) == set(shipped.unet.layer_names())
