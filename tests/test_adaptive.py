"""Forecasting the cached feature and the adaptive (per-sample, run-time) cache schedule."""
from pathlib import Path

import pytest
import torch
from conftest import randomize

from minidiff import load
from minidiff.adaptive import AdaptiveUNet, full_step_allowance
from minidiff.cache import make_schedule
from minidiff.forecast import History, lagrange_weights
from minidiff.pipeline import Pipeline
from minidiff.samplers import num_model_calls
from minidiff.schedules import SchedulerConfig
from minidiff.unet import UNet, UNetConfig

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "digits-cond"


def _tiny_pipe(seed=0):
    cfg = UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_levels=(1,), num_classes=4, sample_size=8)
    return Pipeline(randomize(UNet(cfg), std=0.08, seed=seed), SchedulerConfig(beta_schedule="linear",
                                                                               clip_sample=False), null_class=3)


# -- the forecast ---------------------------------------------------------------------------------

@pytest.mark.parametrize("order", [0, 1, 2])
def test_forecast_is_exact_on_polynomials_of_its_order(order):
    coeffs = torch.randn(order + 1, 2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(order))

    def feature(t):
        return sum(c * (t / 1000) ** p for p, c in enumerate(coeffs))

    history = History(order)
    for t in (981, 901, 861, 741)[: order + 2]:  # unequal gaps; one more point than needed
        history.push(torch.arange(2), t, feature(t), 2)
    for t in (700, 401, 21):
        torch.testing.assert_close(history.forecast(None, t), feature(t), rtol=1e-9, atol=1e-9)


def test_forecast_order_drops_where_history_is_short_and_a_revisit_replaces():
    history = History(2)
    history.push(torch.arange(1), 900, torch.full((1, 2), 3.0), 1)
    assert torch.equal(history.forecast(None, 500), torch.full((1, 2), 3.0))  # one point: reuse
    history.push(torch.arange(1), 800, torch.full((1, 2), 5.0), 1)
    assert torch.allclose(history.forecast(None, 700), torch.full((1, 2), 7.0))  # two points: linear
    history.push(torch.arange(1), 800, torch.full((1, 2), 4.0), 1)  # PLMS revisits a timestep
    assert history.times == [[900, 800]]
    assert torch.allclose(history.forecast(None, 700), torch.full((1, 2), 5.0))
    assert lagrange_weights([1.0, 2.0, 4.0], 3.0) == pytest.approx([-1 / 3, 1.0, 1 / 3])


def test_forecast_keeps_each_row_on_its_own_history():
    history = History(1)
    history.push(torch.arange(2), 900, torch.tensor([[1.0], [10.0]]), 2)
    history.push(torch.tensor([1]), 800, torch.tensor([[20.0]]), 2)  # only row 1 refreshes
    assert torch.allclose(history.forecast(None, 700), torch.tensor([[1.0], [30.0]]))
    assert torch.allclose(history.forecast(torch.tensor([1]), 600), torch.tensor([[40.0]]))


# -- the U-Net split at the cut -------------------------------------------------------------------

@pytest.mark.parametrize("branch", [0, 2, 3])
def test_cut_then_rest_or_cache_equals_full_and_shallow(branch):
    unet = _tiny_pipe().unet
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2])
    with torch.inference_mode():
        out, cache = unet.forward_full(x, 500, labels, branch=branch)
        state = unet.forward_cut(x, 500, labels, branch=branch)
        rest, rest_cache = unet.forward_rest(state)
        assert torch.equal(rest, out) and torch.equal(rest_cache.hidden, cache.hidden)
        shallow = unet.forward_shallow(x + 0.1, 400, labels, cache=cache)
        state = unet.forward_cut(x + 0.1, 400, labels, branch=branch)
        assert torch.equal(unet.forward_from_cache(state, cache.hidden), shallow)


# -- cache_forecast=0 is today's caching ----------------------------------------------------------

@pytest.mark.parametrize("schedule", ["uniform", "nonuniform", [0, 2, 3, 7]])
@pytest.mark.parametrize("sampler", ["ddim", "plms"])
def test_forecast_zero_is_bit_exact_reuse(schedule, sampler):
    pipe = _tiny_pipe()
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([1, 2])
    got = pipe.generate(steps=10, sampler=sampler, noise=noise, class_labels=labels, cache_interval=3,
                        cache_schedule=schedule, cache_forecast=0, output="latent", progress=False)
    calls = num_model_calls(sampler, 10)
    full = make_schedule(schedule, calls, 3, center=3)
    state = {"i": 0, "cache": None}

    def by_hand(x, t):  # what CachedUNet did before forecasting existed
        i, state["i"] = state["i"], state["i"] + 1
        if i in full:
            out, state["cache"] = pipe.unet.forward_full(x, t, labels, branch=0)
            return out
        return pipe.unet.forward_shallow(x, t, labels, cache=state["cache"])

    from minidiff.samplers import SAMPLERS
    with torch.inference_mode():
        expected = SAMPLERS[sampler](by_hand, noise.clone(), pipe.scheduler, 10, progress=False)
    assert torch.equal(got, expected)
    assert pipe.last_run.full_steps_per_sample == [full, full]


def test_forecast_changes_the_shallow_steps_only():
    pipe = _tiny_pipe()
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    common = dict(steps=12, noise=noise, class_labels=[0, 1], cache_interval=3, output="latent", progress=False)
    reuse = pipe.generate(**common, cache_forecast=0)
    forecast = pipe.generate(**common, cache_forecast=2)
    assert not torch.equal(reuse, forecast)
    assert pipe.last_run.forecast == 2 and pipe.last_run.full_steps == [0, 3, 6, 9]


# -- the decision rule ----------------------------------------------------------------------------

def _drive(model, inputs, t=500):
    """Call a cached model on a given sequence of inputs at a fixed timestep."""
    with torch.inference_mode():
        for x in inputs:
            model(x, torch.tensor(t), torch.zeros(x.shape[0], dtype=torch.long))


@pytest.mark.parametrize("forecast", [0, 2])
def test_a_feature_that_never_moves_refreshes_only_at_step_0(forecast):
    unet = _tiny_pipe().unet
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    model = AdaptiveUNet(unet, 12, 0, 2, forecast=forecast, threshold=0.01)
    _drive(model, [x] * 12)  # at branch 0 the cut feature is the input convolution: it cannot move
    assert model.full_steps == [[0], [0]]


def test_a_feature_that_jumps_refreshes_right_after_the_jump():
    unet = _tiny_pipe().unet
    g = torch.Generator().manual_seed(6)
    x, jumped = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    inputs = [x] * 5 + [torch.stack([x[0], jumped[1]])] * 7  # only sample 1 jumps, at step 5
    model = AdaptiveUNet(unet, 12, 0, 2, forecast=2, threshold=0.01)
    _drive(model, inputs)
    assert model.full_steps == [[0], [0, 5]]


def test_budget_is_never_exceeded_and_step_0_is_full():
    pipe = _tiny_pipe()
    ratio = 0.2
    assert full_step_allowance(0.2 + 0.8 * 3 / 10, 10, ratio) == 3
    with pytest.raises(ValueError, match="cannot pay for one full step"):
        full_step_allowance(0.1, 10, ratio)
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    for budget in (0.3, 0.5, 0.8):
        pipe.generate(steps=20, noise=noise, class_labels=[0, 1, 2], cache_schedule="adaptive", cache_budget=budget,
                      cache_threshold=0.0, output="latent", progress=False)
        run = pipe.last_run
        assert run.mac_fraction <= budget + 1e-12
        assert all(steps[0] == 0 for steps in run.full_steps_per_sample)
        assert run.mac_fraction > budget - 2 * (1 - run.shallow_ratio) / 20  # at most one full step unspent


def test_cache_option_errors():
    pipe = _tiny_pipe()
    common = dict(steps=4, class_labels=[0], output="latent", progress=False)
    with pytest.raises(ValueError, match="cache_forecast must be one of 0, 1, 2, .auto., .foca."):
        pipe.generate(**common, cache_forecast=3)
    with pytest.raises(ValueError, match="cache_threshold must be a number"):
        pipe.generate(**common, cache_schedule="adaptive", cache_threshold=-1)
    with pytest.raises(ValueError, match="cache_budget must be a fraction"):
        pipe.generate(**common, cache_schedule="adaptive", cache_budget=1.5)
    with pytest.raises(ValueError, match="apply to cache_schedule='adaptive' only"):
        pipe.generate(**common, cache_interval=2, cache_budget=0.5)


# -- per sample, never across samples -------------------------------------------------------------

@pytest.mark.parametrize("guidance", [None, 3.0])
def test_a_batch_equals_its_samples_run_alone(guidance):
    pipe = _tiny_pipe(seed=1)
    noise = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(8)) * 1.5
    labels = [0, 1, 2, 0, 1, 2, 0, 1]
    common = dict(steps=20, cache_schedule="adaptive", cache_threshold=0.597, cache_budget=1.0, cache_forecast=2,
                  guidance_scale=guidance, output="latent", progress=False)
    batch = pipe.generate(noise=noise, class_labels=labels, **common)
    per_sample = pipe.last_run.full_steps_per_sample
    alone, alone_steps = [], []
    for i in range(8):
        alone.append(pipe.generate(noise=noise[i:i + 1], class_labels=[labels[i]], **common))
        alone_steps += pipe.last_run.full_steps_per_sample
    assert per_sample == alone_steps
    assert len({tuple(s) for s in per_sample}) > 1  # the samples did decide differently
    torch.testing.assert_close(batch, torch.cat(alone), rtol=1e-4, atol=1e-5)


# -- the shipped model, as docs/adaptive.md reports it ------------------------------------------------

@pytest.mark.skipif(not (SHIPPED / "model.safetensors").exists(), reason="the shipped digits model is absent")
@pytest.mark.parametrize("seed", [1, 2])
def test_shipped_model_adaptive_at_uniform_5_macs_beats_uniform_3_and_order_2(seed):
    """docs/adaptive.md's table, in its metric: the mean over images of each image's PSNR."""
    from minidiff.metrics import psnr

    pipe = load(SHIPPED)
    common = dict(steps=50, sampler="ddim", class_labels=list(range(8)), seed=seed, progress=False)
    reference = pipe.generate(**common)
    uniform3 = psnr(pipe.generate(**common, cache_interval=3), reference, per_image=True)
    pipe.generate(**common, cache_interval=5)
    budget = pipe.last_run.mac_fraction
    order2 = psnr(pipe.generate(**common, cache_interval=5, cache_forecast=2), reference, per_image=True)
    adaptive = pipe.generate(**common, cache_schedule="adaptive", cache_budget=budget)
    run = pipe.last_run
    assert run.forecast == 2
    assert run.mac_fraction <= budget + 1e-12
    assert len({tuple(s) for s in run.full_steps_per_sample}) > 1
    assert psnr(adaptive, reference, per_image=True) > max(uniform3, order2)
