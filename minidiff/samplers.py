"""Samplers: DDPM, DDIM and PLMS as plain loops over `model(x, t) -> model_output`.

Every sampler takes one keyword set, `sample_x(model, x, config, steps, *, generator=None,
progress=True, callback=None, start_step=0, **options)`, where `options` are its own, listed in
`SAMPLER_OPTIONS` (a sampler that draws no noise ignores `generator`), so callers never switch on names.

`t` reaches the model as a 0-dim LongTensor; caching and conditioning live in the callable, not
here. Update formulas, schedule constants (float32) and the order of random draws follow
diffusers' DDPM, DDIM and PNDM(skip_prk_steps=True) schedulers, so one seed gives one image.
"""

import torch
from tqdm.auto import tqdm

from .schedules import NoiseSchedule, make_timesteps


def _check_eta(eta):
    if not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise ValueError(f"eta must be a number between 0 (deterministic DDIM) and 1 (DDPM-like noise), got {eta!r}")


def _call(model, x, t):
    out = model(x, torch.tensor(t, dtype=torch.long, device=x.device))
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
    Deterministic: `generator` is accepted for the shared signature and unused."""
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


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "plms": sample_plms}
SAMPLER_OPTIONS = {"ddpm": set(), "ddim": {"eta"}, "plms": set()}  # keywords beyond the shared set


def num_model_calls(sampler_name, steps):
    """How many times `sampler_name` calls the model for `steps` steps (PLMS revisits its second step)."""
    if sampler_name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler_name!r}; choose one of {sorted(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return steps + 1 if sampler_name == "plms" and steps > 1 else steps
