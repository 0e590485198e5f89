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

    values[j] holds slot j for every row; a row with n values keeps them in the last n slots,
    oldest first. Rows with fewer than order + 1 values are forecast at a lower order.
    """

    def __init__(self, order: int):
        self.order = order
        self.values: Optional[torch.Tensor] = None  # (order + 1, rows, ...)
        self.times: list = []  # per row, oldest first

    def empty_rows(self, rows: int) -> list:
        """Rows with nothing to forecast from (they must refresh)."""
        if self.values is None:
            return list(range(rows))
        return [r for r, ts in enumerate(self.times) if not ts]

    def push(self, rows: torch.Tensor, t: float, value: torch.Tensor, batch: int):
        """Record `value` (one entry per index in `rows`) computed at timestep t."""
        if self.values is None:
            self.values = value.new_zeros((self.order + 1, batch) + tuple(value.shape[1:]))
            self.times = [[] for _ in range(batch)]
        every_row = len(rows) == batch
        shift = [r for r in rows.tolist() if self.times[r] and self.times[r][-1] != t]
        if shift and self.order > 0:  # a revisited timestep overwrites its slot instead of shifting
            idx = torch.tensor(shift, device=self.values.device)
            self.values[:-1, idx] = self.values[1:, idx].clone()
        if every_row:
            self.values[-1] = value
        else:
            self.values[-1, rows] = value
        for r in rows.tolist():
            ts = self.times[r]
            if ts and ts[-1] == t:
                ts.pop()
            ts.append(t)
            del ts[: -(self.order + 1)]

    def forecast(self, rows: Optional[torch.Tensor], t: float) -> torch.Tensor:
        """The value at timestep t for `rows` (None: every row), from each row's own history."""
        picked = range(len(self.times)) if rows is None else rows.tolist()
        if self.order == 0 or all(len(self.times[r]) == 1 for r in picked):
            return self.values[-1] if rows is None else self.values[-1, rows]
        slots = self.order + 1
        times = self.times[picked[0]]
        if all(self.times[r] == times for r in picked):  # the usual case: one set of weights, no temporaries
            first = slots - len(times)
            values = self.values if rows is None else self.values[:, rows]
            weights = lagrange_weights(times, t)
            out = values[first] * weights[0]
            for j, w in enumerate(weights[1:], first + 1):
                out.add_(values[j], alpha=w)
            return out
        weights = torch.zeros(slots, len(picked), dtype=torch.float64)
        for i, r in enumerate(picked):
            ts = self.times[r]
            weights[slots - len(ts):, i] = torch.tensor(lagrange_weights(ts, t), dtype=torch.float64)
        values = self.values if rows is None else self.values[:, rows]
        weights = weights.to(values.device, values.dtype).view(slots, len(picked), *([1] * (values.ndim - 2)))
        return (values * weights).sum(0)
