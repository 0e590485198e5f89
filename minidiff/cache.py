"""Which model calls run the whole U-Net, and the wrapper that runs a U-Net by that plan.

A schedule is the sorted list of model-call indices that run in full; every other call runs the
shallow path and reuses the deep feature of the last full call. Here a "call" is one U-Net
evaluation: a sampler's step, except that PLMS makes one call more than it has steps
(`samplers.num_model_calls`). The schedules are uniform, non-uniform, explicit, or calibrated from
a measurement (`calibration.calibrate` writes the file this module reads). Samplers never see any
of this: `CachedUNet` is a plain `(x, t, cond) -> output` callable. "Full step s" below means
"full call s", the name `RunStats.full_steps` and `cache_schedule` lists already use.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .checkpoint import save_json
from .forecast import History, check_order
from .denoiser import FeatureCache
from .unet import UNet

CALIBRATION_FORMAT = "minidiff-calibration"
CALIBRATION_VERSION = 1


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


def make_schedule(kind, num_calls: int, interval: int = 1, *, center=None, power: float = 1.4,
                  calibrated: Optional[dict] = None, branch: Optional[int] = None) -> list:
    """Full steps for a named schedule ("uniform", "nonuniform", "calibrated") or an explicit list."""
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
    raise ValueError(f"unknown cache schedule {kind!r}; use 'uniform', 'nonuniform', 'calibrated' or a list of "
                     "full steps")


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
                      "for this setting", UserWarning, stacklevel=4)  # past generate and inference_mode


def calibrated_full_steps(calibration: dict, num_calls: int, interval: int, branch: Optional[int] = None) -> list:
    """ceil(num_calls / interval) full steps (as many as uniform) chosen to minimise the calibrated cost."""
    if not isinstance(interval, int) or interval < 1:
        raise ValueError(f"cache interval must be an int >= 1, got {interval!r}")
    count = math.ceil(num_calls / interval)
    segments = segment_matrix(calibration, branch, num_calls)
    return list(range(num_calls)) if count >= num_calls else optimal_full_steps(segments, count)


# -- running a schedule ---------------------------------------------------------------------------

class CachedUNet:
    """`unet` as an `(x, t, cond)` callable that runs full or shallow steps by a schedule.

    The call counter is the step index; one instance serves one sampling run of `num_calls` calls.
    `forecast` = k > 0 extrapolates the deep feature through the last k+1 full steps (minidiff.forecast)
    instead of reusing the last one; the cache then holds k+1 deep features.
    """

    def __init__(self, unet: UNet, num_calls: int, full_steps: Sequence[int], branch: int = 0, forecast: int = 0):
        unet.check_branch(branch)
        self.unet, self.branch = unet, branch
        self.full_steps = frozenset(explicit_schedule(num_calls, full_steps))
        self.every_step_full = len(self.full_steps) == num_calls
        self.cache: Optional[FeatureCache] = None
        self.forecast = check_order(forecast)
        self.history = History(forecast) if forecast else None
        self.calls = self.full_calls = 0

    def __call__(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        step = self.calls
        self.calls += 1
        if self.every_step_full:
            self.full_calls += 1
            return self.unet(x, t, cond)
        if step in self.full_steps or self.cache is None:
            self.full_calls += 1
            out, self.cache = self.unet.forward_full(x, t, cond, branch=self.branch)
            if self.history is not None:
                self.history.push(torch.arange(x.shape[0]), float(t), self.cache.hidden, x.shape[0])
            return out
        if self.history is not None:
            return self.unet.forward_shallow(x, t, cond, cache=FeatureCache(self.branch,
                                                                            self.history.forecast(None, float(t))))
        return self.unet.forward_shallow(x, t, cond, cache=self.cache)

    @property
    def shallow_calls(self) -> int:
        return self.calls - self.full_calls


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
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def mac_bound(full_calls: int, shallow_calls: int, shallow_over_full: float) -> float:
    """Best speedup of a schedule over running every call in full, counting compute only:
    calls / (full + shallow * r), r = shallow MACs / full MACs. Uniform 1:N is mac_bound(1, N - 1, r)."""
    return (full_calls + shallow_calls) / (full_calls + shallow_calls * shallow_over_full)
