"""The one caching wrapper: a network as the `(x, t, cond) -> output` callable a sampler wants, running
each model call in full or shallow, per sample, as its decider says.

A decider answers one question per call: which samples refresh the deep feature now? A fixed
schedule (`cache.FixedSchedule`) answers from a list of full steps, the same for every sample; the
adaptive schedule (`adaptive.AdaptiveSchedule`) answers from each sample's feature at the cut and
a MAC budget. The wrapper does the rest the same way for both, through the network's three
primitives (minidiff.denoiser): the cut, then the deep part for the rows that refresh and the
cached (or forecast) deep feature for the others, and it records every sample's full steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .forecasters import make_forecaster


def mac_fraction(full_steps_per_sample: Sequence[Sequence[int]], calls: int, shallow_ratio: float) -> float:
    """Network MACs spent over those of the uncached run, over all samples: a sample with n full
    calls of `calls` spends (n + (calls - n) r) / calls, r = shallow MACs / full MACs."""
    per_sample = [len(s) for s in full_steps_per_sample]
    if not per_sample or min(per_sample) == calls:
        return 1.0
    return sum(n + (calls - n) * shallow_ratio for n in per_sample) / (len(per_sample) * calls)


@dataclass
class RunStats:
    """What the last `generate` call did: how many full and shallow network calls, and how long.

    full_calls / shallow_calls count network calls; with the adaptive schedule a call can be full for
    some samples and shallow for others, and full_steps_per_sample says which steps each sample ran
    in full (full_steps is then their union).
    """

    steps: int
    model_calls: int
    full_calls: int
    shallow_calls: int
    seconds: float
    full_steps: list = field(default_factory=list)
    full_steps_per_sample: list = field(default_factory=list)
    forecast: object = 0  # the order (0 reuse, 1, 2 Lagrange) or the forecaster's name
    measure_shallow_ratio: Optional[Callable[[], float]] = field(default=None, repr=False)

    @property
    def shallow_ratio(self) -> float:
        """MACs of a shallow step over a full one at this run's branch and size."""
        return self.measure_shallow_ratio() if self.measure_shallow_ratio is not None else 1.0

    @property
    def mac_fraction(self) -> float:
        """Network MACs spent over those of the uncached run, over all samples (forecasting's
        element-wise arithmetic is not counted; it is measured in benchmarks/forecast_overhead.py)."""
        per_sample = self.full_steps_per_sample
        if not per_sample or min(len(s) for s in per_sample) == self.model_calls:
            return 1.0
        return mac_fraction(per_sample, self.model_calls, self.shallow_ratio)


class CachedModel:
    """`net` as an `(x, t, cond)` callable that runs full or shallow steps as `decider` says, per sample.

    The call counter is the step index; one instance serves one sampling run. `samples` is how many
    samples the batch holds (a guided batch has two rows per sample; None: one row each). `forecast`
    = k > 0 extrapolates each sample's deep feature through its last k + 1 full steps
    (minidiff.forecast) instead of reusing the last one; a name in forecasters.NAMES forecasts it by
    that rule from the literature, from each row's own full steps (and, for "dicache", the feature
    at the cut, which every step computes). `cache.wrap` makes it from checked options.
    """

    def __init__(self, net, decider, *, branch: int = 0, forecast: int = 0, samples: Optional[int] = None,
                 measure_shallow_ratio: Optional[Callable[[], float]] = None):
        self.net, self.decider, self.branch, self.samples = net, decider, branch, samples
        self.measure_shallow_ratio = measure_shallow_ratio  # for RunStats.mac_fraction, counted when asked
        self.forecast = forecast
        self.deep = make_forecaster(forecast, getattr(net, "num_train_timesteps", None))
        self.calls = 0
        self.full_steps_per_sample: list = [] if samples is None else [[] for _ in range(samples)]

    @property
    def full_steps(self) -> list:
        """The calls at which any sample ran in full."""
        return sorted(set().union(*map(set, self.full_steps_per_sample)))

    @property
    def full_calls(self) -> int:
        return len(self.full_steps)

    @property
    def shallow_calls(self) -> int:
        return self.calls - self.full_calls

    def __call__(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        step, time_ = self.calls, float(t)
        self.calls += 1
        rows = x.shape[0]
        if self.samples is None:
            self.samples, self.full_steps_per_sample = rows, [[] for _ in range(rows)]
        copies = rows // self.samples
        if rows != copies * self.samples:
            raise ValueError(f"a batch of {rows} rows cannot hold {self.samples} samples (one row each, or two "
                             "with guidance)")
        if self.decider.every_step_full:  # nothing to cache: the plain network
            self._record(torch.ones(self.samples, dtype=torch.bool), step)
            return self.net(x, t, cond)
        state = self.net.forward_cut(x, t, cond, branch=self.branch)
        refresh = self.decider.decide(step, time_, state.h, self.samples, first=self.deep.empty)
        self._record(refresh, step)

        fresh_rows = refresh.repeat(copies).nonzero().flatten().to(x.device)
        if len(fresh_rows) == rows:
            out, cache = self.net.forward_rest(state)
            self.deep.push(fresh_rows, time_, cache.hidden, rows, state.h)
            self.decider.refreshed(fresh_rows, time_, state.h, rows)
            return out
        if len(fresh_rows) == 0:
            return self.net.forward_from_cache(state, self.deep.forecast(None, time_, state.h))
        stale_rows = (~refresh).repeat(copies).nonzero().flatten().to(x.device)
        fresh, stale = state.rows(fresh_rows), state.rows(stale_rows)
        fresh_out, cache = self.net.forward_rest(fresh)
        stale_out = self.net.forward_from_cache(stale, self.deep.forecast(stale_rows, time_, stale.h))
        self.deep.push(fresh_rows, time_, cache.hidden, rows, fresh.h)
        self.decider.refreshed(fresh_rows, time_, state.h[fresh_rows], rows)
        out = fresh_out.new_empty((rows,) + tuple(fresh_out.shape[1:]))
        out[fresh_rows] = fresh_out
        out[stale_rows] = stale_out
        return out

    def _record(self, refresh: torch.Tensor, step: int):
        for s in refresh.nonzero().flatten().tolist():
            self.full_steps_per_sample[s].append(step)

    def run_stats(self, steps: int, seconds: float) -> RunStats:
        """What this run did, for `Pipeline.last_run`."""
        full_steps = self.full_steps
        return RunStats(steps, self.calls, len(full_steps), self.calls - len(full_steps), seconds, full_steps,
                        [list(s) for s in self.full_steps_per_sample], self.forecast, self.measure_shallow_ratio)
