"""A loaded model (a denoising network, U-Net or DiT, + noise schedule, and for latent models an
autoencoder and maybe a text encoder) and `generate`, which reads as the steps of a run:
conditioning, initial noise, the cached network (minidiff.cache), the sampler, decoding.

`load` reads the native folder (minidiff.folder describes it); `Pipeline.save` writes it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import folder, packing
from .cache import DEFAULT_POWER, CacheOptions, RunStats, shallow_ratio, wrap  # noqa: F401 (RunStats: its old home)
from .denoiser import Denoiser, check_denoiser
from .folder import FORMAT, FORMAT_VERSION, split_state_dict  # noqa: F401 (importable from here as before)
from .samplers import SAMPLERS, num_model_calls, sampler_options, start_alpha_cumprod
from .schedules import SchedulerConfig


class Pipeline:
    """A loaded model and its sampling steps: `conditioning`, `initial_noise` and `sample` are the
    pieces `generate` is built from, public so measurements can run them with their own model callable."""

    def __init__(self, denoiser: Denoiser, scheduler: SchedulerConfig, *, autoencoder=None, text_encoder=None,
                 tokenizer=None, null_class: Optional[int] = None, class_names: Optional[list] = None,
                 calibration: Optional[dict] = None, meta: Optional[dict] = None, pack: bool = True):
        check_denoiser(denoiser)
        self.denoiser, self.scheduler = denoiser.eval(), scheduler
        self.autoencoder = autoencoder.eval() if autoencoder is not None else None
        self.text_encoder = text_encoder.eval() if text_encoder is not None else None
        self.tokenizer = tokenizer
        self.null_class, self.class_names = null_class, class_names
        self.calibration = calibration
        self.calibration_error: Optional[str] = None  # why a damaged calibration.json was skipped at load
        self.source: Optional[Path] = None  # the folder `load` read, which `save` never replaces
        self.meta = dict(meta or {})
        self.last_run: Optional[RunStats] = None
        self.controlnets: list = []  # minidiff.controlnet.ControlNet, steering every generate (add_controlnet)
        denoiser.num_train_timesteps = scheduler.num_train_timesteps  # lets the network refuse timesteps past it
        self.packs = pack  # False for a network still being trained (its EMA is updated in place)
        if pack:
            self._pack_denoiser()

    # -- properties ---------------------------------------------------------------------------

    @property
    def unet(self) -> Denoiser:
        """The denoising network, a U-Net or a DiT (deprecated name: use `denoiser`)."""
        warnings.warn("Pipeline.unet is deprecated: the network may be a DiT; use Pipeline.denoiser",
                      DeprecationWarning, stacklevel=2)
        return self.denoiser

    @unet.setter
    def unet(self, network: Denoiser):
        warnings.warn("Pipeline.unet is deprecated: use Pipeline.denoiser", DeprecationWarning, stacklevel=2)
        check_denoiser(network)
        self.denoiser = network

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def latent_scale(self) -> int:
        """Pixels per latent pixel (1 for pixel-space models)."""
        return 1 if self.autoencoder is None else self.autoencoder.downsample_factor

    @property
    def default_size(self) -> int:
        size = self.denoiser.config.sample_size or 32
        return size * self.latent_scale

    def to(self, device=None, dtype=None, *, pack: Optional[bool] = None) -> "Pipeline":
        """Move the models; the autoencoder stays float32 (half-precision decoding overflows).

        On CPU in float32 the denoiser's layers are then marked for oneDNN weight packing
        (minidiff.packing: each weight is reordered once, on first use, instead of on every call).
        `pack` None keeps the pipeline's choice (`Pipeline(..., pack=)`); True or False changes it."""
        check_dtype(self.device if device is None else torch.device(device), dtype)
        self.denoiser.to(device=device, dtype=dtype)  # packed layers return to plain weights first
        for net in self.controlnets:
            net.to(device=device, dtype=dtype)
        self.packs = self.packs if pack is None else pack
        if self.packs:
            self._pack_denoiser()
        if self.text_encoder is not None:
            self.text_encoder.to(device=device, dtype=dtype)
        if self.autoencoder is not None:
            self.autoencoder.to(device=device)
        return self

    def _pack_denoiser(self):
        """oneDNN weight packing, where it applies (CPU, float32): see `to`."""
        if packing.available(self.device, self.dtype):
            packing.pack(self.denoiser)

    # -- conditioning -------------------------------------------------------------------------

    def _class_cond(self, class_labels, batch_size, guidance_scale):
        cfg = self.denoiser.config
        if cfg.num_classes is None:
            if class_labels is not None:
                raise ValueError("this model is not class-conditional; drop class_labels")
            if guidance_scale is not None and guidance_scale != 1.0 and cfg.context_dim is None:
                raise ValueError("this model is unconditional, so guidance_scale has nothing to guide; leave it unset")
            return None, None
        if class_labels is None:
            raise ValueError(f"this model is class-conditional: pass class_labels (ints in [0, "
                             f"{self.num_real_classes() - 1}])")
        try:
            labels = torch.as_tensor(class_labels)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise ValueError(f"class_labels must be integers, got {class_labels!r}") from None
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be integers, got dtype {labels.dtype}")
        labels = labels.long().reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(batch_size)
        if labels.numel() != batch_size:
            raise ValueError(f"got {labels.numel()} class labels for batch_size {batch_size}")
        if int(labels.min()) < 0 or int(labels.max()) >= cfg.num_classes:
            raise ValueError(f"class labels must lie in [0, {cfg.num_classes - 1}], got {labels.tolist()}")
        uncond = None
        if guidance_scale is not None and guidance_scale != 1.0:
            if self.null_class is None:
                raise ValueError("this model has no unconditional class, so it cannot use classifier-free guidance; "
                                 "leave guidance_scale unset")
            uncond = torch.full_like(labels, self.null_class)
        return labels.to(self.device), None if uncond is None else uncond.to(self.device)

    @torch.inference_mode()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, 77, D) text context; computed once per generate call, never per step."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this model has no text encoder/tokenizer; it cannot take a prompt")
        ids = self.tokenizer(list(prompts)).to(self.device)
        return self.text_encoder(ids).to(self.dtype)

    def _text_cond(self, prompt, negative_prompt, batch_size, guidance_scale):
        if self.denoiser.config.context_dim is None or self.denoiser.config.num_classes is not None:
            if prompt is not None:
                raise ValueError("this model does not take a prompt")
            return None, None
        if prompt is None:
            raise ValueError("this model is text-conditioned: pass prompt='...'")
        prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
        if len(prompts) != batch_size:
            if batch_size != 1:
                raise ValueError(f"got {len(prompts)} prompts for batch_size {batch_size}")
            batch_size = len(prompts)
        cond = self.encode_prompt(prompts)
        if guidance_scale is None or guidance_scale <= 1.0:
            return cond, None
        negatives = negative_prompt if negative_prompt is not None else ""
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
        if len(negatives) != len(prompts):
            raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
        return cond, self.encode_prompt(negatives)

    def conditioning(self, batch_size: int, *, class_labels=None, prompt=None, negative_prompt=None,
                     guidance_scale: Optional[float] = None) -> tuple:
        """(cond, uncond) the network takes for these labels or prompts: cond is None for an unconditional
        model, uncond is None without classifier-free guidance."""
        class_cond, class_uncond = self._class_cond(class_labels, batch_size, guidance_scale)
        text_cond, text_uncond = self._text_cond(prompt, negative_prompt, batch_size, guidance_scale)
        cond = class_cond if class_cond is not None else text_cond
        uncond = class_uncond if class_uncond is not None else text_uncond
        return cond, uncond

    def default_labels(self, batch_size: int) -> list:
        """One of each real class in turn (0, 1, 2, ...), for class-conditional models."""
        return [i % self.num_real_classes() for i in range(batch_size)]

    @property
    def default_guidance(self) -> Optional[float]:
        """The guidance scale `generate` uses when given none: config.json's "guidance_scale" (a text
        model trained here stores the scale its prompt-following was measured at), else None (off)."""
        g = self.meta.get("guidance_scale")
        return float(g) if isinstance(g, (int, float)) and not isinstance(g, bool) else None

    def guidance_for(self, guidance_scale: Optional[float]) -> Optional[float]:
        """The guidance a run asked for `guidance_scale` uses: None means the model's default."""
        return self.default_guidance if guidance_scale is None else guidance_scale

    def num_real_classes(self) -> int:
        """The number of class labels a user may pass (the null class of guidance excluded)."""
        n = self.denoiser.config.num_classes
        return n - 1 if self.null_class == n - 1 else n

    # -- generation ---------------------------------------------------------------------------

    def make_denoiser(self, cached, cond, uncond, guidance_scale, control=None):
        """`(x, t) -> eps` for a sampler; guidance runs both halves as one batched network call,
        so a cached step caches the conditional and unconditional features together. A text
        context's cross-attention keys and values are projected here, once for all steps.
        `control` (minidiff.controlnet.Controlled) wraps the conditioning with ControlNet hints."""
        text = self.denoiser.config.context_dim is not None and self.denoiser.config.num_classes is None
        project = self.denoiser.prepare_context if text else (lambda c: c)

        def prepare(c, copies):
            return project(c) if control is None else control.repeat(copies).with_cond(project(c))

        if uncond is None:
            cond = prepare(cond, 1)
            return lambda x, t: cached(x, t, cond)
        both = prepare(torch.cat([uncond, cond]), 2)

        def guided(x, t):
            out_uncond, out_cond = cached(torch.cat([x, x]), t, both).chunk(2)
            return out_uncond + guidance_scale * (out_cond - out_uncond)

        return guided

    def shallow_ratio(self, branch: int, x: torch.Tensor, cond=None) -> float:
        """MACs of a shallow step at `branch` over a full step, for one sample shaped like x[:1]
        (minidiff.cache.shallow_ratio: counted once, then remembered)."""
        return shallow_ratio(self.denoiser, branch, x, cond)

    @torch.inference_mode()
    def generate(self, *, steps: int = 50, sampler: str = "ddim", eta: float = 0.0, karras_sigmas: bool = False,
                 cache_interval: int = 1, cache_branch: int = 0, cache_schedule="uniform", cache_forecast=None,
                 cache_threshold: Optional[float] = None, cache_budget: Optional[float] = None,
                 seed: Optional[int] = None,
                 noise: Optional[torch.Tensor] = None, batch_size: int = 1, class_labels=None,
                 guidance_scale: Optional[float] = None, prompt=None, negative_prompt=None,
                 height: Optional[int] = None, width: Optional[int] = None, output: str = "image",
                 cache_center: Optional[int] = None, cache_power: float = DEFAULT_POWER,
                 generator: Optional[torch.Generator] = None, progress: bool = True, callback=None,
                 init_image: Optional[torch.Tensor] = None, strength: float = 0.75, center: Optional[int] = None,
                 power: Optional[float] = None, budget: Optional[float] = None, control_image=None,
                 controlnet_scale=1.0) -> torch.Tensor:
        """Sample images (in [0, 1], (B, C, H, W)) or, with output="latent", the final sample.

        img2img: `init_image` ((B or 1, 3, H, W) in [0, 1]) is encoded, noised to the step where
        `strength` of the `steps` remain, and denoised from there; `noise` is then the noise added.
        `guidance_scale` None means the model's `default_guidance` (off unless config.json names one).
        `center`/`power` are the old names of `cache_center`/`cache_power` (deprecated).
        Sampler options (`eta`, `karras_sigmas`) are refused where the sampler does not take them.

        Caching: `cache_schedule` names the full steps ("uniform", "nonuniform", "calibrated", a list)
        or "adaptive": each sample refreshes when its features at the cut stray from their forecast
        by more than `cache_threshold`, spending at most `cache_budget` of the uncached run's MACs.
        `cache_forecast` = 0 reuses the deep feature (DeepCache), 1 or 2 extrapolates it through the
        last 2 or 3 full steps, "auto" picks 2 for deterministic samplers and 0 for noisy ones,
        "foca", "hermite", "chebyshev" or "dicache" forecasts it by that published rule
        (minidiff.forecasters, compared in docs/adaptive.md); None (default) means 0 for fixed
        schedules and "auto" for the adaptive one. An option the schedule would ignore is refused by name (minidiff.cache.CacheOptions).

        `budget` (a fraction of the MACs of `steps` uncached steps) lets the model's plan.json
        (`minidiff plan`) choose the steps and caching: the best configuration measured within it.

        ControlNet (`add_controlnet`): `control_image` ((B or 1, 3, H, W) in [0, 1], one per ControlNet
        as a list) steers the run, times `controlnet_scale`; a shallow step runs each ControlNet only
        up to the cut (minidiff.controlnet). Its size is the default height/width.
        """
        guidance_scale = self.guidance_for(guidance_scale)  # 1.0 (or anything <= 1) turns a stored default off
        if budget is not None:
            return self._generate_within(budget, steps, dict(
                cache_interval=cache_interval, cache_branch=cache_branch, cache_schedule=cache_schedule,
                cache_forecast=cache_forecast, cache_threshold=cache_threshold, cache_budget=cache_budget,
                cache_center=cache_center, cache_power=cache_power), dict(
                sampler=sampler, eta=eta, karras_sigmas=karras_sigmas, seed=seed, noise=noise, batch_size=batch_size,
                class_labels=class_labels, guidance_scale=guidance_scale, prompt=prompt,
                negative_prompt=negative_prompt, height=height, width=width, output=output, generator=generator,
                progress=progress, callback=callback, init_image=init_image, strength=strength,
                control_image=control_image, controlnet_scale=controlnet_scale))
        if center is not None or power is not None:
            warnings.warn("generate(center=, power=) are deprecated: use cache_center= and cache_power=",
                          DeprecationWarning, stacklevel=3)  # past inference_mode's wrapper
            cache_center = center if center is not None else cache_center
            cache_power = power if power is not None else cache_power
        _check_args(steps=steps, sampler=sampler, eta=eta, batch_size=batch_size, guidance_scale=guidance_scale,
                    output=output, seed=seed)
        options = sampler_options(sampler, eta=eta, karras_sigmas=karras_sigmas)
        batch_size = self._batch_size(batch_size, noise, class_labels, prompt, init_image)
        if (control_image is None) != (not self.controlnets):
            raise ValueError("control_image needs a ControlNet (load(..., controlnet=DIR) or add_controlnet)"
                             if control_image is not None else "this pipeline has a ControlNet: pass control_image")
        if control_image is not None and height is None and width is None and noise is None:
            first = control_image[0] if isinstance(control_image, (list, tuple)) else control_image
            height, width = (tuple(first.shape[2:]) if torch.is_tensor(first) and first.ndim == 4 else (None, None))

        cond, uncond = self.conditioning(batch_size, class_labels=class_labels, prompt=prompt,
                                         negative_prompt=negative_prompt, guidance_scale=guidance_scale)
        if generator is None:
            generator = torch.Generator("cpu")
            generator.manual_seed(seed if seed is not None else torch.seed())
        if init_image is not None:
            x, start_step = self._img2img_start(init_image, strength, steps, noise, batch_size, height, width,
                                                generator, sampler, options)
        else:
            x, start_step = self.initial_noise(batch_size, height=height, width=width, generator=generator,
                                               noise=noise), 0
        self._check_memory(x, 2 if uncond is not None else 1)
        control = None
        if control_image is not None:
            from .controlnet import control_for

            control = control_for(self.controlnets, control_image, controlnet_scale, x.shape[0], tuple(x.shape[2:]))
        cached = wrap(self.denoiser, calls=num_model_calls(sampler, steps - start_step), x=x, cond=cond,
                      sampler=sampler, sampler_options=options, steps=steps, calibration=self.calibration,
                      calibration_error=self.calibration_error,
                      schedule=cache_schedule, interval=cache_interval, branch=cache_branch, center=cache_center,
                      power=cache_power, forecast=cache_forecast, threshold=cache_threshold, budget=cache_budget)

        start = time.perf_counter()
        sample = self.sample(cached, x, steps=steps, sampler=sampler, cond=cond, uncond=uncond,
                             guidance_scale=guidance_scale, generator=generator, progress=progress,
                             callback=self._stop_at_nan(callback, guidance_scale if uncond is not None else None),
                             start_step=start_step, control=control, **options)
        result = sample if output == "latent" else self.decode(sample)
        self.last_run = cached.run_stats(steps, time.perf_counter() - start)
        return result

    def _generate_within(self, budget, steps, cache_options: dict, others: dict):
        """generate(budget=...): the plan picks every cache_* option, so none may be given."""
        from .planner import generate_within

        defaults = {f"cache_{f.name}": f.default for f in dataclasses.fields(CacheOptions)}
        given = sorted(k for k, v in cache_options.items() if v != defaults[k])
        if given:
            raise ValueError(f"budget= lets the model's plan choose the caching; drop {', '.join(given)}")
        return generate_within(self, budget, steps, **others)

    def _batch_size(self, batch_size: int, noise, class_labels, prompt, init_image) -> int:
        """The batch follows the noise, labels, prompts or images when they are given."""
        if noise is not None and (not torch.is_tensor(noise) or noise.ndim != 4 or noise.shape[0] < 1):
            raise ValueError(f"noise must be a tensor of shape (B >= 1, {self.denoiser.config.in_channels}, H, W), "
                             f"got {tuple(noise.shape) if torch.is_tensor(noise) else type(noise).__name__}")
        if batch_size != 1:
            return batch_size
        if noise is not None:
            return noise.shape[0]
        if class_labels is not None and torch.as_tensor(class_labels).numel() > 1:
            return torch.as_tensor(class_labels).numel()
        if isinstance(prompt, (list, tuple)):
            return len(prompt)
        if init_image is not None and getattr(init_image, "ndim", 0) == 4:
            return init_image.shape[0]
        return batch_size

    def _stop_at_nan(self, callback, guidance_scale: Optional[float]):
        """The sampler's callback, which first stops the run at the first step that breaks (not after it)."""
        causes = ["network weights that are not finite or overflow", "noise that is not finite"]
        if guidance_scale is not None:
            causes.insert(0, f"guidance_scale={guidance_scale} too large")
        if self.dtype in (torch.float16, torch.bfloat16):
            causes.insert(0, "half-precision overflow (try dtype=torch.float32)")

        def checked(i, t, x):
            if not torch.isfinite(x).all():
                raise FloatingPointError(f"the sample became NaN/Inf at step {i + 1} (timestep {t}); likely "
                                         f"cause: {' or '.join(causes)}")
            if callback is not None:
                callback(i, t, x)

        return checked

    @torch.inference_mode()
    def sample(self, model, x: torch.Tensor, *, steps: int, sampler: str = "ddim", cond=None, uncond=None,
               guidance_scale: Optional[float] = None, generator: Optional[torch.Generator] = None,
               progress: bool = True, callback=None, start_step: int = 0, control=None, **options) -> torch.Tensor:
        """Run `sampler` from `x` with any `model(x, t, cond)` callable (the network, a `CachedModel`, a
        wrapper) under this model's noise schedule; returns the final sample (latents for latent models).
        `options` are the sampler's own (`samplers.SAMPLER_OPTIONS`, e.g. eta for ddim)."""
        denoiser = self.make_denoiser(model, cond, uncond, guidance_scale, control)
        return SAMPLERS[sampler](denoiser, x, self.scheduler, steps, generator=generator, progress=progress,
                                 callback=callback, start_step=start_step, **options)

    def initial_noise(self, batch_size: int = 1, *, height: Optional[int] = None, width: Optional[int] = None,
                      generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
        """The starting sample: `noise` moved to the model's device and dtype, or standard normal noise
        drawn in float32 on the CPU from `generator` at `height` x `width` pixels (default size)."""
        cfg = self.denoiser.config
        if noise is not None:
            if noise.shape[1] != cfg.in_channels:
                raise ValueError(f"noise must have shape (B, {cfg.in_channels}, H, W), got {tuple(noise.shape)}")
            # a copy made here is an inference tensor like every later x, so a compiled U-Net sees
            # one kind of input at every step
            return noise.to(self.device, self.dtype, copy=True)
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        self._check_size(height, width)
        shape = (batch_size, cfg.in_channels, height // self.latent_scale, width // self.latent_scale)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device, self.dtype)

    def _check_size(self, height, width):
        """Any size the models take, as diffusers allows: multiples of the autoencoder's factor (8 for
        SD) times the network's own input multiple (1 for the U-Net, which upsamples odd sizes back
        to each skip's), and at least one latent pixel per halving of the network."""
        scale, factor = self.latent_scale, self.denoiser.config.downsample_factor
        multiple = scale * self.denoiser.input_multiple
        smallest = scale * factor
        kind = "an int" if multiple == 1 else f"a multiple of {multiple} (the " + \
            ("autoencoder's" if multiple == scale else "model's total") + " downsampling)"
        for name, size in (("height", height), ("width", width)):
            if not isinstance(size, int) or isinstance(size, bool) or size < smallest or size % multiple \
                    or size > 16384:
                raise ValueError(f"{name} must be {kind} between {smallest} and 16384, got {size!r}")

    # Beyond this many times the trained size, generate states the memory it will take (and refuses
    # when that exceeds what is free): 4096 px on a 16 px model reached 14 GB within 20 s.
    LARGE_FACTOR = 8
    # Peak activation memory of one U-Net call over the skip connections' total, measured on
    # weights/digits-cond at 128-512 px (2.8-3.1x); the skips are all alive when decoding starts.
    ACTIVATION_FACTOR = 3.2

    def estimate_memory(self, height: int, width: int, batch_size: int = 1) -> int:
        """Bytes of activations one U-Net call takes for latents of this size (batch doubles with guidance)."""
        elements = sum(c * h * w for c, h, w in self.denoiser.feature_shapes(height, width))
        return int(self.ACTIVATION_FACTOR * elements * batch_size * self.dtype.itemsize)

    def _check_memory(self, x: torch.Tensor, copies: int):
        trained = self.denoiser.config.sample_size or 32
        height, width = x.shape[2], x.shape[3]
        if max(height, width) <= self.LARGE_FACTOR * trained:
            return
        need = self.estimate_memory(height, width, x.shape[0] * copies)
        free = available_memory(self.device)
        size = f"{height * self.latent_scale}x{width * self.latent_scale}"
        trained_px = trained * self.latent_scale
        if free is not None and need > free:
            raise ValueError(f"{size} is over {self.LARGE_FACTOR}x the {trained_px} px this model was trained at and "
                             f"would need about {need / 2 ** 30:.1f} GiB for activations, more than the "
                             f"{free / 2 ** 30:.1f} GiB free on {self.device}; lower height/width or batch_size")
        warnings.warn(f"{size} is over {self.LARGE_FACTOR}x the {trained_px} px this model was trained at: expect "
                      f"about {need / 2 ** 30:.2f} GiB of activations per U-Net call and a long run", stacklevel=4)

    def _img2img_start(self, image, strength, steps, noise, batch_size, height, width, generator, sampler, options):
        """(noised latents, first step) for img2img, as diffusers' StableDiffusionImg2ImgPipeline:
        the image's mean latents noised to timesteps[t_start], t_start = steps - int(steps * strength)."""
        if self.autoencoder is None:
            raise ValueError("init_image needs a latent model (one with an autoencoder)")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise ValueError(f"strength must be a number in (0, 1] (the share of the steps that re-noise the "
                             f"image; 1 ignores it), got {strength!r}")
        remaining = min(int(steps * strength), steps)
        if remaining < 1:
            raise ValueError(f"strength {strength} of {steps} steps leaves no step to run; raise strength or steps")
        if not torch.is_tensor(image) or image.ndim != 4 or image.shape[1] != 3 \
                or image.shape[0] not in (1, batch_size):
            raise ValueError(f"init_image must be a tensor of shape ({batch_size} or 1, 3, H, W), got "
                             f"{tuple(getattr(image, 'shape', ()))}")
        if image.min() < 0 or image.max() > 1:
            raise ValueError("init_image must hold values in [0, 1] (it is mapped to [-1, 1] for the encoder)")
        size = tuple(image.shape[2:])
        self._check_size(*size)
        if (height or size[0], width or size[1]) != size:
            raise ValueError(f"height/width {height}x{width} differ from init_image's {size[0]}x{size[1]}; drop them")
        latents = self.autoencoder.encode(2 * image.to(self.device, torch.float32) - 1)  # mean, scaled
        latents = latents.expand(batch_size, -1, -1, -1)
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        elif noise.shape != latents.shape:
            raise ValueError(f"noise must have the latents' shape {tuple(latents.shape)}, got {tuple(noise.shape)}")
        start_step = steps - remaining
        alpha = start_alpha_cumprod(sampler, self.scheduler, steps, start_step, **options).to(latents.device)
        x = alpha ** 0.5 * latents + (1 - alpha) ** 0.5 * noise.to(latents.device, latents.dtype)
        return x.to(self.dtype), start_step

    @torch.inference_mode()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Final sample -> images in [0, 1]; latent models decode in float32."""
        if self.autoencoder is not None:
            x = self.autoencoder.decode(x.float())
        return ((x.float() + 1) / 2).clamp(0, 1)

    # -- saving (minidiff.folder) ---------------------------------------------------------------

    @property
    def denoiser_kind(self) -> str:
        """"unet" or "dit": the config section and weight prefix of `self.denoiser`, whichever network it is."""
        return folder.denoiser_kind(self.denoiser)

    def config_dict(self) -> dict:
        return folder.config_dict(self)

    def state_dict(self) -> dict:
        return folder.state_dict(self)

    def save(self, dst, *, overwrite: bool = False, dtype: Optional[torch.dtype] = None):
        """Write the native folder atomically (minidiff.folder.save): a crash leaves the old folder
        (or none), never half. `dtype=torch.float16` (or bfloat16) stores float weights in that precision."""
        folder.save(self, dst, overwrite=overwrite, dtype=dtype)

    def load_lora(self, path, scale: float = 1.0) -> "Pipeline":
        """Merge a LoRA file (kohya or diffusers/PEFT .safetensors) into the weights, times `scale`;
        repeatable. See minidiff.lora."""
        from .lora import load_lora

        load_lora(self, path, scale)
        return self

    def add_controlnet(self, controlnet) -> "Pipeline":
        """Steer every later generate with a ControlNet (a folder from convert/controlnet.py, or a
        minidiff.controlnet.ControlNet); repeatable, their residuals add. Refused if made for another base."""
        from . import controlnet as cn

        net = controlnet if isinstance(controlnet, cn.ControlNet) else cn.load(controlnet, device=self.device)
        cn.check_fits(net, self.denoiser, f"ControlNet {controlnet}" if not isinstance(controlnet, cn.ControlNet)
                      else "the ControlNet")
        self.controlnets.append(net.to(self.device, self.dtype).eval())
        return self

    def unload_lora(self) -> "Pipeline":
        """Restore the weights from before the first `load_lora`, bit for bit."""
        from .lora import unload_lora

        unload_lora(self)
        return self


def _check_args(*, steps, sampler, eta, batch_size, guidance_scale, output, seed):
    """generate's arguments other than the cache options (minidiff.cache.CacheOptions checks those)."""
    if isinstance(steps, bool) or isinstance(batch_size, bool):
        raise ValueError("steps and batch_size must be ints, not True/False")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 64):
        raise ValueError(f"seed must be None or an int in [0, 2**64 - 1], got {seed!r}")
    if not isinstance(steps, int) or not 1 <= steps <= 10_000:
        raise ValueError(f"steps must be an int in [1, 10000], got {steps!r}")
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    if not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    if not isinstance(batch_size, int) or not 1 <= batch_size <= 4096:
        raise ValueError(f"batch_size must be an int in [1, 4096], got {batch_size!r}")
    if guidance_scale is not None and (not isinstance(guidance_scale, (int, float)) or
                                       not math.isfinite(guidance_scale) or not 0.0 <= guidance_scale <= 100.0):
        raise ValueError(f"guidance_scale must be a number in [0, 100], got {guidance_scale!r}")
    if output not in ("image", "latent"):
        raise ValueError(f"output must be 'image' or 'latent', got {output!r}")


@functools.lru_cache(maxsize=None)
def check_dtype(device: torch.device, dtype: Optional[torch.dtype]):
    """Refuse up front a dtype the model cannot compute in on `device` (tried once on a tiny input)."""
    if dtype is None:
        return
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"dtype must be torch.float32, torch.float16, torch.bfloat16 or torch.float64, got {dtype}")
    if dtype in (torch.float32, torch.float64):
        return
    try:  # the kernels a U-Net needs: convolution, float32 group norm, attention, linear
        x = torch.ones(1, 8, 4, 4, device=device, dtype=dtype)
        h = torch.nn.functional.conv2d(x, torch.ones(8, 8, 3, 3, device=device, dtype=dtype), padding=1)
        h = torch.nn.functional.group_norm(h.float(), 2).to(dtype).flatten(2).transpose(1, 2)
        h = torch.nn.functional.scaled_dot_product_attention(h[None], h[None], h[None])
        torch.nn.functional.linear(h, torch.ones(8, 8, device=device, dtype=dtype))
    except (RuntimeError, NotImplementedError) as e:
        raise ValueError(f"{dtype} does not run on {device} with this torch ({str(e).splitlines()[0][:120]}); use "
                         "torch.float32 there") from None


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes free for new allocations on `device`, or None where that cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def load(path, *, device="cpu", dtype: Optional[torch.dtype] = None, allow_nan: bool = False,
         check: str = "first-use", pack: bool = True, controlnet=None) -> Pipeline:
    """Load a native minidiff model folder (see convert/ for public checkpoints).

    `dtype` is the denoiser's and text encoder's precision, float32 unless given, whatever the file
    holds (a float16 file loads as float32 or, asked, as float16); the autoencoder stays float32.
    Weights with NaN/Inf are refused (unless `allow_nan`): with `check="first-use"` by each layer
    just before it first runs, so loading reads no weight it does not need yet; `check="now"`
    reads them all before returning. `pack=False` keeps CPU weights in the plain layout (see Pipeline.to).
    `controlnet` is a ControlNet folder (or a list of them): see Pipeline.add_controlnet.
    """
    if check not in ("first-use", "now"):
        raise ValueError(f"check must be 'first-use' or 'now', got {check!r}")
    check_dtype(torch.device(device), dtype)
    denoiser, scheduler, parts, calibration_error = folder.read(path, device=device, dtype=dtype,
                                                                allow_nan=allow_nan, check=check)
    pipe = Pipeline(denoiser, scheduler, **parts, pack=False)
    pipe.calibration_error = calibration_error
    pipe.source = Path(path)
    pipe = pipe.to(device=device, dtype=dtype, pack=pack)
    for net in [] if controlnet is None else controlnet if isinstance(controlnet, (list, tuple)) else [controlnet]:
        pipe.add_controlnet(net)
    return pipe
