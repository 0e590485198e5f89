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
    """The last `order + 1` full-step values of one per-row tensor, each with its timestep.

    slots[j] holds slot j for every row (in the memory layout of the values pushed, so forecasts
    come out channels-last like the features they stand for); a row with n values keeps them in
    the last n slots, oldest first. Rows with fewer than order + 1 values are forecast at a lower
    order.
    """

    def __init__(self, order: int):
        self.order = order
        self.slots: list = []  # order + 1 tensors of shape (rows, ...)
        self.times: list = []  # per row, oldest first

    @property
    def empty(self) -> bool:
        """Nothing pushed yet (the first full step is still to come)."""
        return not self.slots

    def push(self, rows: torch.Tensor, t: float, value: torch.Tensor, batch: int):
        """Record `value` (one entry per index in `rows`) computed at timestep t."""
        if not self.slots:
            shape = (batch,) + tuple(value.shape[1:])
            self.slots = [torch.zeros(shape, dtype=value.dtype, device=value.device).to(
                memory_format=memory_format(value)) for _ in range(self.order + 1)]
            self.times = [[] for _ in range(batch)]
        shift = [r for r in rows.tolist() if self.times[r] and self.times[r][-1] != t]
        if shift and self.order > 0:  # a revisited timestep overwrites its slot instead of shifting
            idx = torch.tensor(shift, device=value.device)
            for older, newer in zip(self.slots, self.slots[1:]):
                older[idx] = newer[idx]
        if len(rows) == batch:
            self.slots[-1].copy_(value)
        else:
            self.slots[-1][rows] = value
        for r in rows.tolist():
            ts = self.times[r]
            if ts and ts[-1] == t:
                ts.pop()
            ts.append(t)
            del ts[: -(self.order + 1)]

    def forecast(self, rows: Optional[torch.Tensor], t: float) -> torch.Tensor:
        """The value at timestep t for `rows` (None: every row), from each row's own history."""
        picked = range(len(self.times)) if rows is None else rows.tolist()
        slots = self.slots if rows is None else [slot[rows] for slot in self.slots]
        if self.order == 0 or all(len(self.times[r]) == 1 for r in picked):
            return slots[-1]
        times = self.times[picked[0]]
        if all(self.times[r] == times for r in picked):  # the usual case: one set of weights
            first = len(slots) - len(times)
            weights = lagrange_weights(times, t)
            out = slots[first] * weights[0]
            for slot, w in zip(slots[first + 1:], weights[1:]):
                out.add_(slot, alpha=w)
            return out
        weights = torch.zeros(len(slots), len(picked), dtype=torch.float64)
        for i, r in enumerate(picked):
            ts = self.times[r]
            weights[len(slots) - len(ts):, i] = torch.tensor(lagrange_weights(ts, t), dtype=torch.float64)
        weights = weights.to(slots[0].device, slots[0].dtype).view(len(slots), len(picked),
                                                                   *([1] * (slots[0].ndim - 1)))
        out = slots[0] * weights[0]
        for slot, w in zip(slots[1:], weights[1:]):
            out.addcmul_(slot, w)
        return out

