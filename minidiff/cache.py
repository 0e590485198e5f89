"""Every cache option, and which model calls run the whole network.

A schedule is the sorted list of model-call indices that run in full; every other call runs the
shallow path and reuses the deep feature of the last full call. Here a "call" is one network
evaluation: a sampler's step, except that PLMS makes one call more than it has steps
(`samplers.num_model_calls`). The schedules are uniform, non-uniform, explicit, or calibrated from
a measurement (`calibration.calibrate` writes the file this module reads), and the adaptive one
decides per sample at run time (minidiff.adaptive). "Full step s" below means "full call s", the
name `RunStats.full_steps` and `cache_schedule` lists already use.

`CacheOptions` holds the `cache_*` options of `Pipeline.generate`, checked once; `wrap` turns them
into the one wrapper, `cached_model.CachedModel`, with its decider: `FixedSchedule` or
`adaptive.AdaptiveSchedule`. Samplers never see any of this: the wrapper is a plain
`(x, t, cond) -> output` callable.
"""
from __future__ import annotations

import functools
import json
import math
import numbers
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable
from typing import Optional, Sequence

import numpy as np
import torch

from .adaptive import AdaptiveSchedule, full_step_allowance
from .cached_model import CachedModel, RunStats, mac_fraction  # noqa: F401 (the wrapper and its record)
from .writing import save_json
from .forecast import MAX_ORDER, check_order
from .forecasters import NAMES as FORECASTER_NAMES
from .samplers import changed_options, draws_noise

CALIBRATION_FORMAT = "minidiff-calibration"
CALIBRATION_VERSION = 1
SCHEDULES = ("uniform", "nonuniform", "calibrated", "adaptive")  # or an explicit list of full steps
DEFAULT_POWER = 1.4
# Every value of cache_forecast: Lagrange orders (0 reuses), "auto", and the literature's rules (minidiff.forecasters).
FORECASTS = tuple(range(MAX_ORDER + 1)) + ("auto",) + FORECASTER_NAMES


def uniform_schedule(num_calls: int, interval: int) -> list:
    """Full steps 0, N, 2N, ...: ceil(num_calls / N) of them."""
    _check_calls(num_calls)
    if not isinstance(interval, int) or interval < 1:
        raise ValueError(f"cache interval must be an int >= 1, got {interval!r}")
    return list(range(0, num_calls, interval))


def nonuniform_schedule(num_calls: int, interval: int, center: Optional[int] = None, power: float = 1.4) -> list:
    """DeepCache's non-uniform schedule: as many full steps as uniform 1:N, packed around `center`.

    Reproduces the reference `sample_from_quad_center` number for number. Its start point is
    (-center)^(1/p), a complex number; the real part of the re-raised points is truncated, which is
    what concentrates steps near the centre. If the power gives repeated indices it is lowered by
    0.02 until the count fits, as the reference does.
    """
    _check_calls(num_calls)
    if not isinstance(interval, int) or interval < 1:
        raise ValueError(f"cache interval must be an int >= 1, got {interval!r}")
    count = math.ceil(num_calls / interval)
    if count >= num_calls:
        return list(range(num_calls))
    center = num_calls * 3 // 10 if center is None else center
    if not 0 < center < num_calls:
        raise ValueError(f"non-uniform center must lie in (0, {num_calls}), got {center}")
    if not math.isfinite(power) or not 1 < power <= 10:
        raise ValueError(f"non-uniform power must be a number in (1, 10], got {power}")
    while power > 1:
        start, stop = complex(-center) ** (1 / power), complex(num_calls - center) ** (1 / power)
        points = start + (stop - start) * np.arange(count + 1) / count  # linspace, endpoint included
        offsets = np.unique(np.trunc((points ** power).real).astype(np.int64))[1:-1]
        steps = [0] + [int(o) + center for o in offsets]
        if len(steps) == count:
            return sorted(steps)
        power -= 0.02
    raise ValueError(f"no non-uniform schedule of {count} full steps in {num_calls} calls around center "
                     f"{center}; try another center or power")


def explicit_schedule(num_calls: int, full_steps: Sequence[int]) -> list:
    """A given set of full steps; step 0 is always full (there is nothing to reuse before it)."""
    _check_calls(num_calls)
    steps = sorted({int(s) for s in full_steps})
    if any(s < 0 or s >= num_calls for s in steps):
        raise ValueError(f"full steps must lie in [0, {num_calls - 1}], got {steps}")
    if not steps or steps[0] != 0:
        steps = [0] + steps
    return steps


def _check_calls(num_calls):
    if not isinstance(num_calls, int) or num_calls < 1:
        raise ValueError(f"the number of steps (model calls) must be an int >= 1, got {num_calls!r}")


def make_schedule(kind, num_calls: int, interval: int = 1, *, center=None, power: float = DEFAULT_POWER,
                  calibrated: Optional[dict] = None, branch: Optional[int] = None) -> list:
    """Full steps for a fixed schedule ("uniform", "nonuniform", "calibrated") or an explicit list."""
    if not isinstance(kind, str):
        return explicit_schedule(num_calls, kind)
    if kind == "uniform":
        return uniform_schedule(num_calls, interval)
    if kind in ("nonuniform", "non-uniform"):
        return nonuniform_schedule(num_calls, interval, center, power)
    if kind == "calibrated":
        if calibrated is None:
            raise ValueError("this model has no calibrated cache schedule; run `minidiff analyze calibrate` first")
        return calibrated_full_steps(calibrated, num_calls, interval, branch)
    if kind == "adaptive":
        raise ValueError("the adaptive cache schedule decides at run time; it has no list of full steps")
    raise ValueError(_unknown_schedule(kind))


def _unknown_schedule(kind) -> str:
    return f"unknown cache schedule {kind!r}; use {', '.join(map(repr, SCHEDULES))} or a list of full steps"


# -- calibrated schedules ------------------------------------------------------------------------

# A schedule is judged segment by segment: full step s followed by the next full step e means
# steps s+1 .. e-1 reuse the deep feature cached at s. segments[s, e] (e > s) is what that costs;
# entries with e <= s are 0 (an empty segment costs nothing).

def optimal_full_steps(segments: np.ndarray, count: int) -> list:
    """The `count` full steps (step 0 among them) whose segments cost least in total.

    `segments` is (S, S + 1): segments[s, e] is the cost of full step s serving steps s .. e-1.
    A dynamic programme over (segments used, steps covered) finds the exact minimum in O(count S^2).
    """
    segments = np.asarray(segments, dtype=np.float64)
    s = segments.shape[0]
    if segments.shape != (s, s + 1):
        raise ValueError(f"segment costs must have shape (steps, steps + 1), got {segments.shape}")
    if not isinstance(count, int) or not 1 <= count <= s:
        raise ValueError(f"the number of full steps must be an int in [1, {s}], got {count!r}")
    best = np.full((count + 1, s + 1), np.inf)  # best[k, e]: steps 0 .. e-1 served by k segments
    choice = np.zeros((count + 1, s + 1), dtype=np.int64)
    best[1, 1:] = segments[0, 1:]
    for k in range(2, count + 1):
        for e in range(k, s + 1):
            starts = np.arange(k - 1, e)
            totals = best[k - 1, starts] + segments[starts, e]
            i = int(np.argmin(totals))
            best[k, e], choice[k, e] = totals[i], starts[i]
    steps, e = [], s
    for k in range(count, 1, -1):
        e = int(choice[k, e])
        steps.append(e)
    return [0] + sorted(steps)


def schedule_cost(segments: np.ndarray, full_steps: Sequence[int]) -> float:
    """The total `optimal_full_steps` minimises, for a given schedule."""
    bounds = list(full_steps) + [len(segments)]
    return float(sum(segments[a, e] for a, e in zip(bounds, bounds[1:])))


def pack_segments(segments: np.ndarray) -> list:
    """Row s holds segments[s, s+1 .. S], at 4 significant digits."""
    return [[float(f"{v:.4g}") for v in segments[s, s + 1:]] for s in range(segments.shape[0])]


def unpack_segments(rows: list) -> np.ndarray:
    size = len(rows)
    segments = np.zeros((size, size + 1))
    for s, row in enumerate(rows):
        if len(row) != size - s:
            raise ValueError(f"calibration row {s} has {len(row)} segment costs, expected {size - s}; the file is "
                             "damaged: run `minidiff analyze calibrate --overwrite` again")
        segments[s, s + 1:] = row
    return segments


def segment_matrix(calibration: dict, branch: Optional[int] = None, num_calls: Optional[int] = None) -> np.ndarray:
    """The calibrated (S, S + 1) segment costs for `branch`, resampled to `num_calls` model calls if given."""
    if not isinstance(calibration, dict) or calibration.get("format") != CALIBRATION_FORMAT:
        raise ValueError("this is not a minidiff calibration (calibration.json); make one with "
                         "`minidiff analyze calibrate --model DIR`")
    if calibration.get("version") != CALIBRATION_VERSION:
        raise ValueError(f"calibration version {calibration.get('version')!r} is not supported (expected "
                         f"{CALIBRATION_VERSION}); run `minidiff analyze calibrate --overwrite` again")
    branch = calibration["branch"] if branch is None else branch
    measured = calibration["segments"]
    if str(branch) not in measured:
        raise ValueError(f"the calibration covers branches {sorted(int(b) for b in measured)}, not {branch}; run "
                         f"`minidiff analyze calibrate --branches {branch} ...` to add it")
    segments = unpack_segments(measured[str(branch)])
    return segments if num_calls is None or num_calls == len(segments) else resample_segments(segments, num_calls)


def resample_segments(segments: np.ndarray, num_calls: int) -> np.ndarray:
    """Bilinear resampling of segment costs to another number of steps over the same time span.

    Segment boundaries b = 0 .. S sit at fraction b / S of the way through sampling; a segment of the
    new run is read off the calibrated costs between the same fractions.
    """
    size = len(segments)
    starts, ends = np.arange(num_calls) * size / num_calls, np.arange(num_calls + 1) * size / num_calls
    by_start = np.stack([np.interp(starts, np.arange(size), column) for column in segments.T], axis=1)
    out = np.stack([np.interp(ends, np.arange(size + 1), row) for row in by_start])  # (num_calls, num_calls + 1)
    return np.triu(out, 1)


def check_calibration(calibration: dict, sampler: str, options: dict, num_calls: int, steps: Optional[int] = None):
    """A calibration is per sampler and step count. Another sampler or other sampler options (as
    `samplers.changed_options` gives them, e.g. {"eta": 0.5}) is refused: the costs describe another run.
    Another number of model calls over the same sampler is resampled (`resample_segments`) with a
    warning, since the chosen steps then come from interpolated, not measured, costs."""
    measured = calibration.get("sampler", sampler)
    measured_options = calibration.get("sampler_options", {})
    if measured != sampler or measured_options != options:
        def described(name, opts):
            return name + "".join(f", {k}={v}" for k, v in sorted(opts.items()))
        raise ValueError(f"this model's cache calibration was measured with the {described(measured, measured_options)} "
                         f"sampler, not {described(sampler, options)}; calibrate again with `minidiff analyze "
                         f"calibrate --sampler {sampler}` or use another cache schedule")
    calls = calibration.get("model_calls", num_calls)
    if calls != num_calls:
        asked = f"{steps} steps, " if steps is not None else ""
        warnings.warn(f"the cache calibration was measured over {calls} model calls ({sampler}, "
                      f"{calibration.get('steps')} steps) but this run makes {num_calls} ({asked}{sampler}): its costs "
                      f"are resampled to {num_calls} calls, so the calibrated full steps are interpolated, not "
                      f"measured; run `minidiff analyze calibrate --sampler {sampler} --steps {steps or num_calls}` "
                      "for this setting", UserWarning, stacklevel=5)  # past wrap, generate and inference_mode


def calibrated_full_steps(calibration: dict, num_calls: int, interval: int, branch: Optional[int] = None) -> list:
    """ceil(num_calls / interval) full steps (as many as uniform) chosen to minimise the calibrated cost."""
    if not isinstance(interval, int) or interval < 1:
        raise ValueError(f"cache interval must be an int >= 1, got {interval!r}")
    count = math.ceil(num_calls / interval)
    segments = segment_matrix(calibration, branch, num_calls)
    return list(range(num_calls)) if count >= num_calls else optimal_full_steps(segments, count)


# -- running a schedule ---------------------------------------------------------------------------

class FixedSchedule:
    """The decider of `CachedModel` for a list of full steps, the same for every sample."""

    def __init__(self, num_calls: int, full_steps: Sequence[int]):
        self.full_steps = explicit_schedule(num_calls, full_steps)
        self._full = frozenset(self.full_steps)
        self.every_step_full = len(self.full_steps) == num_calls

    def decide(self, step: int, t: float, feature: torch.Tensor, samples: int, first: bool) -> torch.Tensor:
        """Every sample refreshes at a listed step (and at the first, with nothing cached yet)."""
        return torch.full((samples,), first or step in self._full, dtype=torch.bool)

    def refreshed(self, rows: torch.Tensor, t: float, feature: torch.Tensor, batch: int):
        """A fixed schedule learns nothing from a refresh."""


class CachedUNet(CachedModel):
    """Deprecated: `CachedModel(net, FixedSchedule(num_calls, full_steps))`, as `wrap` makes it.

    Kept so old code runs; `full_steps` here means the schedule, as a frozenset.
    """

    def __new__(cls, *args, **kwargs):
        warnings.warn("CachedUNet is deprecated: use minidiff.cache.wrap, or CachedModel with a FixedSchedule",
                      DeprecationWarning, stacklevel=2)
        return super().__new__(cls)

    def __init__(self, unet, num_calls: int, full_steps: Sequence[int], branch: int = 0, forecast: int = 0):
        unet.check_branch(branch)
        super().__init__(unet, FixedSchedule(num_calls, full_steps), branch=branch, forecast=check_order(forecast))

    @property
    def full_steps(self) -> frozenset:
        return frozenset(self.decider.full_steps)


# -- the options ------------------------------------------------------------------------------------

_APPLIES = {  # option: (its default, the schedules it shapes, why it is refused elsewhere)
    "interval": (1, ("uniform", "nonuniform", "calibrated"),
                 "cache_interval spaces the full steps of the uniform, nonuniform and calibrated schedules"),
    "center": (None, ("nonuniform",), "cache_center and cache_power shape the nonuniform schedule only"),
    "power": (DEFAULT_POWER, ("nonuniform",), "cache_center and cache_power shape the nonuniform schedule only"),
    "threshold": (None, ("adaptive",), "cache_threshold and cache_budget apply to cache_schedule='adaptive' only"),
    "budget": (None, ("adaptive",), "cache_threshold and cache_budget apply to cache_schedule='adaptive' only"),
}


@dataclass
class CacheOptions:
    """Every `cache_*` option of `Pipeline.generate`, checked once, on construction: each in range,
    and none that the chosen schedule would ignore (an option left at its default is not counted;
    an interval next to an explicit list, which often made it, is only warned about).

    `forecast`: one of FORECASTS: 0 (reuse), 1, 2 (Lagrange extrapolation), "auto" (2 for
    deterministic samplers, 0 for noisy ones), a rule from the literature ("foca", "hermite",
    "chebyshev", "dicache": minidiff.forecasters), or None (0 for the fixed schedules, "auto" for
    the adaptive one). With a named rule the adaptive schedule's signal still compares the cut
    feature with its Lagrange forecast of the "auto" order: the rule forecasts the deep feature only.
    """

    schedule: object = "uniform"
    interval: int = 1
    branch: int = 0
    center: Optional[int] = None
    power: float = DEFAULT_POWER
    forecast: object = None
    threshold: Optional[float] = None
    budget: Optional[float] = None

    def __post_init__(self):
        self._check_values()
        self._check_applies()

    def _check_values(self):
        schedule = self.schedule
        if isinstance(schedule, str):
            if schedule not in SCHEDULES and schedule != "non-uniform":
                raise ValueError(_unknown_schedule(schedule))
        elif not (isinstance(schedule, Iterable)
                  and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in schedule)):
            raise ValueError(f"cache_schedule must be one of {', '.join(map(repr, SCHEDULES))} or a list of full "
                             f"steps (ints), got {schedule!r}")
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or not 1 <= self.interval <= 10_000:
            raise ValueError(f"cache_interval must be an int in [1, 10000], got {self.interval!r}")
        if self.center is not None and (isinstance(self.center, bool) or not isinstance(self.center, int)):
            raise ValueError(f"cache_center (of the non-uniform cache schedule) must be an int, got {self.center!r}")
        if isinstance(self.power, bool) or not isinstance(self.power, (int, float)) or not 1.0 < self.power <= 10.0:
            raise ValueError(f"cache_power (of the non-uniform cache schedule) must be a number in (1, 10], got "
                             f"{self.power!r}")  # the search steps it down by 0.02
        if self.forecast is not None:
            check_forecast(self.forecast)
        threshold, budget = self.threshold, self.budget
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not 0 <= threshold < math.inf):
            raise ValueError(f"cache_threshold must be a number >= 0 (a relative L1 change), got {threshold!r}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not 0 < budget <= 1):
            raise ValueError(f"cache_budget must be a fraction of the uncached run's MACs in (0, 1], got {budget!r}")

    def _check_applies(self):
        """Refuse, by name, an option the chosen schedule would silently ignore."""
        listed = not isinstance(self.schedule, str)
        kind = "list" if listed else self.schedule.replace("non-uniform", "nonuniform")
        ignored = [name for name, (default, kinds, _) in _APPLIES.items()
                   if getattr(self, name) != default and kind not in kinds]
        if listed and "interval" in ignored:  # often the interval the list was made with: warned about only
            ignored.remove("interval")
            warnings.warn(f"cache_interval={self.interval} does not apply to an explicit list of full steps, which "
                          "names them itself; it is ignored", UserWarning, stacklevel=7)  # past wrap and generate
        if ignored:
            where = "an explicit list of full steps" if listed else f"cache_schedule={self.schedule!r}"
            named = " and ".join(f"cache_{name}={getattr(self, name)!r}" for name in ignored)
            reasons = "; ".join(dict.fromkeys(_APPLIES[name][2] for name in ignored))
            raise ValueError(f"{named} {'does' if len(ignored) == 1 else 'do'} not apply to {where}: {reasons}")

    @property
    def adaptive(self) -> bool:
        return self.schedule == "adaptive"

    def forecast_order(self, sampler: str, eta: float = 0.0):
        """The forecast this run uses, an order or a rule's name: "auto" (and None for the adaptive
        schedule) means `auto_order`."""
        if self.forecast == "auto" or (self.forecast is None and self.adaptive):
            return auto_order(sampler, eta)
        return self.forecast or 0


def auto_order(sampler: str, eta: float = 0.0) -> int:
    """2, or 0 where the sampler injects noise, which makes extrapolation worse than reuse (docs/adaptive.md)."""
    return 0 if draws_noise(sampler, eta=eta) else 2


def check_forecast(forecast):
    """`forecast` if it is one of FORECASTS (an int order, not a bool or a float), else a one-line error."""
    if (type(forecast) is int and forecast in FORECASTS) or (type(forecast) is str and forecast in FORECASTS):
        return forecast
    raise ValueError(f"cache_forecast must be one of {', '.join(map(repr, FORECASTS))} (0 reuses the cached deep "
                     f"feature, 1 and 2 extrapolate it linearly or quadratically, the names are forecasters from the "
                     f"literature: docs/adaptive.md), got {forecast!r}")


def wrap(net, *, calls: int, x: torch.Tensor, cond=None, sampler: str = "ddim",
         sampler_options: Optional[dict] = None, steps: Optional[int] = None, calibration: Optional[dict] = None,
         calibration_error: Optional[str] = None, schedule="uniform", interval: int = 1, branch: int = 0,
         center: Optional[int] = None, power: float = DEFAULT_POWER, forecast=None,
         threshold: Optional[float] = None, budget: Optional[float] = None) -> CachedModel:
    """The wrapper for one run of `calls` model calls from `x` (the batch, one row per sample): the
    decider of the cache options (`CacheOptions`, checked here, once) around `net`. A calibrated
    schedule is checked against the run's sampler here too."""
    options = CacheOptions(schedule, interval, branch, center, power, forecast, threshold, budget)
    net.check_branch(options.branch, "cache_branch")
    sampler_options = sampler_options or {}
    forecast = options.forecast_order(sampler, sampler_options.get("eta", 0.0))
    # the adaptive signal forecasts the cut feature by Lagrange: of the run's order, or "auto"'s beside a named rule
    order = forecast if isinstance(forecast, int) else auto_order(sampler, sampler_options.get("eta", 0.0))
    if options.adaptive:
        ratio = shallow_ratio(net, options.branch, x, cond) if options.budget is not None else None
        allowed = None if ratio is None else full_step_allowance(options.budget, calls, ratio)
        decider = AdaptiveSchedule(x.shape[0], calls, order=order, threshold=options.threshold, allowed=allowed)
    else:
        if options.schedule == "calibrated":
            if calibration is None and calibration_error:
                raise ValueError(calibration_error)
            if isinstance(calibration, dict):
                check_calibration(calibration, sampler, changed_options(sampler_options), calls, steps)
        full_steps = make_schedule(options.schedule, calls, options.interval, center=options.center,
                                   power=options.power, calibrated=calibration, branch=options.branch)
        decider = FixedSchedule(calls, full_steps)
    return CachedModel(net, decider, branch=options.branch, forecast=forecast, samples=x.shape[0],
                       measure_shallow_ratio=functools.partial(shallow_ratio, net, options.branch, x, cond))


_SHALLOW_RATIOS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@torch.inference_mode()
def shallow_ratio(net, branch: int, x: torch.Tensor, cond=None) -> float:
    """MACs of a shallow step at `branch` over a full step, for one sample shaped like x[:1]
    (counted once per network, branch, size and kind of conditioning, then remembered)."""
    counted = _SHALLOW_RATIOS.setdefault(net, {})
    key = (branch, tuple(x.shape[1:]), None if cond is None else tuple(cond.shape[1:]))
    if key not in counted:
        macs = net.macs(torch.zeros_like(x[:1]), 500, None if cond is None else cond[:1], branch=branch)
        counted[key] = macs["shallow"] / macs["full"]
    return counted[key]


def save_calibrated(path, schedule: dict):
    save_json(schedule, path)


def load_calibrated(path) -> Optional[dict]:
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} (the calibrated cache schedule) is unreadable: {e}; delete it or rerun "
                         "`minidiff analyze calibrate`") from None
    why = calibration_damage(data)
    if why:
        raise ValueError(f"{path} is damaged ({why}); delete it or rerun `minidiff analyze calibrate --overwrite`")
    return data


def calibration_damage(data) -> Optional[str]:
    """What makes `data` unusable as a calibration (wrong schema, rows of the wrong length, costs that
    are not finite numbers >= 0), or None. A NaN cost would silently pick a nonsense schedule."""
    if not isinstance(data, dict):
        return f"it holds a JSON {type(data).__name__}, not an object"
    if data.get("format") != CALIBRATION_FORMAT or data.get("version") != CALIBRATION_VERSION:
        return (f"format {data.get('format')!r} version {data.get('version')!r}, expected {CALIBRATION_FORMAT!r} "
                f"version {CALIBRATION_VERSION}")
    segments = data.get("segments")
    if not isinstance(segments, dict) or not segments:
        return f"'segments' must map branch numbers to cost rows, got {str(segments)[:40]!r}"
    for branch, rows in segments.items():
        if not (isinstance(branch, str) and branch.isdigit()) or not isinstance(rows, list) or not rows:
            return f"segments[{branch!r}] must be a branch number with a list of cost rows"
        for s, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != len(rows) - s:
                return f"segments[{branch!r}] row {s} must hold {len(rows) - s} costs"
            # >= -1e-6, not 0: a zero cost measured as 1 - cos(h, h) may round to -1e-7
            if not all(type(v) in (int, float) and math.isfinite(v) and v >= -1e-6 for v in row):
                return f"segments[{branch!r}] row {s} holds a cost that is not a finite number >= 0"
    branch = data.get("branch")
    if type(branch) is not int or str(branch) not in segments:
        return f"its default branch {branch!r} is not one of the measured branches {sorted(segments, key=int)}"
    return None


def mac_bound(full_calls: int, shallow_calls: int, shallow_over_full: float) -> float:
    """Best speedup of a schedule over running every call in full, counting compute only:
    calls / (full + shallow * r), r = shallow MACs / full MACs. Uniform 1:N is mac_bound(1, N - 1, r)."""
    return (full_calls + shallow_calls) / (full_calls + shallow_calls * shallow_over_full)
