"""The literature's forecasters as values of cache_forecast: a cached run against the rules of
minidiff.forecasters driven by hand on the recorded full-step features, on a U-Net and a DiT, every
schedule, with guidance; sequences a rule must reproduce; bad names refused in one line."""
import warnings
from pathlib import Path

import pytest
import torch

import minidiff
from minidiff import cli
from minidiff.cache import FixedSchedule
from minidiff.cached_model import CachedModel
from minidiff.denoiser import CutState, FeatureCache
from minidiff.forecasters import NAMES, chebyshev, dicache, foca, hermite, make_forecaster
from minidiff.samplers import SAMPLERS
from minidiff.schedules import SchedulerConfig

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
NETWORKS = ["digits-cond", "digits-dit"]  # a U-Net and a DiT
STEPS, BRANCH, GUIDANCE = 14, 0, 3.0  # 1:2 gives 7 full steps: Spectrum's fit (5 or more) runs
# A fixed schedule is a list of full steps to the wrapper (tests/test_contract.py runs them all); the
# adaptive one refreshes per sample, so rows hold different histories.
SCHEDULES = {"uniform": dict(cache_schedule="uniform", cache_interval=2),
             "adaptive": dict(cache_schedule="adaptive", cache_budget=0.6)}
THRESHOLDS = {"unet": 0.05, "dit": 0.1}  # where the guided batch's samples part ways at 14 steps (asserted below)
# A rule's weighted sum runs over a batch in the cache and over one row by hand; DiCache's means reduce
# in another order, Spectrum's weights are solved in float64 either way.
TOL = dict(rtol=1e-5, atol=1e-5)

needs_weights = pytest.mark.skipif(not all((WEIGHTS / n / "model.safetensors").exists() for n in NETWORKS),
                                   reason="the shipped digits models are absent")


@pytest.fixture(scope="module", params=NETWORKS)
def pipe(request):
    return minidiff.load(WEIGHTS / request.param)


def _noise(batch, seed=0):
    return torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def _rule(name, times, values, t, probes, probe, recent):
    """The rule called directly, at the settings forecasters.Rule documents."""
    if name == "foca":
        return foca(times, values, t, recent)
    if name == "hermite":
        return hermite(times, values, t, order=1, scale=0.5)
    if name == "chebyshev":
        return chebyshev(times, values, t, (999, 0))
    return dicache(values, probes, probe)


@torch.inference_mode()
def _hand_driven(pipe, name, noise, labels, full_steps_per_sample):
    """Guided DDIM over the three primitives; each row (uncond and cond half apart) keeps its own lists of
    full-step timesteps, deep features and cut features, and FoCa's window of its last two values."""
    net, samples = pipe.denoiser, noise.shape[0]
    cond = torch.as_tensor(labels)
    cond = torch.cat([torch.full_like(cond, pipe.null_class), cond])
    times, values, probes, recent = {}, {}, {}, {}
    step = [0]

    def model(x, t):
        x_in = torch.cat([x, x])
        refresh = torch.tensor([step[0] in full_steps_per_sample[s] for s in range(samples)]).repeat(2)
        step[0] += 1
        t_ = float(t)
        state = net.forward_cut(x_in, t, cond, branch=BRANCH)
        fresh, stale = refresh.nonzero().flatten(), (~refresh).nonzero().flatten()
        out = torch.empty_like(x_in)
        if len(stale):
            hidden = torch.cat([_rule(name, times[r], values[r], t_, probes[r], state.h[r:r + 1], recent[r])
                                for r in stale.tolist()])
            out[stale] = net.forward_from_cache(state.rows(stale), hidden)
            for i, r in enumerate(stale.tolist()):
                recent[r] = (recent[r] + [(t_, hidden[i:i + 1])])[-2:]
        if len(fresh):
            out[fresh], cache = net.forward_rest(state.rows(fresh))
            for i, r in enumerate(fresh.tolist()):
                value = cache.hidden[i:i + 1]
                for store, item in ((times, t_), (values, value), (probes, state.h[r:r + 1])):
                    store.setdefault(r, []).append(item)
                recent[r] = (recent.get(r, []) + [(t_, value)])[-2:]
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + GUIDANCE * (out_cond - out_uncond)

    return SAMPLERS["ddim"](model, noise.clone(), pipe.scheduler, STEPS, progress=False)


def _run(pipe, name, schedule, noise, labels):
    options = dict(SCHEDULES[schedule])
    if schedule == "adaptive":
        options["cache_threshold"] = THRESHOLDS[pipe.denoiser_kind]
    return pipe.generate(steps=STEPS, noise=noise, class_labels=labels, guidance_scale=GUIDANCE, output="latent",
                         progress=False, cache_forecast=name, cache_branch=BRANCH, **options)


@needs_weights
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", NAMES)
def test_each_named_forecaster_equals_its_rule_driven_by_hand(pipe, name, schedule):
    noise, labels = _noise(3), [4, 7, 1]
    cached = _run(pipe, name, schedule, noise, labels)
    run = pipe.last_run
    per_sample = run.full_steps_per_sample
    assert run.forecast == name and run.shallow_calls > 0
    if schedule == "adaptive":
        assert run.mac_fraction <= 0.6 + 1e-12
        assert len({tuple(s) for s in per_sample}) > 1  # rows with different histories: forecast group by group
    else:
        assert len(per_sample[0]) >= 5  # enough full steps for every rule's whole form
    torch.testing.assert_close(cached, _hand_driven(pipe, name, noise, labels, per_sample), **TOL)
    if schedule == "uniform":  # and the rule is not reuse: the same schedule with cache_forecast=0 differs
        assert not torch.allclose(cached, _run(pipe, 0, schedule, noise, labels), **TOL)


# -- sequences a rule reproduces exactly --------------------------------------------------------------

class LineNet:
    """A stand-in network whose deep feature and cut feature are lines in t, the same for any x:
    forecasting them exactly makes a cached run equal the uncached one."""

    num_train_timesteps = 1000

    def __init__(self, batch, slope):
        g = torch.Generator().manual_seed(3)
        self.base, self.rate = torch.randn(2, batch, 1, 4, 4, generator=g)
        self.rate = self.rate * slope
        self.probe_rate = torch.randn(batch, 5, generator=g)

    def forward_cut(self, x, t, cond=None, *, branch=0):
        s = float(t) / 1000
        return CutState(branch, 1 + self.probe_rate * s, [x], torch.full((x.shape[0],), s))

    def forward_rest(self, state):
        hidden = self.base + self.rate * state.cond[:, None, None, None]
        return self.forward_from_cache(state, hidden), FeatureCache(state.branch, hidden)

    def forward_from_cache(self, state, hidden):
        return 0.5 * state.skips[0] + hidden

    def __call__(self, x, t, cond=None):
        return self.forward_rest(self.forward_cut(x, t, cond))[0]


def _line_run(net, forecast, steps, every=False):
    """DDIM over `net`, full at steps 0, 1, 3, 5, ...: with one full step every rule can only reuse,
    with two it knows a line."""
    x = _noise(2)[:, :, :4, :4]
    full = list(range(steps)) if every else [0, 1, *range(3, steps, 2)]
    model = CachedModel(net, FixedSchedule(steps, full), forecast=forecast, samples=2)
    return SAMPLERS["ddim"](model, x, SchedulerConfig(), steps, progress=False)


@pytest.mark.parametrize("forecast, slope, steps", [
    *[(name, 0.0, 12) for name in ("foca", "hermite", "dicache")],  # a constant (the probe moves): kept
    ("chebyshev", 0.0, 8), ("chebyshev", 1.0, 8),  # 5 full steps: Spectrum's linear part until its fit starts
    ("foca", 1.0, 12),  # a line: exact once its window starts from two exact values
    (1, 1.0, 12), (2, 1.0, 12)])
def test_a_rule_on_a_sequence_it_reproduces_gives_the_uncached_run(forecast, slope, steps):
    net = LineNet(2, slope)
    uncached = _line_run(net, 0, steps, every=True)
    torch.testing.assert_close(_line_run(net, forecast, steps), uncached, rtol=1e-5, atol=1e-5)
    if slope:  # the line is steep enough that reusing it is visibly off
        assert not torch.allclose(_line_run(net, 0, steps), uncached, rtol=1e-3, atol=1e-3)


def test_hermite_and_chebyshev_do_not_reproduce_a_line():
    """What their docstrings say they miss: HiCache damps the slope by 2 s^2 = 1/2; Spectrum's ridge fit
    (from 5 full steps on) shrinks every coefficient."""
    net = LineNet(2, 1.0)
    uncached = _line_run(net, 0, 12, every=True)
    for name in ("hermite", "chebyshev"):
        assert not torch.allclose(_line_run(net, name, 12), uncached, rtol=1e-3, atol=1e-3)


def test_chebyshev_needs_the_noise_schedules_length():
    with pytest.raises(ValueError, match="chebyshev forecast .* needs its length"):
        make_forecaster("chebyshev", None)


# -- refused -------------------------------------------------------------------------------------------

@needs_weights
def test_a_bad_cache_forecast_is_refused_in_one_line_naming_the_choices():
    pipe = minidiff.load(WEIGHTS / "digits-cond")
    for bad in ["taylorseer", "FoCa", 3, -1, True, 1.0, "1"]:
        with pytest.raises(ValueError) as error:
            pipe.generate(steps=4, class_labels=[0], cache_interval=2, cache_forecast=bad, progress=False)
        message = str(error.value)
        assert "\n" not in message and message.startswith("cache_forecast must be one of 0, 1, 2, 'auto', 'foca', "
                                                          "'hermite', 'chebyshev', 'dicache'")
        assert message.endswith(f"got {bad!r}")


@needs_weights
def test_the_cli_takes_the_names_and_refuses_others_in_one_line(tmp_path, capsys):
    model = str(WEIGHTS / "digits-cond")
    with pytest.raises(SystemExit) as stop:
        cli.main(["sample", "--model", model, "--cache-forecast", "taylorseer"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert "--cache-forecast: invalid choice: 'taylorseer' (choose from 0, 1, 2, 'auto', 'foca', 'hermite', " \
           "'chebyshev', 'dicache')" in err
    out = tmp_path / "dicache.png"
    assert cli.main(["sample", "--model", model, "--steps", "6", "--cache-interval", "2", "--cache-forecast", "dicache",
                     "--batch-size", "2", "--out", str(out), "--threads", "1"]) == 0
    assert out.exists() and "forecast dicache" in capsys.readouterr().out


# -- the planner ---------------------------------------------------------------------------------------

def test_the_planner_may_try_the_names_and_keeps_its_default_set():
    from dataclasses import asdict

    from minidiff import planner

    assert planner.Grid().forecasts == (0, 2)  # shipped plans are measured as before
    assert planner.parse_forecasts("0, 2,foca,dicache,foca") == (0, 2, "foca", "dicache")
    for bad in ("0,taylorseer", "auto", "3", "0,,2"):
        with pytest.raises(ValueError, match=r"^--forecasts must be a comma-separated list of 0, 1, 2, foca, "
                                             r"hermite, chebyshev, dicache, got"):
            planner.parse_forecasts(bad)
    grid = planner.Grid(fewer_steps=(), cached_steps=(), intervals=(3,), forecasts=(0, "hermite"), deep_branches=())
    configs = planner.grid_configs(grid, 20, num_branches=2, adaptive=False)
    assert configs == [planner.Config(20), planner.Config(20, "uniform", 3, 0, 0),
                       planner.Config(20, "uniform", 3, 0, "hermite")]
    assert planner.Config.from_dict(asdict(configs[-1])) == configs[-1]  # as plan.json stores it
    assert configs[-1].kwargs("ddim")["cache_forecast"] == "hermite"
    with pytest.raises(ValueError, match="bad planned configuration"):
        planner.Config.from_dict(dict(steps=20, kind="uniform", interval=3, forecast="auto"))
