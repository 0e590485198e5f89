"""The forecasters from the literature reproduce what they must, with hand-derived values where they don't."""
import math

import pytest
import torch

from minidiff.forecasters import chebyshev, chebyshev_design, dicache, foca, hermite, hermite_polynomial

EXACT = dict(rtol=1e-12, atol=1e-12)  # float64 rounding


def scalar(v) -> torch.Tensor:
    return torch.tensor([float(v)], dtype=torch.float64)


def trajectory(fn, coeffs):
    """t -> a (2, 3) float64 feature whose entries follow fn(t) scaled by fixed random coefficients."""
    return lambda t: coeffs[0] + coeffs[1] * fn(t)


COEFFS = torch.randn(2, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
LINE = trajectory(lambda t: t / 100, COEFFS)


def run_foca(times, values, targets, recent=None, horizon=None):
    """FoCa forecasts at each target in turn, each appended to its recent window (the recursion)."""
    recent = list(recent) if recent is not None else list(zip(times[-2:], values[-2:]))
    out = []
    for t in targets:
        out.append(foca(times, values, t, recent, horizon))
        recent = (recent + [(t, out[-1])])[-2:]
    return out


# -- FoCa -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("times", [[981, 901], [101, 341], [940, 880]])  # falling, rising, one gap apart
def test_foca_is_exact_on_lines_through_its_recursion(times):
    """Unequal gaps by timestep, both directions: every forecast lies on the line, and so feeds the next."""
    direction = 1 if times[1] > times[0] else -1
    targets = [times[1] + direction * d for d in (20, 45, 110, 130)]
    forecasts = run_foca(times, [LINE(s) for s in times], targets)
    for t, forecast in zip(targets, forecasts):
        torch.testing.assert_close(forecast, LINE(t), **EXACT)


def test_foca_on_a_quadratic_matches_the_hand_computed_recursion():
    """F = t^2, full steps at t = 0, 2, 4 (1:2): t = 1 reuses F(0) (one full step); t = 3 has
    dF_full = (4 - 0) / 2 = 2, dF_local = (4 - 0) / 1 = 4 (through the reuse), so 4 + (1/2)(2 + 4) = 7;
    t = 5 has dF_full = 6, dF_local = (16 - 7) / 1 = 9, so 16 + (1/2)(6 + 9) = 23.5 (true 9 and 25)."""
    f = {t: scalar(t * t) for t in range(6)}
    assert torch.equal(foca([0], [f[0]], 1), f[0])
    assert torch.equal(foca([0, 2], [f[0], f[2]], 3, [(1, f[0]), (2, f[2])]), scalar(7))
    assert torch.equal(foca([0, 2, 4], [f[0], f[2], f[4]], 5, [(3, scalar(7)), (4, f[4])]), scalar(23.5))


def test_foca_on_a_line_never_recovers_from_its_one_full_step_start():
    """F = t on 1:3 from t = 0: t = 1, 2 reuse F(0) = 0. Then t = 4: dF_full = 1, dF_local = (3 - 0) / 1 = 3,
    so 3 + (1/2)(1 + 3) = 5; t = 5: dF_local = 5 - 3 = 2, 3 + (2/2)(1 + 2) = 6. t = 7: dF_local = 6 - 6 = 0,
    6.5; t = 8: 7.5. Each gap's error is minus half the last: +1, -1/2, +1/4 (true t)."""
    f = scalar
    recent, forecasts = [], {}
    for t in range(12):
        full = [s for s in range(0, t + 1, 3)]
        if t % 3 == 0:
            recent = (recent + [(t, f(t))])[-2:]
            continue
        forecasts[t] = foca(full, [f(s) for s in full], t, recent).item()
        recent = (recent + [(t, scalar(forecasts[t]))])[-2:]
    assert forecasts == {1: 0, 2: 0, 4: 5, 5: 6, 7: 6.5, 8: 7.5, 10: 10.25, 11: 11.25}


def test_foca_from_a_clean_window_is_the_line_through_the_full_steps():
    """With `recent` started at the last two full steps, both slopes agree and every forecast, fed back,
    stays on the line through them, even on a curve: the recursion through a stale value is all FoCa adds."""
    curve = trajectory(lambda t: (t / 100) ** 2 + math.sin(t / 50), COEFFS)
    times = [981, 901, 861]
    targets = [841, 801, 781, 701]
    for t, forecast in zip(targets, run_foca(times, [curve(s) for s in times], targets)):
        line = curve(861) + (t - 861) / (861 - 901) * (curve(861) - curve(901))
        torch.testing.assert_close(forecast, line, **EXACT)


def test_foca_horizon_pulls_long_forecasts_back_toward_the_anchor():
    """cache-dit's damping: past H, F_n + (H / e)(H / 2)(dF_full + dF_local). Line F = t with slope 1,
    anchor 4 at t = 4: at e = 6 with H = 3 the reach is 3 * 3 / 6 = 1.5, so 4 + 1.5 = 5.5; within H, exact."""
    times, values = [2, 4], [scalar(2), scalar(4)]
    assert torch.equal(foca(times, values, 10, horizon=3), scalar(5.5))
    assert torch.equal(foca(times, values, 7, horizon=3), scalar(7))
    assert torch.equal(foca([4, 2], [scalar(4), scalar(2)], -4, horizon=3), scalar(0.5))  # falling: 2 - 1.5


# -- HiCache --------------------------------------------------------------------------------------

def test_hermite_polynomials_are_the_physicists():
    x = 0.3
    expected = [1, 2 * x, 4 * x ** 2 - 2, 8 * x ** 3 - 12 * x, 16 * x ** 4 - 48 * x ** 2 + 12]
    assert [hermite_polynomial(j, x) for j in range(5)] == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("times,step", [([981, 941, 861], None), ([981, 941, 861], 20), ([10, 35, 40], None)])
def test_hermite_order_one_at_scale_one_over_root_two_is_exact_on_lines(times, step):
    """a = 2 s^2 = 1: s H_1(s x) = x, so order 1 is TaylorSeer's line, exact with any gaps, either direction."""
    direction = 1 if times[-1] > times[-2] else -1
    for t in (times[-1] + direction * 20, times[-1] + direction * 95):
        forecast = hermite(times, [LINE(s) for s in times], t, order=1, scale=2 ** -0.5, step=step)
        torch.testing.assert_close(forecast, LINE(t), **EXACT)


def test_hermite_sign_and_values_on_a_quadratic_by_hand():
    """F = t^2 at t = 0, 1, 2, forecast at t = 3 (x = 1): backward differences 3 and 2, a = 2 s^2.
    F = 4 + a * 3 + (a^2 / 2 - a / 2) * 2. s = 1/2: 4 + 1.5 - 0.25 = 5.25, above F_n (the trend rises).
    s = 1/sqrt(2): 4 + 3 + 0 = 7, short of the true 9 by (x + 1)/2 * 2 = 2, so not exact on quadratics.
    Falling timesteps (2, 1, 0 -> -1, x = 1): differences -1 and 2, 0 - 0.5 - 0.25 = -0.75, below F_n."""
    f = [scalar(t * t) for t in range(3)]
    assert torch.equal(hermite([0, 1, 2], f, 3, order=2, scale=0.5), scalar(5.25))
    torch.testing.assert_close(hermite([0, 1, 2], f, 3, order=2, scale=2 ** -0.5), scalar(7), **EXACT)
    assert torch.equal(hermite([2, 1, 0], f[::-1], -1, order=2, scale=0.5), scalar(-0.75))


def test_hermite_value_on_an_exponential_by_hand():
    """F = e^t at t = 0, 1, 2 -> t = 3, s = 1/2 (a = 1/2), x = 1:
    e^2 + (1/2)(e^2 - e) - (1/8)(e - 1)^2 = 7.389056 + 2.335387 - 0.369062 = 9.355382 (true e^3 = 20.09)."""
    f = [scalar(math.exp(t)) for t in range(3)]
    assert hermite([0, 1, 2], f, 3, order=2, scale=0.5).item() == pytest.approx(9.3553817, abs=1e-6)


def test_hermite_counts_x_in_its_unit():
    """From order 2 on the rule depends on the unit. F = t^2 at t = 0, 2, 4 -> t = 6, s = 1/2 (a = 1/2):
    unit = the gap (2): x = 1, D_1 = 12, D_2 = 8: 16 + 6 + (1/8 - 1/4) 8 = 21.
    unit = 1 (step=1): x = 2, D_1 = 6, D_2 = 2: 16 + 6 + (1/2 - 1/4) 2 = 22.5."""
    times, f = [0, 2, 4], [scalar(t * t) for t in (0, 2, 4)]
    assert torch.equal(hermite(times, f, 6, order=2, scale=0.5), scalar(21))
    assert torch.equal(hermite(times, f, 6, order=2, scale=0.5, step=1), scalar(22.5))


# -- Spectrum -------------------------------------------------------------------------------------

SPAN = (981, 1)


def quartic(seed):
    """A random polynomial of degree 4 in t (as Chebyshev coefficients on the run's span), (2, 3) valued."""
    coeffs = torch.randn(5, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return lambda t: torch.einsum("j,jab->ab", chebyshev_design([-1 + 2 * (t - 981) / (1 - 981)], 4)[0], coeffs)


def test_chebyshev_without_ridge_is_exact_on_polynomials_of_its_degree():
    f = quartic(1)
    times = [981, 941, 901, 861, 741, 701, 541]  # unequal gaps, more points than bases (least squares)
    for t in (521, 401, 1):
        torch.testing.assert_close(chebyshev(times, [f(s) for s in times], t, SPAN, ridge=0), f(t),
                                   rtol=1e-9, atol=1e-9)


def test_chebyshev_ridge_shrinks_by_its_closed_form_and_stays_close():
    """With ridge l the coefficients are C_l = (G + l I)^-1 G C for G = X^T X, so the forecast is off by
    -l T(tau) (G + l I)^-1 C exactly. Tolerance: with the whole run's 17 full steps (1:3 over 50 DDIM
    steps) and l = 0.1, the last step is within 3% (relative L2) of the quartic; with only 5 full steps
    the shrinkage reaches 5-7% (the fit sees a fifth of the span)."""
    coeffs = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    timesteps = list(range(981, 0, -20))
    times = timesteps[::3]

    def f(t):
        return chebyshev_design([-1 + 2 * (t - 981) / (1 - 981)], 4)[0] @ coeffs

    for count, t, tolerance in ((17, timesteps[-1], 0.03), (5, timesteps[13], 0.08)):
        x = chebyshev_design([-1 + 2 * (s - 981) / (1 - 981) for s in times[:count] + [t]], 4)
        gram = x[:-1].T @ x[:-1]
        bias = -0.1 * x[-1] @ torch.linalg.solve(gram + 0.1 * torch.eye(5, dtype=torch.float64), coeffs)
        forecast = chebyshev(times[:count], [f(s) for s in times[:count]], t, SPAN, ridge=0.1)
        torch.testing.assert_close(forecast - f(t), bias, rtol=1e-9, atol=1e-9)
        assert 1e-3 < ((forecast - f(t)).norm() / f(t).norm()).item() < tolerance


def test_chebyshev_mix_adds_the_line_error_in_proportion():
    """F = t^2 (exact for the fit with ridge 0); the line through the last two full steps misses it by a
    known amount, and mix w leaves (1 - w) of that: full steps 0, 2, 3, 5, 6 -> t = 8: line 6^2 + 2 * 11 = 58,
    true 64, so w = 0.25 gives 64 - 0.75 * 6 = 59.5."""
    times = [0, 2, 3, 5, 6]
    f = [scalar(t * t) for t in times]
    forecast = chebyshev(times, f, 8, span=(0, 10), ridge=0, mix=0.25)
    torch.testing.assert_close(forecast, scalar(59.5), rtol=1e-9, atol=1e-9)


# -- DiCache --------------------------------------------------------------------------------------

def test_dicache_clips_gamma_per_row():
    """Row 0: the probe moved 1.25 gaps (in range, so F_{n-1} + 1.25 (F_n - F_{n-1}));
    row 1: 3 gaps (clipped to 1.5); row 2: half a gap, backwards (clipped to 1: F_n itself)."""
    values = [torch.zeros(3, 2, dtype=torch.float64), torch.tensor([[1.0, 2.0]] * 3, dtype=torch.float64)]
    probes = [torch.zeros(3, 4, dtype=torch.float64), torch.full((3, 4), 2.0, dtype=torch.float64)]
    probe = torch.tensor([[2.5] * 4, [6.0, -6.0, 6.0, -6.0], [1.0] * 4], dtype=torch.float64)
    expected = torch.tensor([[1.25, 2.5], [1.5, 3.0], [1.0, 2.0]], dtype=torch.float64)
    assert torch.equal(dicache(values, probes, probe), expected)
    assert torch.equal(dicache(values, probes, probe, clip=(0.5, 3.0))[1:], torch.tensor([[3.0, 6.0], [0.5, 1.0]],
                                                                                          dtype=torch.float64))


def test_dicache_is_exact_on_lines_with_unequal_gaps_while_in_the_clip():
    """Probe and feature both linear in t: gamma = (t - t_{n-1}) / (t_n - t_{n-1}) recovers the line
    whatever the gaps (no time enters), while that ratio lies in [1, 1.5]."""
    probe_line = trajectory(lambda t: -t / 50, COEFFS.flip(0))
    times = [981, 861]
    for t in (861 - 20, 861 - 60):  # ratios 140/120 and 180/120 = 1.5
        forecast = dicache([LINE(s) for s in times], [probe_line(s) for s in times], probe_line(t))
        torch.testing.assert_close(forecast, LINE(t), **EXACT)


def test_dicache_reuses_when_the_probe_gives_no_rate():
    values = [scalar(1).view(1, 1), scalar(2).view(1, 1)]
    still = [torch.ones(1, 3, dtype=torch.float64)] * 2
    assert torch.equal(dicache(values, still, torch.full((1, 3), 5.0, dtype=torch.float64)), values[-1])


# -- every rule -----------------------------------------------------------------------------------

def forecast_all(times, values, t):
    """Each rule with its defaults; DiCache's probe is the feature, moved on by 1.5 gaps."""
    probe = values[-1] if len(values) == 1 else values[-1] + 0.5 * (values[-1] - values[-2])
    return {"foca": foca(times, values, t), "hermite": hermite(times, values, t),
            "chebyshev": chebyshev(times, values, t, SPAN), "dicache": dicache(values, values, probe)}


def test_one_full_step_reuses_it_and_two_extrapolate_as_each_method_says():
    one = forecast_all([981], [LINE(981)], 861)
    assert all(forecast is one["foca"] for forecast in one.values())
    times = [981, 941]
    two = forecast_all(times, [LINE(s) for s in times], 861)
    for name in ("foca", "chebyshev"):  # FoCa's two slopes coincide; Spectrum falls back to its line
        torch.testing.assert_close(two[name], LINE(861), **EXACT)
    # HiCache: order drops to 1 and a = 1/2 halves the line's step; DiCache: the probe's gamma, 1.5
    torch.testing.assert_close(two["hermite"], LINE(901), **EXACT)
    torch.testing.assert_close(two["dicache"], LINE(921), **EXACT)
    four = [981, 941, 901, 861]
    torch.testing.assert_close(chebyshev(four, [LINE(s) for s in four], 801, SPAN), LINE(801), **EXACT)


def test_forecasts_keep_dtype_and_channels_last():
    times = [981, 961, 941, 921, 901, 881]
    g = torch.Generator().manual_seed(3)
    values = [torch.randn(2, 4, 3, 3, generator=g).contiguous(memory_format=torch.channels_last) for _ in times]
    for name, forecast in forecast_all(times, values, 861).items():
        assert forecast.dtype == torch.float32 and forecast.is_contiguous(memory_format=torch.channels_last), name


def test_bad_histories_and_options_are_refused_with_a_sentence():
    values = [scalar(1), scalar(2)]
    with pytest.raises(ValueError, match="one value per full-step timestep"):
        foca([1, 2, 3], values, 4)
    with pytest.raises(ValueError, match="distinct"):
        hermite([1, 1], values, 4)
    with pytest.raises(ValueError, match="Hermite order"):
        hermite([1, 2], values, 4, order=1.5)
    with pytest.raises(ValueError, match="ridge"):
        chebyshev([1, 2], values, 4, SPAN, ridge=-1)
    with pytest.raises(ValueError, match="mix"):
        chebyshev([1, 2], values, 4, SPAN, mix=2)
    with pytest.raises(ValueError, match="clip"):
        dicache(values, values, scalar(3), clip=(1.5, 1.0))
    with pytest.raises(ValueError, match="horizon"):
        foca([1, 2], values, 4, horizon=0)
