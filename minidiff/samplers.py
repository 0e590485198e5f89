"""Samplers as plain loops over `model(x, t) -> model_output`: DDPM, DDIM and PLMS, and the
sigma-space family Euler, Euler ancestral, Heun, DPM-Solver++ 2M and UniPC.

Every sampler takes one keyword set, `sample_x(model, x, config, steps, *, generator=None,
progress=True, callback=None, start_step=0, **options)`, where `options` are its own, listed in
`SAMPLER_OPTIONS` (a sampler that draws no noise ignores `generator`), so callers never switch on names.

`t` reaches the model as a 0-dim tensor: a LongTensor, except Euler/Heun's float32 timesteps,
which are fractional for "linspace" spacing and Karras sigmas. Caching and conditioning live in
the callable, not here. Update formulas, schedule constants (float32) and the order of random
draws follow diffusers' DDPM, DDIM, PNDM(skip_prk_steps=True), EulerDiscrete,
EulerAncestralDiscrete, HeunDiscrete, DPMSolverMultistep(dpmsolver++, order 2) and
UniPCMultistep(bh2, order 2) schedulers, so one seed gives one image.
"""

import numpy as np
import torch
from tqdm.auto import tqdm

from .schedules import NoiseSchedule, make_timesteps


def _check_eta(eta):
    if not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise ValueError(f"eta must be a number between 0 (deterministic DDIM) and 1 (DDPM-like noise), got {eta!r}")


def _call(model, x, t):
    t = t.to(x.device) if torch.is_tensor(t) else torch.tensor(t, dtype=torch.long, device=x.device)
    out = model(x, t)
    if out.shape != x.shape:
        raise ValueError(f"model returned shape {tuple(out.shape)} for input {tuple(x.shape)}; samplers need an "
                         "output shaped like x (learned-variance outputs with 2x channels are not supported)")
    return out


def _noise_like(x, generator):
    """Standard normal noise drawn as diffusers' randn_tensor does: on the generator's device, then moved."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def _timesteps_from(config, steps, start_step):
    """The timesteps of a `steps`-step schedule from index `start_step` on (img2img starts part-way)."""
    timesteps = make_timesteps(config, steps).tolist()  # validates steps first
    if isinstance(start_step, bool) or not isinstance(start_step, int) or not 0 <= start_step < steps:
        raise ValueError(f"start_step must be an int in [0, {steps - 1}], got {start_step!r}")
    return timesteps[start_step:]


def _x0_and_eps(prediction_type, out, x, alpha_t):
    """Predicted clean sample and noise, whatever the model predicts."""
    beta_t = 1 - alpha_t
    if prediction_type == "epsilon":
        return (x - beta_t ** 0.5 * out) / alpha_t ** 0.5, out
    if prediction_type == "v_prediction":
        return alpha_t ** 0.5 * x - beta_t ** 0.5 * out, alpha_t ** 0.5 * out + beta_t ** 0.5 * x
    return out, (x - alpha_t ** 0.5 * out) / beta_t ** 0.5


def sample_ddpm(model, x, config, steps, *, generator=None, progress=True, callback=None, start_step=0):
    """Ancestral DDPM sampling: posterior mean (Ho et al. 2020, eq. 7) plus fixed-variance noise."""
    alphas_cumprod = NoiseSchedule.from_config(config, x.device).alphas_cumprod
    timesteps = _timesteps_from(config, steps, start_step)
    for i, t in enumerate(tqdm(timesteps, disable=not progress)):
        out = _call(model, x, t)
        alpha_t = alphas_cumprod[t]
        # The chain always ends at alpha_bar = 1: set_alpha_to_one is a DDIM/PLMS convention.
        alpha_prev = alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.ones_like(alpha_t)
        alpha_step = alpha_t / alpha_prev  # alpha over the whole stride when steps < num_train_timesteps
        beta_step = 1 - alpha_step
        x0, _ = _x0_and_eps(config.prediction_type, out, x, alpha_t)
        if config.clip_sample:
            x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)
        x0_coeff = alpha_prev ** 0.5 * beta_step / (1 - alpha_t)
        x_coeff = alpha_step ** 0.5 * (1 - alpha_prev) / (1 - alpha_t)
        mean = x0_coeff * x0 + x_coeff * x
        if t > 0:
            noise = _noise_like(x, generator)
            variance = ((1 - alpha_prev) / (1 - alpha_t) * beta_step).clamp(min=1e-20)
            if config.variance_type == "fixed_large":
                std = beta_step ** 0.5
            elif config.variance_type == "fixed_small_log":
                std = torch.exp(0.5 * torch.log(variance))
            else:
                std = variance ** 0.5
            mean = mean + std * noise
        x = mean
        if callback is not None:
            callback(i, t, x)
    return x


def sample_ddim(model, x, config, steps, *, generator=None, progress=True, callback=None, start_step=0, eta=0.0):
    """DDIM (Song et al. 2021, eq. 12): deterministic at eta=0, as noisy as DDPM at eta=1."""
    _check_eta(eta)
    schedule = NoiseSchedule.from_config(config, x.device)
    timesteps = _timesteps_from(config, steps, start_step)
    stride = config.num_train_timesteps // steps  # diffusers steps back by this for every spacing
    for i, t in enumerate(tqdm(timesteps, disable=not progress)):
        out = _call(model, x, t)
        alpha_t = schedule.alphas_cumprod[t]
        alpha_prev = schedule.alphas_cumprod[t - stride] if t - stride >= 0 else schedule.final_alpha_cumprod
        x0, eps = _x0_and_eps(config.prediction_type, out, x, alpha_t)
        if config.clip_sample:
            x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)
        std = eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)) ** 0.5  # sigma_t, eq. 16
        x_prev = alpha_prev ** 0.5 * x0 + (1 - alpha_prev - std ** 2) ** 0.5 * eps
        if eta > 0:
            x_prev = x_prev + std * _noise_like(x, generator)
        x = x_prev
        if callback is not None:
            callback(i, t, x)
    return x


def _plms_update(prediction_type, out, x, alpha_t, alpha_prev):
    """One DDIM-like transfer from alpha_t to alpha_prev along `out` (PNDM, Liu et al. 2022, eq. 9)."""
    beta_t = 1 - alpha_t
    if prediction_type == "v_prediction":
        out = alpha_t ** 0.5 * out + beta_t ** 0.5 * x  # v -> eps
    denom = alpha_t * (1 - alpha_prev) ** 0.5 + (alpha_t * beta_t * alpha_prev) ** 0.5
    return (alpha_prev / alpha_t) ** 0.5 * x - (alpha_prev - alpha_t) * out / denom


def _adams_bashforth(outs):
    """Extrapolate the slope from the last up-to-4 model outputs (oldest first)."""
    if len(outs) == 2:
        return (3 * outs[-1] - outs[-2]) / 2
    if len(outs) == 3:
        return (23 * outs[-1] - 16 * outs[-2] + 5 * outs[-3]) / 12
    return (1 / 24) * (55 * outs[-1] - 59 * outs[-2] + 37 * outs[-3] - 9 * outs[-4])


def sample_plms(model, x, config, steps, *, generator=None, progress=True, callback=None, start_step=0):
    """Pseudo linear multistep sampling (PNDM without Runge-Kutta warm-up); `steps + 1` model calls.

    Deterministic: `generator` is accepted for a uniform signature and unused."""
    if config.prediction_type == "sample":
        raise ValueError("PLMS needs an epsilon or v_prediction model; use sample_ddim for prediction_type='sample'")
    schedule = NoiseSchedule.from_config(config, x.device)

    def alpha(t):
        return schedule.alphas_cumprod[t] if t >= 0 else schedule.final_alpha_cumprod

    # From start_step > 0 (img2img) the warm-up below starts at timesteps[start_step]. diffusers'
    # img2img slices PNDM's list, whose second entry repeats, so it starts one stride noisier.
    timesteps = _timesteps_from(config, steps, start_step)
    stride = config.num_train_timesteps // steps
    # The second timestep is visited twice: first reached by an Euler step, then re-taken from
    # the start with the average of both slopes (improved Euler) before multistep begins.
    visits = timesteps[:1] + timesteps[1:2] + timesteps[1:]
    outs, x_start = [], x
    for i, t in enumerate(tqdm(visits, disable=not progress)):
        out = _call(model, x, t)
        if i == 0:
            outs = [out]
            x = _plms_update(config.prediction_type, out, x, alpha(t), alpha(t - stride))
        elif i == 1:
            x = _plms_update(config.prediction_type, (out + outs[-1]) / 2, x_start, alpha(t + stride), alpha(t))
        else:
            outs = outs[-3:] + [out]
            x = _plms_update(config.prediction_type, _adams_bashforth(outs), x, alpha(t), alpha(t - stride))
        if callback is not None:
            callback(i, t, x)
    return x


# -- sigma-space samplers ---------------------------------------------------------------------------
# With sigma = sqrt((1 - alpha_bar) / alpha_bar), x_sigma = x_t / sqrt(alpha_bar) = x_0 + sigma * eps:
# the variance-exploding view of the same chain (Karras et al. 2022). Euler and Heun step x_sigma;
# DPM-Solver++ and UniPC step x_t itself, with alpha_t = 1 / sqrt(1 + sigma^2), sigma_t = sigma * alpha_t.


def _train_sigmas(config):
    """sigma of every training timestep, float32 as diffusers computes it."""
    alphas_cumprod = NoiseSchedule.from_config(config).alphas_cumprod
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def _karras(sigma_max, sigma_min, n, rho=7.0):
    """Karras et al. 2022, eq. 5: n noise levels evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _sigma_to_timestep(sigmas, train_sigmas):
    """The fractional training timestep of each sigma: linear in log sigma between its two neighbours."""
    log_train = np.log(train_sigmas)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(np.searchsorted(log_train, log_sigma, side="right") - 1, 0, len(log_train) - 2)
    w = np.clip((log_train[low] - log_sigma) / (log_train[low] - log_train[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def sigma_schedule(config, steps, *, karras_sigmas=False, multistep=False):
    """(sigmas, timesteps) of a sigma-space sampler: `steps` noise levels and a final 0 (float32), and
    the training timestep of each level, spaced as diffusers' Euler/Heun (float32 timesteps) or, with
    `multistep`, as its DPM-Solver/UniPC schedulers (a grid of steps + 1 less its last point, int64).

    Karras sigmas span the chosen timesteps' sigmas for Euler/Heun but the whole training range
    for the multistep schedulers, whose timesteps are then rounded, as diffusers does. "trailing"
    keeps exactly `steps` timesteps (diffusers' float arange sometimes makes one more).
    """
    T = config.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer between 1 and num_train_timesteps={T}, got {steps!r}")
    grid = steps + 1 if multistep else steps  # the multistep grid has one point more, dropped below
    spacing = config.timestep_spacing or "linspace"
    if spacing == "linspace":
        timesteps = np.linspace(0, T - 1, grid)[::-1]
        timesteps = timesteps.round() if multistep else timesteps.astype(np.float32)  # fractional for Euler/Heun
    elif spacing == "leading":
        timesteps = (np.arange(grid) * (T // grid))[::-1] + config.steps_offset
    else:
        timesteps = np.arange(T, 0, -T / steps).round() - 1
    timesteps = timesteps[:steps].astype(np.int64 if multistep else np.float32)
    if timesteps[0] >= T:
        raise ValueError(f"steps_offset={config.steps_offset} with {steps} steps starts at timestep "
                         f"{timesteps[0]}, past the last trained timestep {T - 1}; use fewer steps.")
    train = _train_sigmas(config)
    sigmas = np.interp(timesteps, np.arange(T), train)
    if karras_sigmas:
        sigma_max, sigma_min = (train[-1], train[0]) if multistep else (sigmas[0], sigmas[-1])
        sigmas = _karras(float(sigma_max), float(sigma_min), steps)
        timesteps = _sigma_to_timestep(sigmas, train)
        timesteps = timesteps.round().astype(np.int64) if multistep else timesteps.astype(np.float32)
    sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
    return sigmas, torch.from_numpy(np.ascontiguousarray(timesteps))


def _start_in_sigma_space(x, sigmas, start_step, config):
    """x_sigma to start from: diffusers' init_noise_sigma times the noise, or (img2img) x_t / sqrt(alpha_bar)."""
    sigma = sigmas[start_step]
    if start_step == 0 and config.timestep_spacing != "leading":
        return x * sigma  # diffusers' init_noise_sigma drops the "+ 1" for these spacings
    return x * (sigma ** 2 + 1) ** 0.5


def _denoise(model, x, sigma, t, prediction_type):
    """x_0 predicted from x_sigma: the model sees x_sigma / sqrt(sigma^2 + 1), which is x_t."""
    out = _call(model, x / (sigma ** 2 + 1) ** 0.5, t)
    if prediction_type == "epsilon":
        return x - sigma * out
    if prediction_type == "v_prediction":
        return out * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1)
    return out


def _check_start(start_step, steps):
    if isinstance(start_step, bool) or not isinstance(start_step, int) or not 0 <= start_step < steps:
        raise ValueError(f"start_step must be an int in [0, {steps - 1}], got {start_step!r}")


def sample_euler(model, x, config, steps, *, generator=None, progress=True, callback=None, start_step=0,
                 karras_sigmas=False):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x_0) / sigma (Karras et al. 2022, alg. 1)."""
    sigmas, timesteps = sigma_schedule(config, steps, karras_sigmas=karras_sigmas)
    _check_start(start_step, steps)
    x = _start_in_sigma_space(x, sigmas, start_step, config)
    for i in tqdm(range(start_step, steps), disable=not progress):
        x0 = _denoise(model, x, sigmas[i], timesteps[i], config.prediction_type)
        d = (x - x0) / sigmas[i]  # the ODE's slope at sigma_i
        x = x + d * (sigmas[i + 1] - sigmas[i])  # Euler step to sigma_{i+1}
        if callback is not None:
            callback(i - start_step, timesteps[i].item(), x)
    return x


def sample_euler_a(model, x, config, steps, *, generator=None, progress=True, callback=None, start_step=0):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise back up to sigma_{i+1}."""
    sigmas, timesteps = sigma_schedule(config, steps)
    _check_start(start_step, steps)
    x = _start_in_sigma_space(x, sigmas, start_step, config)
    for i in tqdm(range(start_step, steps), disable=not progress):
        x0 = _denoise(model, x, sigmas[i], timesteps[i], config.prediction_type)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5  # noise to add back
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5  # level the deterministic step aims at
        d = (x - x0) / sigma
        x = x + d * (sigma_down - sigma)  # Euler step to sigma_down
        x = x + _noise_like(x, generator) * sigma_up  # drawn every step, the last too, as diffusers does
        if callback is not None:
            callback(i - start_step, timesteps[i].item(), x)
    return x


def sample_heun(model, x, config, steps, *, generator=None, progress=True, callback=None, start_step=0,
                karras_sigmas=False):
    """Heun's 2nd-order method (Karras et al. 2022, alg. 1): an Euler step, then the average of the slopes
    at both ends; the last step (to sigma = 0) stays Euler. 2 * steps - 1 model calls."""
    sigmas, timesteps = sigma_schedule(config, steps, karras_sigmas=karras_sigmas)
    _check_start(start_step, steps)
    x = _start_in_sigma_space(x, sigmas, start_step, config)

    def denoise(x, i):
        x0 = _denoise(model, x, sigmas[i], timesteps[i], config.prediction_type)
        return x0.clamp(-config.clip_sample_range, config.clip_sample_range) if config.clip_sample else x0

    call = 0
    for i in tqdm(range(start_step, steps), disable=not progress):
        d = (x - denoise(x, i)) / sigmas[i]  # slope at sigma_i
        dt = sigmas[i + 1] - sigmas[i]
        x_euler = x + d * dt  # Euler step to sigma_{i+1}
        if callback is not None:
            callback(call, timesteps[i].item(), x_euler)
        call += 1
        if i == steps - 1:
            x = x_euler  # the last step, to sigma = 0, stays Euler
            break
        d_next = (x_euler - denoise(x_euler, i + 1)) / sigmas[i + 1]  # slope at the Euler point
        x = x + (d + d_next) / 2 * dt  # apply the 2nd-order correction
        if callback is not None:
            callback(call, timesteps[i + 1].item(), x)
        call += 1
    return x


def _alpha_sigma_lambda(sigma):
    """alpha_t, sigma_t and the half log-SNR lambda_t = log(alpha_t / sigma_t) of noise level sigma."""
    alpha_t = 1 / (sigma ** 2 + 1) ** 0.5
    sigma_t = sigma * alpha_t
    return alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t)


def _x0_from_vp(prediction_type, out, x, sigma):
    """x_0 from a model output at x_t (variance preserving), for the multistep solvers."""
    alpha_t, sigma_t, _ = _alpha_sigma_lambda(sigma)
    if prediction_type == "epsilon":
        return (x - sigma_t * out) / alpha_t
    if prediction_type == "v_prediction":
        return alpha_t * x - sigma_t * out
    return out


def sample_dpmpp_2m(model, x, config, steps, *, generator=None, progress=True, callback=None, start_step=0,
                    karras_sigmas=False):
    """DPM-Solver++(2M) (Lu et al. 2022, alg. 2): exponential integrator in lambda over the predicted x_0,
    2nd order from the previous x_0; the first and the last step are 1st order (DDIM)."""
    sigmas, timesteps = sigma_schedule(config, steps, karras_sigmas=karras_sigmas, multistep=True)
    _check_start(start_step, steps)
    x0_prev = h_prev = None
    for i in tqdm(range(start_step, steps), disable=not progress):
        x0 = _x0_from_vp(config.prediction_type, _call(model, x, timesteps[i]), x, sigmas[i])
        _, sigma_s, lambda_s = _alpha_sigma_lambda(sigmas[i])
        alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(sigmas[i + 1])
        h = lambda_t - lambda_s  # step size in log-SNR (infinite on the last step, to sigma = 0)
        x_next = (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0  # 1st order: DDIM
        if x0_prev is not None and i < steps - 1:
            d1 = (1.0 / (h_prev / h)) * (x0 - x0_prev)  # finite-difference derivative of x_0 in lambda
            x_next = x_next - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1  # 2nd-order (midpoint) term
        x, x0_prev, h_prev = x_next, x0, h
        if callback is not None:
            callback(i - start_step, timesteps[i].item(), x)
    return x


def _unipc_update(x, x0, sigma_from, sigma_to, back=None, new=None):
    """One UniPC (bh2) transfer of x from sigma_from to sigma_to along the predicted x0, plus weighted
    differences to `back` = (earlier x0, its lambda, weight) and, in the corrector, `new` = (x0 at
    sigma_to, weight)."""
    _, sigma_s, lambda_s = _alpha_sigma_lambda(sigma_from)
    alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(sigma_to)
    h = lambda_t - lambda_s
    b_h = torch.expm1(-h)  # B(h) = e^-h - 1 for bh2, which is also h * phi_1
    x_next = sigma_t / sigma_s * x - alpha_t * b_h * x0  # the DDIM / DPM-Solver++(1) part
    residual = 0
    if back is not None:
        x0_back, lambda_back, rho = back
        r = (lambda_back - lambda_s) / h  # where the earlier prediction sits, in units of h
        residual = rho * ((x0_back - x0) / r)
    if new is not None:
        x0_new, rho = new
        residual = residual + rho * (x0_new - x0)
    return x_next - alpha_t * b_h * residual


def _unic_weights(sigma_from, sigma_to, lambda_back):
    """The order-2 corrector's weights (rho_back, rho_new): R rho = b with R = [[1, 1], [r, 1]] and
    b_k = k! h phi_{k+1}(h) / B(h) (Zhao et al. 2023, with -h in the data-prediction form)."""
    _, _, lambda_s = _alpha_sigma_lambda(sigma_from)
    _, _, lambda_t = _alpha_sigma_lambda(sigma_to)
    h = lambda_t - lambda_s
    hh, b_h = -h, torch.expm1(-h)
    h_phi_2 = b_h / hh - 1  # phi_1 - 1 = hh * phi_2(hh)
    h_phi_3 = h_phi_2 / hh - 0.5  # phi_2 - 1/2 = hh * phi_3(hh)
    b1, b2 = h_phi_2 / b_h, 2 * h_phi_3 / b_h
    r = (lambda_back - lambda_s) / h
    rho_back = (b1 - b2) / (1 - r)  # the 2x2 system solved by hand
    return rho_back, b1 - rho_back


def sample_unipc(model, x, config, steps, *, generator=None, progress=True, callback=None, start_step=0,
                 karras_sigmas=False):
    """UniPC (Zhao et al. 2023), bh2, order 2: each fresh model output first corrects the step that led
    to it (UniC), then drives a multistep predictor (UniP). 1st order on the first and last steps; the
    final predicted step is not corrected, so one model call per step."""
    sigmas, timesteps = sigma_schedule(config, steps, karras_sigmas=karras_sigmas, multistep=True)
    _check_start(start_step, steps)

    def lam(i):
        return _alpha_sigma_lambda(sigmas[i])[2]

    x0_prev = x0_prev2 = x_last = None
    order_last = 1
    for i in tqdm(range(start_step, steps), disable=not progress):
        x0 = _x0_from_vp(config.prediction_type, _call(model, x, timesteps[i]), x, sigmas[i])
        if x0_prev is not None:  # corrector: redo the last step with the model output at its end
            if order_last == 1:  # UniC-1
                x = _unipc_update(x_last, x0_prev, sigmas[i - 1], sigmas[i], new=(x0, 0.5))
            else:  # UniC-2
                rho_back, rho_new = _unic_weights(sigmas[i - 1], sigmas[i], lam(i - 2))
                x = _unipc_update(x_last, x0_prev, sigmas[i - 1], sigmas[i], back=(x0_prev2, lam(i - 2), rho_back),
                                  new=(x0, rho_new))
        order = 1 if x0_prev is None or i == steps - 1 else 2
        x_last = x
        if order == 1:  # predictor UniP-1 (DPM-Solver++(1))
            x = _unipc_update(x, x0, sigmas[i], sigmas[i + 1])
        else:  # UniP-2
            x = _unipc_update(x, x0, sigmas[i], sigmas[i + 1], back=(x0_prev, lam(i - 1), 0.5))
        x0_prev2, x0_prev, order_last = x0_prev, x0, order
        if callback is not None:
            callback(i - start_step, timesteps[i].item(), x)
    return x


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "plms": sample_plms, "euler": sample_euler,
            "euler_a": sample_euler_a, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m, "unipc": sample_unipc}
# The keyword options each sampler takes beyond the common ones; OPTION_DEFAULTS holds the value of
# each that changes nothing, so a caller may pass it to any sampler.
SAMPLER_OPTIONS = {"ddpm": set(), "ddim": {"eta"}, "plms": set(), "euler": {"karras_sigmas"}, "euler_a": set(),
                   "heun": {"karras_sigmas"}, "dpmpp_2m": {"karras_sigmas"}, "unipc": {"karras_sigmas"}}
OPTION_DEFAULTS = {"eta": 0.0, "karras_sigmas": False}


def sampler_options(name, **options):
    """The options `name` takes, from a full set of them; one set to a non-default value that the
    sampler does not take is an error (e.g. karras_sigmas with ddim)."""
    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    for option, value in options.items():
        if option not in SAMPLER_OPTIONS[name] and value != OPTION_DEFAULTS[option]:
            takers = sorted(s for s, opts in SAMPLER_OPTIONS.items() if option in opts)
            raise ValueError(f"{option}={value!r} does not apply to the {name} sampler; it applies to "
                             f"{', '.join(takers)}")
    if "karras_sigmas" in options and not isinstance(options["karras_sigmas"], bool):
        raise ValueError(f"karras_sigmas must be True or False, got {options['karras_sigmas']!r}")
    return {option: value for option, value in options.items() if option in SAMPLER_OPTIONS[name]}


MULTISTEP = {"dpmpp_2m", "unipc"}  # timesteps spaced as diffusers' DPM-Solver/UniPC schedulers


def start_alpha_cumprod(name, config, steps, start_step, *, eta=0.0, karras_sigmas=False):
    """alpha_bar of the noise level that `name` starts from at `start_step`: img2img noises its latents
    to it, and the sampler takes that x_t (sigma-space samplers rescale it to sigma themselves)."""
    if name in ("ddpm", "ddim", "plms"):
        return NoiseSchedule.from_config(config).alphas_cumprod[make_timesteps(config, steps)[start_step]]
    sigmas, _ = sigma_schedule(config, steps, karras_sigmas=karras_sigmas, multistep=name in MULTISTEP)
    return 1 / (1 + sigmas[start_step] ** 2)


def num_model_calls(sampler_name, steps):
    """How many times `sampler_name` calls the model for `steps` steps.

    PLMS revisits its second step (steps + 1); Heun evaluates twice per step except the last, an
    Euler step to sigma = 0 (2 * steps - 1, as diffusers' HeunDiscreteScheduler). Cache schedules
    count these calls, not steps: with Heun, interval N runs every N-th call in full wherever it
    falls in a step, and a cached slope may feed either half of a step.
    """
    if sampler_name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler_name!r}; choose one of {sorted(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if sampler_name == "heun":
        return 2 * steps - 1
    return steps + 1 if sampler_name == "plms" and steps > 1 else steps
