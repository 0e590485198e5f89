"""The frontier's fewer-steps baseline (its step count, its MACs, its samples), calibration per
sampler and step count, stochastic samplers in calibration, and `minidiff bench frontier --samplers`."""
import csv
import json
import math
import warnings

import pytest
import torch
from conftest import tiny_pipeline

from minidiff import cache, cli
from minidiff import calibration as C
from minidiff.frontier import FEWER, fewer_steps, frontier, parse_samplers
from minidiff.samplers import SAMPLER_OPTIONS, SAMPLERS, draws_noise, num_model_calls


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=2)


# -- the fewer-steps baseline ------------------------------------------------------------------------

@pytest.mark.parametrize("sampler, steps, full, shallow, full_macs, shallow_macs, expected", [
    ("ddim", 50, 10, 40, 1000, 250, 20),  # 10 + 40 / 4 = 20 full calls' MACs
    ("ddim", 50, 10, 40, 1000, 251, 20),  # 20.04 calls: floor
    ("ddim", 50, 10, 40, 1000, 249, 19),  # 19.96 calls: floor, never rounded up
    ("ddim", 4, 2, 2, 1000, 500, 3),  # exactly 3 calls fit
    ("plms", 50, 11, 40, 1000, 250, 20),  # 21 calls' MACs; PLMS makes steps + 1 calls
    ("plms", 10, 1, 10, 1000, 50, 1),  # 1.5 calls: 1 step (1 call); 2 steps would take 3
    ("heun", 10, 7, 12, 1000, 300, 5),  # 10.6 calls; Heun makes 2k - 1: 5 steps = 9 calls
    ("heun", 10, 7, 12, 1000, 400, 6),  # 11.8 calls -> 6 steps = 11 calls
    ("euler_a", 30, 1, 29, 1000, 10, 1),  # 1.29 calls: at least one step
    ("dpmpp_2m", 20, 20, 0, 1000, 999, 20),  # every call full: the whole run fits
])
def test_fewer_steps_arithmetic_is_exact(sampler, steps, full, shallow, full_macs, shallow_macs, expected):
    k = fewer_steps(sampler, steps, full, shallow, full_macs, shallow_macs)
    assert k == expected
    budget = full * full_macs + shallow * shallow_macs
    assert num_model_calls(sampler, k) * full_macs <= budget or k == 1
    if k < steps:  # one step more would not fit
        assert num_model_calls(sampler, k + 1) * full_macs > budget


@pytest.mark.parametrize("sampler, steps", [("ddim", 8), ("euler_a", 6), ("heun", 4), ("plms", 8)])
def test_fewer_steps_rows_equal_a_direct_generate(pipe, sampler, steps):
    """Same noise, same seed (euler_a's per-step draws), same reference; MACs within the cached budget."""
    images, labels, seed = {}, [0, 1], 5
    rows = frontier(pipe, steps=steps, sampler=sampler, intervals=(2, 3), branches=(0, 1), schedules=("uniform",),
                    batch_size=2, seed=seed, class_labels=labels, repeats=0, images=images, log=lambda *_: None)
    calls = num_model_calls(sampler, steps)
    noise = pipe.initial_noise(2, generator=torch.Generator().manual_seed(seed))
    common = dict(sampler=sampler, noise=noise, class_labels=labels, seed=seed, progress=False)
    reference = pipe.generate(steps=steps, **common)
    assert torch.equal(images[("none", "-", 1)], reference)
    cond, _ = pipe.conditioning(1, class_labels=labels[:1])
    baselines = [r for r in rows if r["schedule"] == FEWER]
    assert [(r["branch"], r["interval"]) for r in baselines] == [(0, 2), (0, 3), (1, 2), (1, 3)]
    for row in baselines:
        macs = pipe.unet.macs(noise[:1], 500, cond, branch=row["branch"])
        full = math.ceil(calls / row["interval"])
        k = fewer_steps(sampler, steps, full, calls - full, macs["full"], macs["shallow"])
        assert row["steps"] == k and row["full_steps"] == num_model_calls(sampler, k)
        assert row["mac_speedup"] == calls / num_model_calls(sampler, k)
        assert num_model_calls(sampler, k) * macs["full"] <= full * macs["full"] + (calls - full) * macs["shallow"]
        direct = pipe.generate(steps=k, **common)
        assert torch.equal(images[(FEWER, row["branch"], row["interval"])], direct)
    cached = next(r for r in rows if r["schedule"] == "uniform")  # a cached row is cached, not the reference
    assert cached["full_steps"] == math.ceil(calls / 2) and cached["steps"] == steps


def test_parse_samplers():
    assert parse_samplers("ddim:50,dpmpp_2m:20, euler_a", 30) == [("ddim", 50), ("dpmpp_2m", 20), ("euler_a", 30)]
    with pytest.raises(ValueError, match="unknown sampler 'dpm'"):
        parse_samplers("dpm:20", 30)
    with pytest.raises(ValueError, match="NAME or NAME:STEPS"):
        parse_samplers("ddim:many", 30)
    with pytest.raises(ValueError, match="at least 1"):
        parse_samplers("ddim:0", 30)


# -- calibration per sampler and step count ---------------------------------------------------------

def test_draws_noise_comes_from_the_sampler_table():
    assert {name for name in SAMPLERS if draws_noise(name)} == {"ddpm", "euler_a"}
    assert draws_noise("ddim", eta=0.3) and not draws_noise("ddim", eta=0.0)
    assert not draws_noise("plms", eta=0.3)  # eta does not apply there


def _options(name):
    return {"karras_sigmas": True} if "karras_sigmas" in SAMPLER_OPTIONS[name] else {}


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_calibrate_works_for_every_sampler(pipe, sampler):
    calibration = C.calibrate(pipe, steps=4, sampler=sampler, batch_size=1, seed=3, branch=0, **_options(sampler))
    calls = num_model_calls(sampler, 4)
    assert calibration["model_calls"] == calls and calibration["sampler"] == sampler
    assert calibration["sampler_options"] == _options(sampler)
    assert calibration["draws_noise"] == draws_noise(sampler)
    segments = cache.segment_matrix(calibration, 0)
    # a segment that ends at the next call reuses nothing: the rolled-out run is the traced one, also for
    # the samplers that draw noise (every rolled-out run gets the traced run's draws)
    assert all(segments[s, s + 1] == 0 for s in range(calls))
    assert segments[0, calls] > 0
    pipe.calibration = calibration
    try:
        pipe.generate(steps=4, sampler=sampler, class_labels=[1], seed=0, cache_interval=2, cache_schedule="calibrated",
                      progress=False, **_options(sampler))
    finally:
        pipe.calibration = None
    assert pipe.last_run.full_steps == cache.calibrated_full_steps(calibration, calls, 2)


def test_stochastic_calibration_shares_the_noise(pipe):
    """DDIM with eta > 0: the rollout that never reuses ends exactly on the traced run (a shared draw),
    and costs grow with the reuse."""
    calibration = C.calibrate(pipe, steps=6, sampler="ddim", eta=0.7, batch_size=2, seed=4, branch=1)
    assert calibration["sampler_options"] == {"eta": 0.7} and calibration["draws_noise"]
    segments = cache.segment_matrix(calibration, 1)
    assert all(segments[s, s + 1] == 0 for s in range(6))
    assert segments[0, 6] > segments[0, 3] > 0


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_sigma_space_costs_are_measured_on_x_t(pipe, sampler):
    """Euler/Heun step x_t * sqrt(1 + sigma^2); a cost is the distance of the U-Net's input x_t (or of the
    final sample), so a segment ending early (sigma ~ 150) weighs no more than one ending late."""
    noise = pipe.initial_noise(2, generator=torch.Generator().manual_seed(1))
    cond, _ = pipe.conditioning(2, class_labels=[1, 2])
    steps, calls = 5, num_model_calls(sampler, 5)
    trajectory = C.trace(pipe, noise, steps=steps, sampler=sampler, branches=[0], cond=cond)
    segments = C.rollout_costs(pipe, trajectory, 0, steps=steps, sampler=sampler)

    def states(full):  # the U-Net's input at every call, then the final sample
        cached, seen = cache.CachedUNet(pipe.unet, calls, full, 0), []

        def model(x, t, c=None):
            seen.append(x.double())
            return cached(x, t, c)

        final = pipe.sample(model, noise.clone(), steps=steps, sampler=sampler, cond=cond, progress=False)
        return seen + [final.double()]

    reference = states(list(range(calls)))
    for s, e in [(0, 3), (1, calls), (2, 4)]:
        got = states(list(range(s + 1)) + list(range(e, calls)))  # full up to s, reusing s's cache until e
        assert segments[s, e] == pytest.approx(float(((got[e] - reference[e]) ** 2).mean()), rel=1e-3)


def test_calibration_of_other_options_is_refused(pipe):
    pipe.calibration = C.calibrate(pipe, steps=6, sampler="ddim", eta=0.5, batch_size=1, seed=0)
    try:
        with pytest.raises(ValueError, match="ddim, eta=0.5 sampler, not ddim;"):
            pipe.generate(steps=6, sampler="ddim", class_labels=[0], cache_schedule="calibrated", cache_interval=2,
                          progress=False)
        pipe.generate(steps=6, sampler="ddim", eta=0.5, class_labels=[0], cache_schedule="calibrated",
                      cache_interval=2, progress=False)  # the options it was measured with
    finally:
        pipe.calibration = None


def test_calibration_of_another_step_count_is_resampled_with_a_warning(pipe):
    calibration = C.calibrate(pipe, steps=8, sampler="dpmpp_2m", batch_size=1, seed=0, branch=0)
    pipe.calibration = calibration
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the calibrated setting: no warning
            pipe.generate(steps=8, sampler="dpmpp_2m", class_labels=[0], cache_schedule="calibrated",
                          cache_interval=2, progress=False)
        with pytest.warns(UserWarning, match="measured over 8 model calls .* this run makes 5 .*resampled"):
            pipe.generate(steps=5, sampler="dpmpp_2m", class_labels=[0], cache_schedule="calibrated",
                          cache_interval=2, progress=False)
        assert pipe.last_run.full_steps == cache.calibrated_full_steps(calibration, 5, 2)
        with pytest.raises(ValueError, match="measured with the dpmpp_2m sampler, not unipc"):
            pipe.generate(steps=8, sampler="unipc", class_labels=[0], cache_schedule="calibrated", cache_interval=2,
                          progress=False)
    finally:
        pipe.calibration = None


def test_frontier_checks_its_calibration(pipe):
    calibration = C.calibrate(pipe, steps=4, sampler="ddim", batch_size=1, seed=0)
    with pytest.raises(ValueError, match="measured with the ddim sampler, not euler"):
        frontier(pipe, steps=4, sampler="euler", intervals=(2,), branches=(0,), batch_size=1, repeats=0,
                 calibration=calibration, log=lambda *_: None)


# -- the command line -------------------------------------------------------------------------------

def test_analyze_calibrate_takes_any_sampler_and_its_options(pipe, tmp_path, capsys):
    model = tmp_path / "model"
    pipe.save(model)
    args = ["calibrate", "--model", str(model), "--steps", "4", "--batch", "1", "--branches", "0"]
    assert cli.analyze_main([*args, "--sampler", "dpmpp_2m", "--karras-sigmas"]) == 0
    written = json.loads((model / "calibration.json").read_text())
    assert written["sampler"] == "dpmpp_2m" and written["sampler_options"] == {"karras_sigmas": True}
    assert cli.analyze_main([*args, "--sampler", "euler_a", "--overwrite"]) == 0
    assert "noise drawn from seed 0" in capsys.readouterr().out
    assert cli.analyze_main([*args, "--sampler", "ddim", "--karras-sigmas", "--overwrite"]) == 1  # a user error
    assert "--karras-sigmas does not apply to the ddim sampler" in capsys.readouterr().err


def test_bench_frontier_with_several_samplers(pipe, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model = tmp_path / "model"
    pipe.save(model)
    out = tmp_path / "f"
    assert cli.bench_main(["frontier", "--model", str(model), "--samplers", "ddim:4,euler_a:3,heun:3", "--batch", "2",
                           "--intervals", "2", "--branches", "0", "--schedules", "uniform", "calibrated",
                           "--repeats", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "calibrating them on seed 0" in printed and "heun-3 calibrated, branch 0, 1:2: 3 full calls" in printed
    rows = list(csv.DictReader((out / "frontier.csv").open()))
    assert [(r["sampler"], r["schedule"]) for r in rows] == [
        (s, kind) for s in ("ddim", "euler_a", "heun") for kind in ("none", "uniform", "calibrated", FEWER)]
    heun = {r["schedule"]: r for r in rows if r["sampler"] == "heun"}
    assert heun["none"]["full_steps"] == "5" and heun["uniform"]["full_steps"] == "3"
    assert (out / "psnr_vs_macs.png").stat().st_size > 0 and not (out / "frontier.png").exists()
    budgets = (out / "budgets.md").read_text()
    fewer = next(r for r in rows if r["sampler"] == "heun" and r["schedule"] == FEWER)
    assert budgets.count("| 0 | 2 | ") == 3  # one budget line per sampler
    assert f"| {fewer['steps']} | {float(fewer['mac_fraction']):.1%} |" in budgets.split("heun, 3 steps")[1]
    assert cli.bench_main(["frontier", "--model", str(model), "--samplers", "ddim:4,nope", "--out", str(out)]) == 1
    assert "unknown sampler 'nope'" in capsys.readouterr().err
