"""The caching contract (minidiff.denoiser) on both shipped networks: every schedule x forecast order,
with and without guidance, against the primitives driven by hand, and a batch against its samples alone."""
import warnings
from pathlib import Path

import pytest
import torch

import minidiff
from minidiff.cache import calibrated_full_steps, make_schedule
from minidiff.denoiser import Denoiser, check_denoiser
from minidiff.forecast import lagrange_weights
from minidiff.pipeline import Pipeline
from minidiff.samplers import SAMPLERS
from minidiff.schedules import SchedulerConfig

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
NETWORKS = ["digits-cond", "digits-dit"]  # a U-Net and a DiT
STEPS, INTERVAL, BRANCH = 8, 3, 0
SCHEDULES = {"uniform": "uniform", "nonuniform": "nonuniform", "calibrated": "calibrated", "list": [0, 3, 5],
             "adaptive": "adaptive"}
ORDERS = [0, 1, 2, "auto"]
# Adaptive thresholds at which the guided samples of the batch part ways (asserted below) at 8 steps.
THRESHOLDS = {"unet": 0.1, "dit": 0.4}
# Forecasting sums weighted features in another order than the hand-driven Lagrange sum; reuse is exact.
FORECAST_TOL = dict(rtol=1e-5, atol=1e-5)
# A batch runs other kernels than a single sample (as tests/test_adaptive.py states).
BATCH_TOL = dict(rtol=1e-4, atol=1e-5)

pytestmark = pytest.mark.skipif(not all((WEIGHTS / n / "model.safetensors").exists() for n in NETWORKS),
                                reason="the shipped digits models are absent")


@pytest.fixture(scope="module", params=NETWORKS)
def pipe(request):
    return minidiff.load(WEIGHTS / request.param)


def _noise(batch, seed=0):
    return torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def _run(pipe, schedule, order, guidance, noise, labels):
    options = dict(cache_schedule=SCHEDULES[schedule], cache_forecast=order, cache_branch=BRANCH)
    if schedule == "adaptive":
        options.update(cache_budget=0.6, cache_threshold=THRESHOLDS[pipe.denoiser_kind])
    else:
        options["cache_interval"] = 1 if schedule == "list" else INTERVAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the shipped calibration is over 50 calls: resampled to 8, with a warning
        return pipe.generate(steps=STEPS, noise=noise, class_labels=labels, guidance_scale=guidance, output="latent",
                             progress=False, **options)


def _expected_schedule(pipe, schedule):
    if schedule == "calibrated":
        return calibrated_full_steps(pipe.calibration, STEPS, INTERVAL, BRANCH)
    if schedule == "list":
        return SCHEDULES["list"]
    return make_schedule(schedule, STEPS, INTERVAL)


@torch.inference_mode()
def _hand_driven(pipe, noise, labels, guidance, full_steps_per_sample, order):
    """DDIM over forward_cut, then forward_rest for the rows that refresh and forward_from_cache for the
    others, each row forecasting its deep feature through its own last order + 1 full steps."""
    net, samples = pipe.denoiser, noise.shape[0]
    cond = torch.as_tensor(labels)
    if guidance is not None:
        cond = torch.cat([torch.full_like(cond, pipe.null_class), cond])
    history = {}  # row -> [(t, deep feature of that row)]
    step = [0]

    def deep_feature(row, t):
        points = history[row][-(order + 1):]
        weights = lagrange_weights([p[0] for p in points], t)
        out = points[0][1] * weights[0]
        for (_, value), w in zip(points[1:], weights[1:]):
            out = out + value * w
        return out

    def model(x, t):
        x_in = x if guidance is None else torch.cat([x, x])
        copies = x_in.shape[0] // samples
        refresh = torch.tensor([step[0] in full_steps_per_sample[s] for s in range(samples)]).repeat(copies)
        step[0] += 1
        state = net.forward_cut(x_in, t, cond, branch=BRANCH)
        fresh, stale = refresh.nonzero().flatten(), (~refresh).nonzero().flatten()
        out = torch.empty_like(x_in)
        if len(fresh):
            part, cache = net.forward_rest(state if len(fresh) == len(refresh) else state.rows(fresh))
            out[fresh] = part
            for i, row in enumerate(fresh.tolist()):
                history.setdefault(row, []).append((float(t), cache.hidden[i:i + 1]))
        if len(stale):
            hidden = torch.cat([deep_feature(row, float(t)) for row in stale.tolist()])
            out[stale] = net.forward_from_cache(state if len(stale) == len(refresh) else state.rows(stale), hidden)
        if guidance is None:
            return out
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + guidance * (out_cond - out_uncond)

    return SAMPLERS["ddim"](model, noise.clone(), pipe.scheduler, STEPS, progress=False)


@pytest.mark.parametrize("guidance", [None, 3.0])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_every_schedule_and_forecast_equals_the_primitives_by_hand(pipe, schedule, order, guidance):
    noise, labels = _noise(3), [4, 7, 1]
    batch = _run(pipe, schedule, order, guidance, noise, labels)
    run = pipe.last_run
    per_sample = run.full_steps_per_sample
    assert run.forecast == (2 if order == "auto" else order)  # "auto": ddim draws no noise
    assert run.shallow_calls > 0 and all(steps[0] == 0 for steps in per_sample)  # it cached
    if schedule == "adaptive":
        assert run.mac_fraction <= 0.6 + 1e-12
        if guidance and run.forecast == 2:  # some steps refresh a part of the batch only
            assert len({tuple(s) for s in per_sample}) > 1
    else:
        assert per_sample == [_expected_schedule(pipe, schedule)] * 3
    tol = {} if run.forecast == 0 else FORECAST_TOL
    check = torch.equal if not tol else (lambda a, b: torch.allclose(a, b, **tol))
    assert check(batch, _hand_driven(pipe, noise, labels, guidance, per_sample, run.forecast))

    alone = []
    for i in range(3):  # batch 1: each sample alone decides and computes as in the batch
        alone.append(_run(pipe, schedule, order, guidance, noise[i:i + 1], labels[i:i + 1]))
        assert pipe.last_run.full_steps_per_sample == [per_sample[i]]
    assert check(alone[0], _hand_driven(pipe, noise[:1], labels[:1], guidance, per_sample[:1], run.forecast))
    torch.testing.assert_close(batch, torch.cat(alone), **BATCH_TOL)


def test_a_network_without_the_contract_is_refused_by_name():
    class Plain(torch.nn.Module):
        config = None

        def forward(self, x, t, cond=None):
            return x

    with pytest.raises(TypeError, match="Plain cannot be a Pipeline's denoiser: it lacks num_branches, check_branch, "
                                        "forward_cut"):
        Pipeline(Plain(), SchedulerConfig())
    for name in NETWORKS:
        net = minidiff.load(WEIGHTS / name).denoiser
        assert isinstance(net, Denoiser)
        check_denoiser(net)


def test_compiled_primitives_run_the_adaptive_and_a_fixed_schedule_as_eager():
    """compile_paths compiles the three primitives, so the adaptive schedule runs compiled too (the
    'eager' backend traces the same ops: the numbers must not move)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pipe = minidiff.load(WEIGHTS / "digits-dit")
    noise, labels = _noise(3), [4, 7, 1]
    eager = {s: _run(pipe, s, 2, 3.0, noise, labels) for s in ("adaptive", "uniform")}
    steps = pipe.last_run.full_steps_per_sample
    pipe.denoiser.compile_paths(backend="eager", pack=False)
    for schedule, expected in eager.items():
        assert torch.equal(_run(pipe, schedule, 2, 3.0, noise, labels), expected), schedule
    assert pipe.last_run.full_steps_per_sample == steps
    assert counters["stats"]["unique_graphs"] >= 3 and not counters["graph_break"]
