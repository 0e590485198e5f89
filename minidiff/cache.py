"""Which denoising steps run the whole U-Net, and the wrapper that runs a U-Net by that plan.

A schedule is the sorted list of step indices (model calls) that run in full; every other step
runs the shallow path and reuses the deep feature of the last full step. Samplers never see any
of this: `CachedUNet` is a plain `(x, t, cond) -> output` callable.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .forecast import History, check_order
from .unet import FeatureCache, UNet


def uniform_schedule(num_steps: int, interval: int) -> list:
    """Full steps 0, N, 2N, ...: ceil(num_steps / N) of them."""
    _check_steps(num_steps)
    if not isinstance(interval, int) or interval < 1:
        raise ValueError(f"cache interval must be an int >= 1, got {interval!r}")
    return list(range(0, num_steps, interval))


def nonuniform_schedule(num_steps: int, interval: int, center: Optional[int] = None, power: float = 1.4) -> list:
    """DeepCache's non-uniform schedule: as many full steps as uniform 1:N, packed around `center`.

    Reproduces the reference `sample_from_quad_center` number for number. Its start point is
    (-center)^(1/p), a complex number; the real part of the re-raised points is truncated, which is
    what concentrates steps near the centre. If the power gives repeated indices it is lowered by
    0.02 until the count fits, as the reference does.
    """
    _check_steps(num_steps)
    if not isinstance(interval, int) or interval < 1:
        raise ValueError(f"cache interval must be an int >= 1, got {interval!r}")
    count = math.ceil(num_steps / interval)
    if count >= num_steps:
        return list(range(num_steps))
    center = num_steps * 3 // 10 if center is None else center
    if not 0 < center < num_steps:
        raise ValueError(f"non-uniform center must lie in (0, {num_steps}), got {center}")
    if not math.isfinite(power) or not 1 < power <= 10:
        raise ValueError(f"non-uniform power must be a number in (1, 10], got {power}")
    while power > 1:
        start, stop = complex(-center) ** (1 / power), complex(num_steps - center) ** (1 / power)
        points = start + (stop - start) * np.arange(count + 1) / count  # linspace, endpoint included
        offsets = np.unique(np.trunc((points ** power).real).astype(np.int64))[1:-1]
        steps = [0] + [int(o) + center for o in offsets]
        if len(steps) == count:
            return sorted(steps)
        power -= 0.02
    raise ValueError(f"no non-uniform schedule of {count} full steps in {num_steps} steps around center "
                     f"{center}; try another center or power")


def explicit_schedule(num_steps: int, full_steps: Sequence[int]) -> list:
    """A given set of full steps; step 0 is always full (there is nothing to reuse before it)."""
    _check_steps(num_steps)
    steps = sorted({int(s) for s in full_steps})
    if any(s < 0 or s >= num_steps for s in steps):
        raise ValueError(f"full steps must lie in [0, {num_steps - 1}], got {steps}")
    if not steps or steps[0] != 0:
        steps = [0] + steps
    return steps


def _check_steps(num_steps):
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"the number of steps must be an int >= 1, got {num_steps!r}")


def make_schedule(kind, num_steps: int, interval: int = 1, *, center=None, power: float = 1.4,
                  calibrated: Optional[dict] = None, branch: Optional[int] = None) -> list:
    """Full steps for a named schedule ("uniform", "nonuniform", "calibrated") or an explicit list."""
    if not isinstance(kind, str):
        return explicit_schedule(num_steps, kind)
    if kind == "uniform":
        return uniform_schedule(num_steps, interval)
    if kind in ("nonuniform", "non-uniform"):
        return nonuniform_schedule(num_steps, interval, center, power)
    if kind == "calibrated":
        if calibrated is None:
            raise ValueError("this model has no calibrated cache schedule; run `minidiff analyze calibrate` first")
        from .analysis import calibrated_full_steps

        return calibrated_full_steps(calibrated, num_steps, interval, branch)
    raise ValueError(f"unknown cache schedule {kind!r}; use 'uniform', 'nonuniform', 'calibrated' or a list of "
                     "full steps")


class CachedUNet:
    """`unet` as an `(x, t, cond)` callable that runs full or shallow steps by a schedule.

    The call counter is the step index; one instance serves one sampling run of `num_steps` calls.
    `forecast` = k > 0 extrapolates the deep feature through the last k+1 full steps (minidiff.forecast)
    instead of reusing the last one; the cache then holds k+1 deep features.
    """

    def __init__(self, unet: UNet, num_steps: int, full_steps: Sequence[int], branch: int = 0, forecast: int = 0):
        unet._check_branch(branch)
        self.unet, self.branch = unet, branch
        self.full_steps = frozenset(explicit_schedule(num_steps, full_steps))
        self.every_step_full = len(self.full_steps) == num_steps
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
    from .checkpoint import save_json

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
