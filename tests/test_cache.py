"""Cache schedules and the cached U-Net wrapper, through the samplers and the pipeline."""
import ast
import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_pipeline

from minidiff import load
from minidiff.cache import CachedUNet, explicit_schedule, make_schedule, nonuniform_schedule, uniform_schedule
from minidiff.cli import main as cli_main
from minidiff.samplers import SAMPLERS, num_model_calls


def _deepcache_reference(name):
    """A function from the installed DeepCache package, read from its source file.

    Its pipeline module does not import under current diffusers, so the one function is compiled on
    its own (it only needs numpy).
    """
    spec = importlib.util.find_spec("DeepCache")
    if spec is None:
        pytest.skip("the DeepCache reference package is not installed")
    source = Path(spec.submodule_search_locations[0], "sd", "pipeline_stable_diffusion.py").read_text()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"np": np}
    exec(compile(ast.Module(body=[node], type_ignores=[]), "DeepCache", "exec"), namespace)
    return namespace[name]


@pytest.mark.parametrize("steps,interval", [(50, 2), (50, 3), (50, 5), (50, 10), (7, 3), (1, 4), (20, 1)])
def test_uniform_runs_ceil_steps_over_n_full_steps(steps, interval):
    full = uniform_schedule(steps, interval)
    assert len(full) == math.ceil(steps / interval)
    assert full == list(range(0, steps, interval))


@pytest.mark.parametrize("steps,interval,center,power", [(50, 5, 15, 1.4), (50, 3, 15, 1.4), (100, 5, 40, 1.2),
                                                         (250, 10, 120, 1.4), (50, 10, 20, 1.6)])
def test_nonuniform_equals_deepcache_reference(steps, interval, center, power):
    reference = _deepcache_reference("sample_from_quad_center")
    count = math.ceil(steps / interval)
    with warnings.catch_warnings():  # the reference casts complex numbers to int
        warnings.simplefilter("ignore")
        expected, _ = reference(steps, count, center, power)
    got = nonuniform_schedule(steps, interval, center, power)
    assert got == sorted(int(i) for i in expected)
    assert len(got) == count and got[0] == 0


def test_nonuniform_is_denser_near_center():
    full = nonuniform_schedule(50, 5, 15, 1.4)
    gaps = np.diff(full)
    near = [g for s, g in zip(full, gaps) if abs(s - 15) <= 6]
    far = [g for s, g in zip(full, gaps) if s >= 30]
    assert max(near) < min(far)


def test_schedule_errors():
    with pytest.raises(ValueError, match="cache interval must be an int >= 1"):
        uniform_schedule(10, 0)
    with pytest.raises(ValueError, match="number of steps"):
        uniform_schedule(0, 2)
    with pytest.raises(ValueError, match=r"full steps must lie in \[0, 9\]"):
        explicit_schedule(10, [0, 12])
    with pytest.raises(ValueError, match="unknown cache schedule"):
        make_schedule("fancy", 10, 2)
    with pytest.raises(ValueError, match="no calibrated cache schedule"):
        make_schedule("calibrated", 10, 2)
    assert explicit_schedule(10, [5, 3]) == [0, 3, 5]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "plms"])
def test_interval_one_equals_uncached_exactly(sampler):
    pipe = tiny_pipeline()
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2])
    got = pipe.generate(steps=6, sampler=sampler, noise=noise, class_labels=labels, cache_interval=1, seed=5,
                        output="latent", progress=False)
    kwargs = {} if sampler == "plms" else {"generator": torch.Generator().manual_seed(5)}
    with torch.inference_mode():
        expected = SAMPLERS[sampler](lambda x, t: pipe.unet(x, t, labels), noise.clone(), pipe.scheduler, 6,
                                     progress=False, **kwargs)
    assert torch.equal(got, expected)
    assert pipe.last_run.shallow_calls == 0 and pipe.last_run.full_calls == num_model_calls(sampler, 6)


@pytest.mark.parametrize("attention_type", ["self", "transformer"])
@pytest.mark.parametrize("branch,interval", [(0, 3), (2, 2), (3, 4)])
def test_cached_run_equals_hand_driven_full_and_shallow_steps(attention_type, branch, interval):
    pipe = tiny_pipeline(attention_type)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([1, 2])
    got = pipe.generate(steps=10, sampler="ddim", noise=noise, class_labels=labels, cache_interval=interval,
                        cache_branch=branch, output="latent", progress=False)
    assert pipe.last_run.full_calls == math.ceil(10 / interval)
    assert pipe.last_run.full_steps == list(range(0, 10, interval))
    state = {"i": 0, "cache": None}

    def by_hand(x, t):
        i = state["i"]
        state["i"] += 1
        if i % interval == 0:
            out, state["cache"] = pipe.unet.forward_full(x, t, labels, branch=branch)
            return out
        return pipe.unet.forward_shallow(x, t, labels, cache=state["cache"])

    with torch.inference_mode():
        expected = SAMPLERS["ddim"](by_hand, noise.clone(), pipe.scheduler, 10, progress=False)
    assert torch.equal(got, expected)
    # and caching really changes the result (the shallow path is not secretly the full one)
    uncached = pipe.generate(steps=10, sampler="ddim", noise=noise, class_labels=labels, output="latent",
                             progress=False)
    assert not torch.equal(got, uncached)


def test_guidance_caches_both_halves_together():
    pipe = tiny_pipeline()
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1])
    calls = []
    net = pipe.denoiser  # every step is a cut, then the deep part (full) or the cached feature (shallow)
    real_rest, real_from_cache = net.forward_rest, net.forward_from_cache
    net.forward_rest = lambda state: calls.append(("full", state.h.shape[0])) or real_rest(state)
    net.forward_from_cache = lambda state, h: calls.append(("shallow", state.h.shape[0])) or real_from_cache(state, h)
    pipe.generate(steps=6, noise=noise, class_labels=labels, guidance_scale=3.0, cache_interval=3, progress=False)
    assert calls == [("full", 4), ("shallow", 4), ("shallow", 4), ("full", 4), ("shallow", 4), ("shallow", 4)]


def test_cached_unet_rejects_bad_branch():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match=r"branch must be an int in \[0, 3\]"):
        CachedUNet(pipe.unet, 10, [0], branch=4)


def test_save_load_round_trip_and_cli_sample(tmp_path, capsys):
    pipe = tiny_pipeline()
    pipe.save(tmp_path / "model")
    with pytest.raises(FileExistsError, match="overwrite"):
        pipe.save(tmp_path / "model")
    loaded = load(tmp_path / "model")
    for (k, a), (k2, b) in zip(pipe.unet.state_dict().items(), loaded.unet.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert loaded.scheduler == pipe.scheduler and loaded.null_class == 3
    out = tmp_path / "grid.png"
    rc = cli_main(["sample", "--model", str(tmp_path / "model"), "--steps", "4", "--cache-interval", "2",
                   "--class", "1", "--batch-size", "2", "--out", str(out)])
    assert rc == 0 and out.exists()
    printed = capsys.readouterr().out
    assert "4 U-Net calls (2 full, 2 shallow at branch 0)" in printed and "MAC bound" in printed
    assert cli_main(["sample", "--model", str(tmp_path / "nowhere"), "--steps", "4"]) == 1
    assert "does not exist" in capsys.readouterr().err



def test_old_center_and_power_names_still_work_with_a_deprecation_warning():
    pipe = tiny_pipeline()
    args = dict(steps=10, cache_interval=3, cache_schedule="nonuniform", class_labels=[1], seed=0, progress=False)
    new = pipe.generate(**args, cache_center=4, cache_power=2.0)
    new_steps = pipe.last_run.full_steps
    with pytest.warns(DeprecationWarning, match="cache_center= and cache_power="):
        old = pipe.generate(**args, center=4, power=2.0)
    assert pipe.last_run.full_steps == new_steps == nonuniform_schedule(10, 3, 4, 2.0)
    assert torch.equal(old, new)
