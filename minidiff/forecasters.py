"""Forecasters from the literature for a cached feature, as pure functions of its history.

minidiff.forecast extrapolates the deep feature by the Lagrange polynomial through the last full
steps. These are the rules published since, written over the same inputs so they can be compared
on equal terms (benchmarks/forecasters.py):

- `foca`: FoCa's BDF2 predictor with a Heun corrector (arXiv 2508.16211);
- `hermite`: HiCache's scaled-Hermite version of TaylorSeer's expansion (arXiv 2508.16984);
- `chebyshev`: Spectrum's Chebyshev ridge fit over the whole history (arXiv 2603.01623);
- `dicache`: DiCache's extrapolation paced by a shallow probe (arXiv 2508.17356).

Common inputs: `times`, the timesteps t_0 .. t_n of the full steps, oldest first (samplers count
down; either direction works), `values`, the feature F_0 .. F_n at those steps (tensors of one
shape), and `t`, the timestep to forecast. Time is the timestep, never the call index, as in
forecast.py, so unequal gaps (non-uniform and adaptive schedules) count as what they are. Each rule
is a weighted sum of the tensors it is given: the result has their dtype and memory layout. With
one full step every rule reuses it (and returns that tensor itself, as the cache does).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .forecast import History, lagrange_weights
from .memory_format import memory_format


def _check_history(times: Sequence[float], values: Sequence[torch.Tensor]):
    if len(times) != len(values) or not values:
        raise ValueError(f"a forecast needs one value per full-step timestep and at least one of each, got "
                         f"{len(times)} timesteps and {len(values)} values")
    if len(set(times)) != len(times):
        raise ValueError(f"full-step timesteps must be distinct, got {list(times)}")


def combine(values: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i weights[i] * values[i], in the values' dtype and layout."""
    out = values[0] * weights[0]
    for value, w in zip(values[1:], weights[1:]):
        out.add_(value, alpha=w)
    return out


def linear(times: Sequence[float], values: Sequence[torch.Tensor], t: float) -> torch.Tensor:
    """The line through the last two full steps at t (reuse with one): the fallback the rules share."""
    return values[-1] if len(values) == 1 else combine(values[-2:], lagrange_weights(times[-2:], t))


# -- FoCa -----------------------------------------------------------------------------------------

def foca(times: Sequence[float], values: Sequence[torch.Tensor], t: float,
         recent: Optional[Sequence[tuple]] = None, horizon: Optional[float] = None) -> torch.Tensor:
    """FoCa: a BDF2 predictor over the run's latest values, corrected by Heun's rule from the last full step.

        F(t) = F_n + (e / 2) (dF_full + dF_local),   e = t - t_n,
        dF_full  = (F_n - F_{n-1}) / (t_n - t_{n-1}),  the slope at the anchor (last two full steps);
        dF_local = (G_k - G_{k-1}) / (s_k - s_{k-1}),  the slope of the BDF2 predictor 2 G_k - G_{k-1}
                   (its equal-step form) through the run's two latest values,

    where `recent` = [(s_{k-1}, G_{k-1}), (s_k, G_k)] are the last two (timestep, value) pairs of the
    run before t: full steps' values or this rule's own earlier forecasts (the recursion over
    predicted values). None, or fewer than two, means the last two full steps. Heun's
    (trapezoidal) rule advances from the anchor by the mean of the slope there and the predictor's
    slope. The caller appends each forecast to its `recent` window.

    Follows cache-dit's FoCaCalibrator (vipshop/cache-dit, calibrators/foca.py; the paper's code is
    unreleased): the same values enter each slope, and with one full step it reuses F_n. Choices:
    - Slopes are per timestep. cache-dit takes both differences per call (h = 1), so its anchor
      slope F_full - F_full_prev spans the whole gap between full steps: on a 1:N schedule it is N
      times the per-call slope and the rule overshoots even a straight line. Per timestep, the rule
      is exact on every trajectory linear in t whose `recent` values are exact, whatever the gaps.
    - `horizon`: cache-dit pulls forecasts more than 3 calls past the anchor back toward F_n,
      F_n + (H / e) (H / 2) (dF_full + dF_local) for |e| > H. Given as a timestep distance (3 calls
      = 3 x the call spacing), None (the default) is the paper's rule, undamped. The recursion
      needs it on long gaps: the last forecast's error enters the next gap's dF_local divided by one
      call's spacing and comes out multiplied by e / 2, so errors grow by about N / 2 per gap on 1:N.
    Not exact on quadratics: dF_full is the slope half a gap back, and a stale `recent` value (a
    reuse before the second full step) enters dF_local as if it were the trajectory. What it adds
    to the line through the last two full steps comes only from the recursion through the last
    forecast before the anchor: were `recent` reset to the full steps at each one (as cache-dit's
    docstring says, not its code), every forecast would be that line.
    """
    _check_history(times, values)
    if len(values) == 1:
        return values[-1]
    (t0, t1), (f0, f1) = times[-2:], values[-2:]
    (s0, g0), (s1, g1) = (list(recent)[-2:] if recent is not None and len(recent) >= 2
                          else list(zip(times[-2:], values[-2:])))
    if s0 == s1:
        raise ValueError(f"FoCa's recent values must be at two distinct timesteps, got {s0} twice")
    if horizon is not None and not horizon > 0:
        raise ValueError(f"FoCa's horizon must be a timestep distance > 0, got {horizon!r}")
    reach = t - t1
    if horizon is not None and abs(reach) > horizon:
        reach = math.copysign(horizon * horizon / abs(reach), reach)
    half = reach / 2
    # F_n + half * ((f1 - f0) / (t1 - t0) + (g1 - g0) / (s1 - s0)), as one weighted sum
    a, b = half / (t1 - t0), half / (s1 - s0)
    return combine([f1, f0, g1, g0], [1 + a, -a, b, -b])


# -- HiCache --------------------------------------------------------------------------------------

def hermite_polynomial(j: int, x: float) -> float:
    """The physicists' Hermite polynomial H_j(x): H_0 = 1, H_1 = 2x, H_{j+1} = 2x H_j - 2j H_{j-1}."""
    previous, current = 1.0, 2.0 * x
    if j == 0:
        return previous
    for i in range(1, j):
        previous, current = current, 2.0 * x * current - 2.0 * i * previous
    return current


def divided_difference_weights(times: Sequence[float]) -> list:
    """w with F[t_0, ..., t_m] = sum_i w_i F_i: Newton's divided difference over all the given points."""
    return [1.0 / math.prod(ti - tm for m, tm in enumerate(times) if m != i) for i, ti in enumerate(times)]


def hermite(times: Sequence[float], values: Sequence[torch.Tensor], t: float, order: int = 1,
            scale: float = 0.5, step: Optional[float] = None) -> torch.Tensor:
    """HiCache: TaylorSeer's finite-difference expansion with scaled Hermite polynomials for monomials.

        F(t) = sum_{j=0..k} D_j s^j H_j(s x) / j!,   x = (t - t_n) / u,   s = `scale`,
        D_j = j! F[t_n, ..., t_{n-j}] u^j,   k = min(order, n),

    H_j the physicists' Hermite polynomials, F[...] Newton's divided differences over the last j + 1
    full steps, and D_j TaylorSeer's estimate of the j-th derivative in units u. On equal gaps h,
    D_j is the backward difference of order j times (u/h)^j, as TaylorSeer's recursion builds it.
    TaylorSeer sums D_j x^j / j!; HiCache swaps x^j for s^j H_j(s x), scaling both the argument
    and the coefficient ("dual scaling"). With a = 2 s^2, s^j H_j(s x) = a^j x^j + lower-order terms:
    order j is damped by a^j (a = 1/2 at HiCache's s = 1/2), and from order 2 on, terms that do not
    vanish at x = 0 appear (-a D_2 / 2 at order 2).

    Follows yiming-l21/CFGCache (models/hicache_fast_impl.py), whose "HiCache" mode uses order 1
    and s = 0.5: the defaults here. Choices:
    - The unit u: HiCache counts x in sampler calls. `step` is the timestep distance of one call
      (e.g. 20 for 50 DDIM steps over 1000 timesteps); None takes the last full-step gap. From
      order 2 on the rule depends on u (the H_2 constant term scales as 1/u^2), so it is part of
      the method, not a convention.
    - Sign: x > 0 forecasts forward in the sampling direction whichever way timesteps run (u takes
      the sign of t_n - t_{n-1}), and the differences are newest minus older, so odd terms follow
      the trend. HiCache++ reported sign errors in published Hermite and TaylorSeer arms; the tests
      check this sign on a rising and a falling trajectory.
    - Unequal gaps: divided differences, where TaylorSeer divides every order by the last gap.
    What it reproduces: constants; lines only at order 1 with s = 1/sqrt(2) (a = 1). A rule over
    these differences that is exact on every polynomial of degree k must be Newton's backward
    formula (the Lagrange forecast of forecast.py), which no scaled Hermite basis gives: at
    s = 1/sqrt(2), u = h, order 2 falls short of a quadratic by (x + 1) / 2 times its second
    difference. Its gain, where it gains, is damping.
    """
    _check_history(times, values)
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ValueError(f"the Hermite order must be an int >= 0, got {order!r}")
    if not scale > 0:
        raise ValueError(f"the Hermite scale must be > 0, got {scale!r}")
    k = min(order, len(values) - 1)
    if k == 0:
        return values[-1]
    gap = times[-1] - times[-2]
    if step is None:
        unit = gap
    elif step > 0:
        unit = math.copysign(step, gap)
    else:
        raise ValueError(f"the Hermite step (timesteps per sampler call) must be > 0, got {step!r}")
    x = (t - times[-1]) / unit
    weights = [0.0] * len(values)
    for j in range(k + 1):
        # D_j s^j H_j(s x) / j! = F[t_n .. t_{n-j}] u^j s^j H_j(s x)
        term = (unit * scale) ** j * hermite_polynomial(j, scale * x)
        first = len(values) - 1 - j
        for i, w in enumerate(divided_difference_weights(times[first:])):
            weights[first + i] += term * w
    return combine(values, weights)


# -- Spectrum -------------------------------------------------------------------------------------

def chebyshev_design(taus: Sequence[float], degree: int) -> torch.Tensor:
    """(len(taus), degree + 1) float64: T_0 .. T_degree at each tau (T_{j+1} = 2 tau T_j - T_{j-1})."""
    tau = torch.tensor(taus, dtype=torch.float64)
    columns = [torch.ones_like(tau), tau][: degree + 1]
    while len(columns) <= degree:
        columns.append(2 * tau * columns[-1] - columns[-2])
    return torch.stack(columns, dim=1)


def chebyshev(times: Sequence[float], values: Sequence[torch.Tensor], t: float, span: tuple,
              degree: int = 4, ridge: float = 0.1, mix: float = 1.0) -> torch.Tensor:
    """Spectrum: a ridge fit of Chebyshev polynomials over the whole history, mixed with linear extrapolation.

        tau(t) = -1 + 2 (t - span[0]) / (span[1] - span[0]),  the run's timesteps onto [-1, 1];
        X_ij = T_j(tau(t_i)), j = 0 .. degree;   C = (X^T X + ridge I)^-1 X^T F;
        F(t) = (1 - mix) lin(t) + mix T(tau(t)) C,
        lin(t) = F_n + (t - t_n) / (t_n - t_{n-1}) (F_n - F_{n-1}).

    Every coefficient is penalised, T_0's included, as in Spectrum. The fit is linear in the
    values, so it is computed as one weight per full step (float64), then a weighted sum.

    Follows hanjq17/Spectrum (MIT; src/utils/basis_utils.py, src/utils/__init__.py). Choices:
    - Time: Spectrum fits over the call index with steps [0, 50] mapped onto [-1, 1]. Here `span`
      = (timestep of the run's first call, of its last call) is mapped, the same affine map up to
      the end point for evenly spaced sampler steps, so the penalty weighs the same.
    - Spectrum's M = 4 gives T_0 .. T_4, five columns: `degree` = 4. Its window holds 100 full
      steps, so the whole history: pass every full step.
    - `mix` is Spectrum's w: 1.0 (its config default, the paper's predictor); its README
      recommends 0.5 .. 1. Its linear part is its order-1 "Taylor" term, the line above.
    - Short history: Spectrum always runs 5 full warm-up steps, so its fit never sees fewer than 5
      points. Here, with fewer than degree + 1 full steps, the forecast is the linear part alone
      (reuse after one full step, the line after two).
    Exact with ridge = 0 on polynomials in t of degree <= `degree` (and, with any mix, on lines).
    With ridge > 0 the coefficients shrink: the forecast is close, not exact.
    """
    _check_history(times, values)
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
        raise ValueError(f"the Chebyshev degree must be an int >= 0, got {degree!r}")
    if not ridge >= 0:
        raise ValueError(f"the ridge penalty must be >= 0, got {ridge!r}")
    if not 0 <= mix <= 1:
        raise ValueError(f"the Chebyshev mix (Spectrum's w) must lie in [0, 1], got {mix!r}")
    if span[0] == span[1]:
        raise ValueError(f"the run's timestep span must have two distinct ends, got {span}")
    if len(values) < degree + 1:
        return linear(times, values, t)
    taus = [-1 + 2 * (s - span[0]) / (span[1] - span[0]) for s in list(times) + [t]]
    design = chebyshev_design(taus, degree)
    fit, at = design[:-1], design[-1]
    gram = fit.T @ fit + ridge * torch.eye(degree + 1, dtype=torch.float64)
    fitted = (at @ torch.linalg.solve(gram, fit.T)).tolist()  # the fit's forecast, as a weight per full step
    line = lagrange_weights(times[-2:], t)  # the line through the last two full steps (reuse with one)
    line = [0.0] * (len(values) - len(line)) + line
    return combine(values, [mix * c + (1 - mix) * w for c, w in zip(fitted, line)])


# -- DiCache --------------------------------------------------------------------------------------

def dicache(values: Sequence[torch.Tensor], probes: Sequence[torch.Tensor], probe: torch.Tensor,
            clip: tuple = (1.0, 1.5)) -> torch.Tensor:
    """DiCache: extrapolate the last two full steps by how far a shallow probe has moved since.

        gamma = mean|p - P_{n-1}| / mean|P_n - P_{n-1}|, per row, clipped to [1, 1.5];
        F = F_{n-1} + gamma (F_n - F_{n-1}),

    with F the deep feature and P the probe at the full steps (`values`, `probes`) and p the probe
    now (`probe`). In minidiff the probe is the cut feature every step computes anyway (the skip
    at the cut, as in minidiff.adaptive), and F the deep feature the cache holds.

    Follows Bujiazi/DiCache (FLUX/run_flux_dicache.py, its "trajectory alignment"). Choices:
    - DiCache aligns residuals (block outputs minus the step's input); a U-Net's deep feature is no
      residual, so F and P are the features themselves.
    - gamma per row (dim 0, the mean over the others): DiCache takes one mean over the whole
      tensor, batch included; minidiff decides per sample.
    - No time enters: the probe's own movement paces the forecast, so unequal gaps need nothing.
    - A probe that did not move between the two full steps gives no rate: gamma = clip[0] there
      (DiCache would divide by zero).
    Exact on trajectories where probe and feature move along lines at one pace, as long as the
    ratio stays within the clip (both lines in t, say, and t 1 to 1.5 gaps past t_{n-1}).
    """
    if len(values) != len(probes) or not values:
        raise ValueError(f"DiCache needs one probe per full-step value and at least one of each, got "
                         f"{len(values)} values and {len(probes)} probes")
    if not 0 < clip[0] <= clip[1]:
        raise ValueError(f"DiCache's clip must be (low, high) with 0 < low <= high, got {clip}")
    if len(values) == 1:
        return values[-1]
    dims = tuple(range(1, probe.ndim))

    def mean_abs(x):
        return x.abs().mean(dims) if dims else x.abs()

    moved, rate = mean_abs(probe - probes[-2]), mean_abs(probes[-1] - probes[-2])
    gamma = torch.where(rate > 0, moved / rate.where(rate > 0, 1), clip[0]).clamp(*clip)
    gamma = gamma.view(-1, *([1] * (values[-1].ndim - 1))).to(values[-1].dtype)
    return values[-2] + gamma * (values[-1] - values[-2])


# -- in a cached run ------------------------------------------------------------------------------

NAMES = ("foca", "hermite", "chebyshev", "dicache")  # the values of cache_forecast that name a rule above


class Lagrange:
    """The Lagrange forecast of order k (0: reuse) as the cache's forecaster: forecast.History, probe unused."""

    def __init__(self, order: int):
        self.history = History(order)

    @property
    def empty(self) -> bool:
        return self.history.empty

    def push(self, rows: torch.Tensor, t: float, value: torch.Tensor, batch: int, probe: torch.Tensor):
        self.history.push(rows, t, value, batch)

    def forecast(self, rows: Optional[torch.Tensor], t: float, probe: torch.Tensor) -> torch.Tensor:
        return self.history.forecast(rows, t)


class Rule:
    """One of the rules above as the cache's forecaster, at the settings of its published code.

    Each row (a sample, or one half of a guided sample) keeps its own history of the deep feature
    across its full steps (`forecast.History`), so every schedule works, fixed or adaptive; rows
    whose histories agree (every row, on a fixed schedule) are forecast in one weighted sum.

    - "foca": `foca` with `horizon` None (the paper's rule). Its `recent` window is a second history
      of two values per row: the full steps' features and this rule's own forecasts, pushed as
      the run makes them.
    - "hermite": `hermite` at HiCache's order 1 and s = 0.5 (at order 1 the unit of x cancels).
    - "chebyshev": `chebyshev` at Spectrum's defaults over every full step so far; the timestep
      span is the noise schedule's, (T - 1, 0) onto [-1, 1]: a run does not say where it will end,
      and for a full run this is Spectrum's map of its steps up to the end points (an img2img run
      covers only part of it). Memory: one copy of the deep feature per full step, per row.
    - "dicache": `dicache` with clip (1, 1.5); the probe is the feature at the cut, `CutState.h`,
      which every step, full or shallow, computes before it chooses (the adaptive schedule's signal
      reads the same tensor, but through its own forecast, not DiCache's ratio, so the rule keeps
      its own two values per row and runs the same under every schedule).
    """

    def __init__(self, name: str, num_train_timesteps: Optional[int] = None):
        if name not in NAMES:
            raise ValueError(f"unknown forecaster {name!r}; use one of {', '.join(map(repr, NAMES))}")
        self.name = name
        if name == "chebyshev":
            if not num_train_timesteps or num_train_timesteps < 2:
                raise ValueError("the chebyshev forecast maps the noise schedule's timesteps onto [-1, 1] and needs "
                                 "its length (the network's num_train_timesteps, which a Pipeline sets)")
            self.span = (num_train_timesteps - 1, 0)
        self.deep = History(1, keep=num_train_timesteps if name == "chebyshev" else 2)
        self.recent = History(1) if name == "foca" else None  # (timestep, value) of the run's last two
        self.probes = History(1) if name == "dicache" else None  # the cut feature at the last two full steps

    @property
    def empty(self) -> bool:
        return self.deep.empty

    def push(self, rows: torch.Tensor, t: float, value: torch.Tensor, batch: int, probe: torch.Tensor):
        """A full step at t for `rows`: their deep feature `value` and cut feature `probe`."""
        self.deep.push(rows, t, value, batch)
        if self.recent is not None:
            self.recent.push(rows, t, value, batch)
        if self.probes is not None:
            self.probes.push(rows, t, probe, batch)

    def forecast(self, rows: Optional[torch.Tensor], t: float, probe: torch.Tensor) -> torch.Tensor:
        """The deep feature at t for `rows` (None: every row), whose cut feature now is `probe`."""
        batch = len(self.deep.times)
        picked = list(range(batch)) if rows is None else rows.tolist()
        groups: dict = {}
        for i, r in enumerate(picked):
            key = (tuple(self.deep.times[r]), tuple(self.recent.times[r]) if self.recent is not None else ())
            groups.setdefault(key, []).append(i)
        if len(groups) == 1:
            out = self._rule(rows, picked[0], t, probe)
        else:
            out = None
            device = self.deep.slots[0].device
            for positions in groups.values():
                at = torch.tensor(positions, device=device)
                part = self._rule(torch.tensor([picked[i] for i in positions], device=device), picked[positions[0]],
                                  t, probe[at])
                if out is None:
                    out = torch.empty((len(picked),) + tuple(part.shape[1:]), dtype=part.dtype, device=device,
                                      memory_format=memory_format(part))
                out[at] = part
        if self.recent is not None:
            every = torch.arange(batch, device=out.device) if rows is None else rows
            self.recent.push(every, t, out, batch)
        return out

    def _rule(self, rows: Optional[torch.Tensor], row: int, t: float, probe: torch.Tensor) -> torch.Tensor:
        """The rule for `rows`, which share the history of `row`."""
        times = self.deep.times[row]
        values = self.deep.values(rows, len(times))
        if self.name == "foca":
            recent_times = self.recent.times[row]
            return foca(times, values, t, list(zip(recent_times, self.recent.values(rows, len(recent_times)))))
        if self.name == "hermite":
            return hermite(times, values, t, order=1, scale=0.5)
        if self.name == "chebyshev":
            return chebyshev(times, values, t, self.span)
        return dicache(values, self.probes.values(rows, len(times)), probe)


def make_forecaster(forecast, num_train_timesteps: Optional[int] = None):
    """The cache's forecaster for `forecast`: an order (0 reuse, 1, 2 Lagrange) or a name in NAMES."""
    return Rule(forecast, num_train_timesteps) if isinstance(forecast, str) else Lagrange(forecast)
