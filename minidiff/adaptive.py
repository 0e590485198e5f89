"""Refresh the deep feature when a sample's own features say the cache is stale, on a MAC budget.

Every step runs the shallow encoder part, input_blocks[:b + 1], first: both a full and a shallow
step need it. Its last output, the skip feature at the cut, is then compared with what that
sample's history predicts for it (the forecast of the cut feature through the last full steps,
the same forecast the deep feature gets). A sample whose prediction is off by more than
`threshold` (relative L1) refreshes: its rows continue into the deep part from the cut, nothing
recomputed. The others decode with their cached or forecast deep feature. Both sub-batches run
in the same call.

Decisions are per sample, never across samples: a signal compares a row only with that row's own
history. With guidance the batch is [uncond; cond]; a sample's two rows are decided together
from the larger of their two signals, so the halves stay in step without being compared.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .forecast import History, check_order
from .unet import UNet

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
    run may cost `budget` x the MACs of the uncached run."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"cache_budget must be a fraction of the uncached run's MACs in (0, 1], got {budget!r}")
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


class AdaptiveUNet:
    """`unet` as an `(x, t, cond)` callable that decides per sample, at every step, whether to refresh.

    `samples`: how many samples the batch holds (a guided batch has two rows per sample).
    `threshold`: the relative-L1 signal above which a sample refreshes (None: DEFAULT_THRESHOLD).
    `budget`: the most MACs a sample may spend, as a fraction of its uncached run (needs `shallow_ratio`,
    the MACs of a shallow step over a full one).
    `forecast`: the order of the deep-feature forecast (0 = reuse), also used to predict the cut feature.
    `signal`: "forecast" compares the cut feature with its forecast, "change" with its value at the
    last full step (FirstBlockCache's signal).
    """

    def __init__(self, unet: UNet, num_steps: int, branch: int, samples: int, *, forecast: int = 2,
                 threshold: Optional[float] = None, budget: Optional[float] = None,
                 shallow_ratio: Optional[float] = None, signal: str = "forecast", slack: float = 1.0):
        unet.check_branch(branch)
        if budget is not None and shallow_ratio is None:
            raise ValueError("a cache budget needs shallow_ratio, the MACs of a shallow step over a full one "
                             "(Pipeline.shallow_ratio counts them)")
        if signal not in SIGNALS:
            raise ValueError(f"unknown adaptive signal {signal!r}; use one of {SIGNALS}")
        self.unet, self.branch, self.samples, self.num_steps = unet, branch, samples, num_steps
        self.threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
        allowed = None if budget is None else full_step_allowance(budget, num_steps, shallow_ratio)
        self.pacer = Pacer(samples, num_steps, allowed, slack)
        order = check_order(forecast)
        self.deep = History(order)
        self.cut = History(order if signal == "forecast" else 0)
        self.calls = 0
        self.full_steps = [[] for _ in range(samples)]
        self.signals = []  # per step: (samples,) signal, NaN where there was nothing to compare with

    def __call__(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        step, time_ = self.calls, float(t)
        self.calls += 1
        rows = x.shape[0]
        copies = rows // self.samples
        if rows != copies * self.samples:
            raise ValueError(f"a batch of {rows} rows cannot hold {self.samples} samples (one row each, or two "
                             "with guidance)")
        state = self.unet.forward_cut(x, t, cond, branch=self.branch)
        skip = state.skips[-1]
        if self.cut.empty_rows(rows):  # step 0 (or a fresh cache): everyone refreshes
            refresh = torch.ones(self.samples, dtype=torch.bool)
            self.signals.append(torch.full((self.samples,), float("nan")))
        else:
            signal = relative_l1(skip, self.cut.forecast(None, time_)).float().cpu()
            signal = signal.view(copies, self.samples).amax(0)  # a sample's rows decide together
            self.signals.append(signal)
            refresh = self.pacer.decide(signal > self.threshold)
        self.pacer.record(refresh)
        for s in refresh.nonzero().flatten().tolist():
            self.full_steps[s].append(step)

        fresh_rows = refresh.repeat(copies).nonzero().flatten().to(x.device)
        if len(fresh_rows) == rows:
            out, cache = self.unet.forward_rest(state)
            self.deep.push(fresh_rows, time_, cache.hidden, rows)
            self.cut.push(fresh_rows, time_, skip, rows)
            return out
        if len(fresh_rows) == 0:
            return self.unet.forward_from_cache(state, self.deep.forecast(None, time_))
        stale_rows = (~refresh).repeat(copies).nonzero().flatten().to(x.device)
        fresh_out, cache = self.unet.forward_rest(state.rows(fresh_rows))
        stale_out = self.unet.forward_from_cache(state.rows(stale_rows), self.deep.forecast(stale_rows, time_))
        self.deep.push(fresh_rows, time_, cache.hidden, rows)
        self.cut.push(fresh_rows, time_, skip[fresh_rows], rows)
        out = fresh_out.new_empty((rows,) + tuple(fresh_out.shape[1:]))
        out[fresh_rows] = fresh_out
        out[stale_rows] = stale_out
        return out
