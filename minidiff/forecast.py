"""Forecasting a cached feature from its recent history instead of reusing it stale.

DeepCache reuses the deep feature of the last full step unchanged. TaylorSeer and FORA-style work
forecast cached features from the last few full steps instead. Here the forecast is the polynomial
through the last k+1 full steps' values, evaluated at the current timestep t (not the call index,
so unequal gaps and samplers that revisit a timestep are handled). k = 0 is plain reuse.

`History` keeps those k+1 values per batch row, so each sample can refresh on its own steps.
Memory: k+1 copies of the cached tensor per row instead of one.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .memory_format import memory_format

MAX_ORDER = 2  # higher orders amplify noise in the history more than they remove bias


def lagrange_weights(times: Sequence[float], t: float) -> list:
    """w with p(t) = sum_j w_j y_j for the polynomial p through the points (times[j], y_j)."""
    weights = []
    for j, tj in enumerate(times):
        w = 1.0
        for m, tm in enumerate(times):
            if m != j:
                w *= (t - tm) / (tj - tm)
        weights.append(w)
    return weights


def check_order(order) -> int:
    if isinstance(order, bool) or not isinstance(order, int) or not 0 <= order <= MAX_ORDER:
        raise ValueError(f"cache_forecast must be an int in [0, {MAX_ORDER}] (0 reuses the cached feature, 1 and 2 "
                         f"extrapolate it linearly or quadratically), got {order!r}")
    return order


class History:
    """The last `keep` full-step values of one per-row tensor, each with its timestep.

    slots[j] holds slot j for every row (in the memory layout of the values pushed, so forecasts
    come out channels-last like the features they stand for); a row with n values keeps them in
    the last n slots, oldest first. Rows with fewer than order + 1 values are forecast at a lower
    order. `keep` defaults to order + 1, what the Lagrange forecast uses; the literature's rules
    (minidiff.forecasters) keep what theirs need. Slots are added as rows fill them, so a generous
    `keep` (Spectrum's whole history) costs only the values actually pushed.
    """

    def __init__(self, order: int, keep: Optional[int] = None):
        self.order = order
        self.keep = order + 1 if keep is None else keep
        self.slots: list = []  # up to `keep` tensors of shape (rows, ...)
        self.times: list = []  # per row, oldest first

    @property
    def empty(self) -> bool:
        """Nothing pushed yet (the first full step is still to come)."""
        return not self.slots

    def push(self, rows: torch.Tensor, t: float, value: torch.Tensor, batch: int):
        """Record `value` (one entry per index in `rows`) computed at timestep t."""
        if not self.slots:
            self.times = [[] for _ in range(batch)]
            self.slots = [self._new_slot(value, batch)]
        picked = rows.tolist()
        shift = [r for r in picked if self.times[r] and self.times[r][-1] != t]
        if shift and self.keep > 1:  # a revisited timestep overwrites its slot instead of shifting
            if len(self.slots) < self.keep and any(len(self.times[r]) == len(self.slots) for r in shift):
                self.slots.insert(0, self._new_slot(value, batch))
            if len(shift) == batch:  # every row moves up one slot: rotate the list, copy nothing
                self.slots.append(self.slots.pop(0))
            else:
                idx = torch.tensor(shift, device=value.device)
                for older, newer in zip(self.slots, self.slots[1:]):
                    older[idx] = newer[idx]
        if len(rows) == batch:
            self.slots[-1].copy_(value)
        else:
            self.slots[-1][rows] = value
        for r in picked:
            ts = self.times[r]
            if ts and ts[-1] == t:
                ts.pop()
            ts.append(t)
            del ts[: -self.keep]

    @staticmethod
    def _new_slot(value: torch.Tensor, batch: int) -> torch.Tensor:
        shape = (batch,) + tuple(value.shape[1:])
        return torch.zeros(shape, dtype=value.dtype, device=value.device).to(memory_format=memory_format(value))

    def values(self, rows: Optional[torch.Tensor], count: int) -> list:
        """The last `count` slots, for `rows` (None: every row), oldest first."""
        slots = self.slots[len(self.slots) - count:]
        return slots if rows is None else [slot[rows] for slot in slots]

    def forecast(self, rows: Optional[torch.Tensor], t: float) -> torch.Tensor:
        """The Lagrange value at timestep t for `rows` (None: every row), from each row's own last order + 1 values."""
        picked = range(len(self.times)) if rows is None else rows.tolist()
        span = min(self.order + 1, len(self.slots))
        slots = self.values(rows, span)
        if self.order == 0 or all(len(self.times[r]) == 1 for r in picked):
            return slots[-1]
        times = self.times[picked[0]][-span:]
        if all(self.times[r][-span:] == times for r in picked):  # the usual case: one set of weights
            first = len(slots) - len(times)
            weights = lagrange_weights(times, t)
            out = slots[first] * weights[0]
            for slot, w in zip(slots[first + 1:], weights[1:]):
                out.add_(slot, alpha=w)
            return out
        weights = torch.zeros(len(slots), len(picked), dtype=torch.float64)
        for i, r in enumerate(picked):
            ts = self.times[r][-span:]
            weights[len(slots) - len(ts):, i] = torch.tensor(lagrange_weights(ts, t), dtype=torch.float64)
        weights = weights.to(slots[0].device, slots[0].dtype).view(len(slots), len(picked),
                                                                   *([1] * (slots[0].ndim - 1)))
        out = slots[0] * weights[0]
        for slot, w in zip(slots[1:], weights[1:]):
            out.addcmul_(slot, w)
        return out
