"""Feature recording, step-similarity matrices, the calibrated schedule's dynamic programme, the
analysis CLI, and (when weights/digits-cond is present) calibrated vs uniform/non-uniform quality."""
import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, randomize

from minidiff import analysis as A
from minidiff import cache, cli, plots
from minidiff import calibration as C
from minidiff.metrics import psnr
from minidiff import load
from minidiff.cache import make_schedule
from minidiff.pipeline import Pipeline
from minidiff.schedules import SchedulerConfig, make_timesteps
from minidiff.unet import UNet, UNetConfig

SHIPPED = REPO / "weights" / "digits-cond"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def pipe():
    """A tiny class-conditional pixel model (10 classes + null class 10) with random weights."""
    config = UNetConfig(in_channels=1, out_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                        attention_levels=(1,), norm_groups=8, num_classes=11, sample_size=8)
    unet = randomize(UNet(config), std=0.05, seed=3)
    return Pipeline(unet, SchedulerConfig(clip_sample=True), null_class=10, class_names=[str(i) for i in range(10)])


@pytest.fixture(scope="session")
def record(pipe):
    return A.record_features(pipe, steps=8, batch_size=3, class_labels=[1, 4, 7], seed=5)


@pytest.fixture(scope="session")
def calibration(pipe):
    return C.calibrate(pipe, steps=12, branch=0, branches=[0, 2], batch_size=2, seed=0)


# -- recording ------------------------------------------------------------------------------------

def test_record_has_every_layer_at_every_step(pipe, record):
    assert list(record.features) == A.layer_names(pipe.unet)
    assert record.num_steps == 8 and record.timesteps == make_timesteps(pipe.scheduler, 8).tolist()
    for name, f in record.features.items():
        c, h, w = record.shapes[name]
        assert f.shape == (8, 3, c * h * w) and f.dtype == torch.float32 and f.device.type == "cpu"


@pytest.mark.parametrize("reduce", [{}, {"pool": 2}, {"project": 64}, {"pool": 4, "project": 16}])
def test_recording_does_not_change_samples(pipe, reduce):
    kwargs = dict(steps=6, batch_size=2, class_labels=[3, 8], seed=11, progress=False)
    plain = pipe.generate(**kwargs)
    recorded = A.record_features(pipe, layers=["enc.1", "mid", "dec.3"], **reduce, **kwargs)
    assert torch.equal(plain, recorded.images)
    assert pipe.unet.recorder is None
    if "project" in reduce:
        assert all(f.shape[-1] <= reduce["project"] for f in recorded.features.values())


def test_recorder_is_removed_on_error(pipe):
    def fail(i, t, x):
        if i == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        A.record_features(pipe, steps=5, batch_size=1, class_labels=0, seed=0, callback=fail)
    assert pipe.unet.recorder is None


def test_recording_refuses_caching_nesting_and_unknown_layers(pipe):
    with pytest.raises(ValueError, match="cache_interval"):
        A.record_features(pipe, steps=4, batch_size=1, class_labels=0, cache_interval=2)
    with pytest.raises(ValueError, match="unknown layer"):
        A.record_features(pipe, steps=4, batch_size=1, class_labels=0, layers=["dec.99"])
    with A.recording(pipe.unet, lambda name, h: None):
        with pytest.raises(RuntimeError, match="already has a recorder"):
            A.record_features(pipe, steps=4, batch_size=1, class_labels=0)
    assert pipe.unet.recorder is None


def test_projection_is_fixed_and_keeps_cosines_close():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 8, 32, 32, generator=g)
    b = a + 0.3 * torch.randn(a.shape, generator=g)
    project = A.FeatureReducer(project=2048, seed=1)
    assert torch.equal(project("dec.1", a), A.FeatureReducer(project=2048, seed=1)("dec.1", a))
    exact = F.cosine_similarity(a.flatten(1), b.flatten(1))
    hashed = F.cosine_similarity(project("dec.1", a), project("dec.1", b))
    assert (1 - hashed).div(1 - exact).sub(1).abs().max() < 0.15  # 1 - cos within 15%
    assert A.FeatureReducer(pool=4)("x", a).shape == (4, 8 * 16)


# -- similarity -----------------------------------------------------------------------------------

def test_similarity_matrices_are_consistent(record):
    matrices = A.similarity_matrices(record)
    for name, sim in matrices.items():
        assert sim.shape == (8, 8)
        np.testing.assert_allclose(np.diagonal(sim), 1.0, atol=1e-9)
        assert np.array_equal(sim, sim.T)
        assert sim.min() >= -1.0 and sim.max() <= 1.0
        f = record.features[name].double()
        direct = float(F.cosine_similarity(f[1], f[6], dim=-1).mean())
        assert sim[1, 6] == pytest.approx(direct, abs=1e-9)


def test_summary_and_depth_profile(pipe, record, tmp_path):
    matrices = A.similarity_matrices(record)
    summary = A.summarize(matrices)
    for name, row in summary.items():
        sim = matrices[name]
        assert row["adjacent_mean"] == pytest.approx(np.mean([sim[i, i + 1] for i in range(7)]))
        assert 0.0 <= row["frac_above"] <= 1.0
        assert row["close_to_final_from"] is None or sim[row["close_to_final_from"], -1] > 0.95
    rows = A.depth_profile(matrices, pipe.unet, record.shapes)
    assert [r["layer"] for r in rows] == A.layer_names(pipe.unet)
    assert "cached at branch 0" in rows[[r["layer"] for r in rows].index(A.cached_layer(pipe.unet, 0))]["role"]
    pytest.importorskip("matplotlib")
    A.save_matrices(matrices, tmp_path / "m.npz")
    assert set(np.load(tmp_path / "m.npz").files) == set(matrices)
    assert plots.plot_heatmaps(matrices, tmp_path / "h.png").stat().st_size > 1000
    assert plots.plot_depth(rows, tmp_path / "d.png").stat().st_size > 1000


# -- switch wrapper -------------------------------------------------------------------------------

def test_condition_switch_matches_generate_at_the_ends(pipe):
    noise = pipe.initial_noise(2, generator=torch.Generator().manual_seed(4))
    old, new = torch.tensor([2, 2]), torch.tensor([9, 9])
    never = A.ConditionSwitch(pipe.unet, 6, old, new)
    at_start = A.ConditionSwitch(pipe.unet, 0, old, new)
    kwargs = dict(steps=6, noise=noise, progress=False)
    assert torch.equal(pipe.decode(pipe.sample(never, noise.clone(), steps=6, cond=old, progress=False)), pipe.generate(class_labels=old, **kwargs))
    assert torch.equal(pipe.decode(pipe.sample(at_start, noise.clone(), steps=6, cond=old, progress=False)),
                       pipe.generate(class_labels=new, **kwargs))
    result = A.switch_experiment(pipe, old=2, new=9, steps=6, at_steps=[3], batch_size=2, seed=4)
    rows = result.rows
    assert [r["switch_at"] for r in rows] == [0, 3, 6] and sorted(result.images) == [0, 3, 6]
    assert rows[0]["psnr_vs_new"] == 100.0 and rows[-1]["psnr_vs_old"] == 100.0


# -- calibrated schedules -------------------------------------------------------------------------

def test_dynamic_programme_is_optimal():
    rng = np.random.default_rng(0)
    size = 9
    for trial in range(12):
        segments = np.triu(rng.random((size, size + 1)) ** 3, 1)
        for count in range(1, size + 1):
            got = cache.optimal_full_steps(segments, count)
            assert got[0] == 0 and len(got) == count == len(set(got)) and got == sorted(got)
            brute = min(cache.schedule_cost(segments, [0, *rest])
                        for rest in itertools.combinations(range(1, size), count - 1))
            assert cache.schedule_cost(segments, got) == pytest.approx(brute, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("guidance_scale", [None, 3.0])
def test_rollout_costs_match_a_cached_generate_run(pipe, guidance_scale):
    """segments[s, e] is the distance entering call e (for DDIM: after call e-1) of the run that is full up
    to s, then reuses s's cache."""
    labels, noise = [5, 6], pipe.initial_noise(2, generator=torch.Generator().manual_seed(1))
    cond, uncond = pipe.conditioning(2, class_labels=labels, guidance_scale=guidance_scale)
    trajectory = C.trace(pipe, noise, steps=6, sampler="ddim", branches=[1], cond=cond, uncond=uncond,
                         guidance_scale=guidance_scale)
    segments = C.rollout_costs(pipe, trajectory, 1, steps=6, sampler="ddim", guidance_scale=guidance_scale,
                               max_batch=8)  # the reusing runs are split over several batches
    assert segments.shape == (6, 7) and np.all(np.tril(segments) == 0)
    assert np.all(np.diagonal(segments, 1) == 0) and np.all(np.triu(segments, 2)[np.triu_indices(6, 2)] > 0)

    def sample_after(call, **cache):
        seen = {}
        pipe.generate(steps=6, noise=noise, class_labels=labels, guidance_scale=guidance_scale, batch_size=2,
                      progress=False, callback=lambda i, t, x: seen.setdefault(i, x.clone()), **cache)
        return seen[call].double()

    for s, e in [(1, 4), (0, 6), (3, 5)]:
        full = list(range(s + 1)) + list(range(e, 6))
        cached = sample_after(e - 1, cache_interval=2, cache_branch=1, cache_schedule=full)
        distance = float(((cached - sample_after(e - 1)) ** 2).mean())
        assert segments[s, e] == pytest.approx(distance, rel=1e-3)


def test_feature_drift_costs_add_up_along_a_segment(pipe):
    cond, _ = pipe.conditioning(2, class_labels=[1, 2])
    trajectory = C.trace(pipe, pipe.initial_noise(2, generator=torch.Generator().manual_seed(0)), steps=6, sampler="ddim", branches=[0], cond=cond)
    segments = C.drift_costs(trajectory, 0)
    hidden = torch.stack([h.flatten(1) for h in trajectory.hidden[0]]).double()
    expected = sum(1 - float(F.cosine_similarity(hidden[1], hidden[j], dim=-1).mean()) for j in range(1, 5))
    assert segments[1, 5] == pytest.approx(expected, abs=1e-9)


def test_resampling_keeps_the_grid_and_spans_the_same_time():
    rng = np.random.default_rng(1)
    segments = np.triu(rng.random((10, 11)), 1)
    np.testing.assert_allclose(cache.resample_segments(segments, 10), segments)
    coarse = cache.resample_segments(segments, 5)
    assert coarse.shape == (5, 6) and coarse[1, 3] == pytest.approx(segments[2, 6])


@pytest.mark.parametrize("sampler, cost", [("ddpm", "output"), ("ddpm", "feature"), ("plms", "output")])
def test_calibration_follows_the_sampler(pipe, sampler, cost):
    calibration = C.calibrate(pipe, steps=6, sampler=sampler, batch_size=1, seed=0, cost=cost)
    calls = 7 if sampler == "plms" else 6
    assert calibration["model_calls"] == calls
    pipe.calibration = calibration
    try:
        pipe.generate(steps=6, sampler=sampler, batch_size=1, class_labels=1, seed=0, cache_interval=2,
                      cache_schedule="calibrated", progress=False)
    finally:
        pipe.calibration = None
    assert pipe.last_run.full_steps == cache.calibrated_full_steps(calibration, calls, 2)
    assert len(pipe.last_run.full_steps) == math.ceil(calls / 2)


@pytest.mark.parametrize("num_steps", [12, 7, 20, 50])
def test_calibrated_schedule_counts(calibration, num_steps):
    for interval in (1, 2, 3, 4, 5, 10, 64):
        full = cache.calibrated_full_steps(calibration, num_steps, interval)
        assert len(full) == math.ceil(num_steps / interval)
        assert full[0] == 0 and full == sorted(set(full)) and full[-1] < num_steps
    assert len(cache.calibrated_full_steps(calibration, num_steps, 3, branch=2)) == math.ceil(num_steps / 3)


def test_calibration_errors_are_actionable(calibration):
    with pytest.raises(ValueError, match="covers branches \\[0, 2\\], not 1"):
        cache.calibrated_full_steps(calibration, 12, 3, branch=1)
    with pytest.raises(ValueError, match="analyze calibrate"):
        cache.calibrated_full_steps({"steps": 12}, 12, 3)
    damaged = {**calibration, "segments": {"0": calibration["segments"]["0"][:-1] + [[0.0, 1.0]]}}
    with pytest.raises(ValueError, match="damaged"):
        cache.calibrated_full_steps(damaged, 12, 3)


def test_calibrated_schedule_through_the_pipeline_and_cli(pipe, tmp_path):
    model = tmp_path / "model"
    pipe.save(model)
    assert cli.analyze_main(["calibrate", "--model", str(model), "--steps", "10", "--batch", "2", "--branches", "0", "1"]) == 0
    calibration = json.loads((model / "calibration.json").read_text())
    assert calibration["branch"] == 0 and set(calibration["segments"]) == {"0", "1"}
    assert cli.analyze_main(["calibrate", "--model", str(model), "--steps", "10", "--batch", "2"]) == 1  # no --overwrite
    loaded = load(model)
    loaded.generate(steps=10, batch_size=1, class_labels=3, seed=0, cache_interval=3, cache_schedule="calibrated",
                    progress=False)
    assert loaded.last_run.full_steps == cache.calibrated_full_steps(calibration, 10, 3)
    assert make_schedule("calibrated", 10, 3, calibrated=calibration) == loaded.last_run.full_steps


def test_analyze_and_bench_cli(pipe, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model = tmp_path / "model"
    pipe.save(model)
    common = ["--model", str(model), "--steps", "4", "--batch", "2"]
    assert cli.analyze_main(["similarity", *common, "--layers", "enc.0", "mid", "--out", str(tmp_path / "s")]) == 0
    assert {p.name for p in (tmp_path / "s").iterdir()} == {"similarity.npz", "summary.csv", "heatmaps.png"}
    assert cli.analyze_main(["depth", *common, "--project", "32", "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "depth.png").exists()
    assert cli.analyze_main(["switch", *common, "--from", "1", "--to", "2", "--at", "0", "2", "--out", str(tmp_path / "w")]) == 0
    assert (tmp_path / "w" / "switch.csv").read_text().startswith("switch_at,psnr_vs_old,psnr_vs_new")
    assert cli.bench_main(["frontier", *common, "--intervals", "2", "--branches", "0", "1",
                         "--out", str(tmp_path / "f")]) == 0
    rows = (tmp_path / "f" / "frontier.csv").read_text().splitlines()
    assert len(rows) == 1 + 1 + 4 * 2  # header, uncached, 3 schedules and fewer steps x 2 branches
    assert rows[0].startswith("schedule,branch,interval,full_steps,seconds,uncached_seconds,speedup,mac_speedup,"
                              "psnr,accuracy")  # the columns before the baseline, unchanged
    assert cli.analyze_main(["similarity", *common, "--layers", "nope", "--out", str(tmp_path / "x")]) == 1
    assert "unknown layer" in capsys.readouterr().err


# -- the shipped model ----------------------------------------------------------------------------

@pytest.mark.skipif(not (SHIPPED / "model.safetensors").exists(), reason="weights/digits-cond is not trained yet")
def test_calibrated_beats_uniform_and_nonuniform_on_the_shipped_model():
    """Calibrated on seed 0, evaluated on seed 1: PSNR against the uncached images at 20%, 33%, 50%."""
    shipped = load(SHIPPED)
    steps, batch = 50, 8
    labels = shipped.default_labels(batch)
    calibration = C.calibrate(shipped, steps=steps, branch=0, batch_size=batch, seed=0, class_labels=labels)
    noise = shipped.initial_noise(batch, generator=torch.Generator().manual_seed(1))
    kwargs = dict(steps=steps, noise=noise, class_labels=labels, batch_size=batch, progress=False)
    reference = shipped.generate(**kwargs)
    report = {}
    for interval in (5, 3, 2):
        scores = {}
        for kind in ("uniform", "nonuniform", "calibrated"):
            full = (cache.calibrated_full_steps(calibration, steps, interval) if kind == "calibrated"
                    else make_schedule(kind, steps, interval))
            images = shipped.generate(cache_interval=interval, cache_branch=0, cache_schedule=full, **kwargs)
            scores[kind] = psnr(images, reference, per_image=True)
        report[interval] = scores
    print(report)
    for interval, scores in report.items():
        assert scores["calibrated"] >= max(scores["uniform"], scores["nonuniform"]), (interval, scores)
