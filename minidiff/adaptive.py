"""Refresh the deep feature when a sample's own features say the cache is stale, on a MAC budget.

Every step runs the layers before the cut first (`forward_cut`): both a full and a shallow step
need them. The feature at the cut is then compared with what that sample's history predicts for
it (the forecast of the cut feature through the last full steps, the same forecast the deep
feature gets). A sample whose prediction is off by more than `threshold` (relative L1) refreshes:
its rows continue into the deep part from the cut, nothing recomputed. The others decode with
their cached or forecast deep feature. Both sub-batches run in the same call. `AdaptiveSchedule`
makes these decisions; `cached_model.CachedModel` runs them, as it runs a fixed schedule.

Decisions are per sample, never across samples: a signal compares a row only with that row's own
history. With guidance the batch is [uncond; cond]; a sample's two rows are decided together
from the larger of their two signals, so the halves stay in step without being compared.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from .cached_model import CachedModel
from .forecast import History, check_order

SIGNALS = ("forecast", "change")
# Chosen on the shipped digits model, DDIM 50, branch 0, calibration seeds 11-13 (docs/adaptive.md);
# the signal is a relative error, but how much of it a model tolerates is the model's own.
DEFAULT_THRESHOLD = 0.03


def relative_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row: mean |a - b| / mean |b|."""
    dims = tuple(range(1, a.ndim))  # no flatten: it would copy a channels-last tensor
    return (a - b).abs().mean(dims) / b.abs().mean(dims).clamp_min(1e-12)


def full_step_allowance(budget: float, num_steps: int, shallow_ratio: float) -> int:
    """How many full steps a sample may run when every step costs at least a shallow step and the
    run may cost `budget` (in (0, 1], checked by cache.CacheOptions) x the MACs of the uncached run."""
    allowed = math.floor(num_steps * (budget - shallow_ratio) / (1 - shallow_ratio) + 1e-9)
    if allowed < 1:
        least = (1 + (num_steps - 1) * shallow_ratio) / num_steps
        raise ValueError(f"cache_budget={budget} cannot pay for one full step and {num_steps - 1} shallow steps; "
                         f"the least this branch allows is {least:.3f}")
    return min(allowed, num_steps)


class Pacer:
    """Spreads a sample's full-step allowance over the run, letting its signal move refreshes.

    Credit accrues evenly (the allowance after step 0 over the remaining steps), starting from
    `start` (half a step: the first refresh may come half a gap early). A sample refreshes when its
    signal crosses the threshold and it has credit for one more step, or when unspent credit reaches
    `slack` + 1 steps (spend it or lose it; the slack shrinks to 0 towards the end of the run). The
    allowance is a hard cap. `start` and `slack` were chosen on the shipped model's calibration
    seeds (docs/adaptive.md).
    """

    def __init__(self, samples: int, num_steps: int, allowed: Optional[int], slack: float = 1.0,
                 start: float = 0.5):
        self.allowed, self.slack = allowed, slack
        self.rate = 0.0 if allowed is None else (allowed - 1) / max(num_steps - 1, 1)
        self.steps_left = num_steps - 1
        self.credit = torch.full((samples,), float(start), dtype=torch.float64)
        self.spent = torch.zeros(samples, dtype=torch.long)

    def decide(self, wants: torch.Tensor) -> torch.Tensor:
        """Which samples refresh this step (not step 0), given where the signal says so."""
        if self.allowed is None:
            return wants
        self.credit += self.rate
        self.steps_left -= 1
        # the reserve shrinks to nothing as the run ends, so no credit is left unspent
        due = self.credit >= 1 + min(self.slack, self.rate * self.steps_left) - 1e-9
        go = ((wants & (self.credit >= 1 - 1e-9)) | due) & (self.spent < self.allowed)
        self.credit[go] -= 1
        return go

    def record(self, refreshed: torch.Tensor):
        self.spent += refreshed.long()


class AdaptiveSchedule:
    """The decider of `CachedModel` that refreshes a sample when its feature at the cut strays.

    `samples`: how many samples the batch holds (a guided batch has two rows per sample).
    `threshold`: the relative-L1 signal above which a sample refreshes (None: DEFAULT_THRESHOLD).
    `allowed`: the most full steps a sample may run (`full_step_allowance` of a MAC budget; None: no cap).
    `order`: the order of the cut feature's forecast (the deep feature's own).
    `signal`: "forecast" compares the cut feature with its forecast, "change" with its value at the
    last full step (FirstBlockCache's signal).
    """

    every_step_full = False

    def __init__(self, samples: int, num_steps: int, *, order: int, threshold: Optional[float] = None,
                 allowed: Optional[int] = None, signal: str = "forecast", slack: float = 1.0):
        if signal not in SIGNALS:
            raise ValueError(f"unknown adaptive signal {signal!r}; use one of {SIGNALS}")
        self.samples = samples
        self.threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
        self.pacer = Pacer(samples, num_steps, allowed, slack)
        self.cut = History(order if signal == "forecast" else 0)
        self.signals = []  # per step: (samples,) signal, NaN where there was nothing to compare with

    def decide(self, step: int, t: float, feature: torch.Tensor, samples: int, first: bool) -> torch.Tensor:
        """Which samples refresh at this step, from their feature at the cut (all of them first)."""
        if first:
            refresh = torch.ones(samples, dtype=torch.bool)
            self.signals.append(torch.full((samples,), float("nan")))
        else:
            signal = relative_l1(feature, self.cut.forecast(None, t)).float().cpu()
            signal = signal.view(-1, samples).amax(0)  # a sample's rows decide together
            self.signals.append(signal)
            refresh = self.pacer.decide(signal > self.threshold)
        self.pacer.record(refresh)
        return refresh

    def refreshed(self, rows: torch.Tensor, t: float, feature: torch.Tensor, batch: int):
        """Remember the cut feature of the rows that refreshed: the next signals compare with it."""
        self.cut.push(rows, t, feature, batch)


class AdaptiveUNet(CachedModel):
    """Deprecated: `CachedModel(net, AdaptiveSchedule(...))`, as `minidiff.cache.wrap` makes it.

    Kept so old code runs; `full_steps` here means the per-sample lists (`full_steps_per_sample`).
    """

    def __new__(cls, *args, **kwargs):
        warnings.warn("AdaptiveUNet is deprecated: use minidiff.cache.wrap, or CachedModel with an "
                      "AdaptiveSchedule", DeprecationWarning, stacklevel=2)
        return super().__new__(cls)

    def __init__(self, unet, num_steps: int, branch: int, samples: int, *, forecast: int = 2,
                 threshold: Optional[float] = None, budget: Optional[float] = None,
                 shallow_ratio: Optional[float] = None, signal: str = "forecast", slack: float = 1.0):
        if budget is not None and shallow_ratio is None:
            raise ValueError("a cache budget needs shallow_ratio, the MACs of a shallow step over a full one "
                             "(minidiff.cache.shallow_ratio counts them)")
        unet.check_branch(branch)
        order = check_order(forecast)
        allowed = None if budget is None else full_step_allowance(budget, num_steps, shallow_ratio)
        decider = AdaptiveSchedule(samples, num_steps, order=order, threshold=threshold, allowed=allowed,
                                   signal=signal, slack=slack)
        super().__init__(unet, decider, branch=branch, forecast=order, samples=samples)

    @property
    def full_steps(self) -> list:
        return self.full_steps_per_sample

    @property
    def pacer(self) -> Pacer:
        return self.decider.pacer

    @property
    def signals(self) -> list:
        return self.decider.signals
