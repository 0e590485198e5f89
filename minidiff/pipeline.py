"""A loaded model (U-Net + noise schedule, and for latent models an autoencoder and maybe a text
encoder) and `generate`, which wires conditioning, guidance, caching and a sampler together.

The native folder:
    config.json        what the model is: {"format": "minidiff", "unet": {...}, "autoencoder": ...}
    scheduler.json     the noise schedule and sampler conventions (SchedulerConfig)
    model.safetensors  all weights, keys prefixed by component: unet.*, autoencoder.*, text_encoder.*
    tokenizer/         vocab.json + merges.txt (text-conditioned models)
    calibration.json   optional: measured feature change for cache_schedule="calibrated"
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from .cache import CachedUNet, load_calibrated, make_schedule
from .checkpoint import (CheckpointError, atomic_folder, check_finite, load_weights, read_state_dict, save_json,
                         save_safetensors)
from .samplers import SAMPLERS, num_model_calls
from .schedules import NoiseSchedule, SchedulerConfig, make_timesteps
from .unet import UNet, UNetConfig

FORMAT = "minidiff"
FORMAT_VERSION = 1


@dataclass
class RunStats:
    """What the last `generate` call did: how many full and shallow U-Net calls, and how long."""

    steps: int
    model_calls: int
    full_calls: int
    shallow_calls: int
    seconds: float
    full_steps: list = field(default_factory=list)


class Pipeline:
    def __init__(self, unet: UNet, scheduler: SchedulerConfig, *, autoencoder=None, text_encoder=None,
                 tokenizer=None, null_class: Optional[int] = None, class_names: Optional[list] = None,
                 calibration: Optional[dict] = None, meta: Optional[dict] = None):
        self.unet, self.scheduler = unet.eval(), scheduler
        self.autoencoder = autoencoder.eval() if autoencoder is not None else None
        self.text_encoder = text_encoder.eval() if text_encoder is not None else None
        self.tokenizer = tokenizer
        self.null_class, self.class_names = null_class, class_names
        self.calibration = calibration
        self.meta = dict(meta or {})
        self.last_run: Optional[RunStats] = None

    # -- properties ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_scale(self) -> int:
        """Pixels per latent pixel (1 for pixel-space models)."""
        return 1 if self.autoencoder is None else self.autoencoder.downsample_factor

    @property
    def default_size(self) -> int:
        size = self.unet.config.sample_size or 32
        return size * self.latent_scale

    def to(self, device=None, dtype=None) -> "Pipeline":
        """Move the models; the autoencoder stays float32 (half-precision decoding overflows)."""
        self.unet.to(device=device, dtype=dtype)
        if self.text_encoder is not None:
            self.text_encoder.to(device=device, dtype=dtype)
        if self.autoencoder is not None:
            self.autoencoder.to(device=device)
        return self

    # -- conditioning -------------------------------------------------------------------------

    def _class_cond(self, class_labels, batch_size, guidance_scale):
        cfg = self.unet.config
        if cfg.num_classes is None:
            if class_labels is not None:
                raise ValueError("this model is not class-conditional; drop class_labels")
            if guidance_scale is not None and guidance_scale != 1.0 and cfg.context_dim is None:
                raise ValueError("this model is unconditional, so guidance_scale has nothing to guide; leave it unset")
            return None, None
        if class_labels is None:
            raise ValueError(f"this model is class-conditional: pass class_labels (ints in [0, "
                             f"{self._num_real_classes() - 1}])")
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

    def _num_real_classes(self) -> int:
        n = self.unet.config.num_classes
        return n - 1 if self.null_class == n - 1 else n

    @torch.inference_mode()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, 77, D) text context; computed once per generate call, never per step."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this model has no text encoder/tokenizer; it cannot take a prompt")
        ids = self.tokenizer(list(prompts)).to(self.device)
        return self.text_encoder(ids).to(self.dtype)

    def _text_cond(self, prompt, negative_prompt, batch_size, guidance_scale):
        if self.unet.config.context_dim is None or self.unet.config.num_classes is not None:
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

    # -- generation ---------------------------------------------------------------------------

    def make_denoiser(self, cached, cond, uncond, guidance_scale):
        """`(x, t) -> eps` for a sampler; guidance runs both halves as one batched U-Net call,
        so a cached step caches the conditional and unconditional features together. A text
        context's cross-attention keys and values are projected here, once for all steps."""
        text = self.unet.config.context_dim is not None and self.unet.config.num_classes is None
        prepare = self.unet.prepare_context if text else (lambda c: c)
        if uncond is None:
            cond = prepare(cond)
            return lambda x, t: cached(x, t, cond)
        both = prepare(torch.cat([uncond, cond]))

        def guided(x, t):
            out_uncond, out_cond = cached(torch.cat([x, x]), t, both).chunk(2)
            return out_uncond + guidance_scale * (out_cond - out_uncond)

        return guided

    @torch.inference_mode()
    def generate(self, *, steps: int = 50, sampler: str = "ddim", eta: float = 0.0, cache_interval: int = 1,
                 cache_branch: int = 0, cache_schedule="uniform", seed: Optional[int] = None,
                 noise: Optional[torch.Tensor] = None, batch_size: int = 1, class_labels=None,
                 guidance_scale: Optional[float] = None, prompt=None, negative_prompt=None,
                 height: Optional[int] = None, width: Optional[int] = None, output: str = "image",
                 center: Optional[int] = None, power: float = 1.4, generator: Optional[torch.Generator] = None,
                 progress: bool = True, callback=None, init_image: Optional[torch.Tensor] = None,
                 strength: float = 0.75) -> torch.Tensor:
        """Sample images (in [0, 1], (B, C, H, W)) or, with output="latent", the final sample.

        img2img: `init_image` ((B or 1, 3, H, W) in [0, 1]) is encoded, noised to the step where
        `strength` of the `steps` remain, and denoised from there; `noise` is then the noise added.
        """
        _check_args(steps=steps, sampler=sampler, eta=eta, cache_interval=cache_interval,
                    batch_size=batch_size, guidance_scale=guidance_scale, output=output, seed=seed, power=power)
        if isinstance(cache_branch, bool) or not isinstance(cache_branch, int) \
                or not 0 <= cache_branch < self.unet.num_branches:
            raise ValueError(f"cache_branch must be an int in [0, {self.unet.num_branches - 1}], got {cache_branch!r}")
        if noise is not None and (not torch.is_tensor(noise) or noise.ndim != 4 or noise.shape[0] < 1):
            raise ValueError(f"noise must be a tensor of shape (B >= 1, {self.unet.config.in_channels}, H, W), got "
                             f"{tuple(noise.shape) if torch.is_tensor(noise) else type(noise).__name__}")
        if batch_size == 1:  # the batch follows the noise, labels or prompts when they are given
            if noise is not None and torch.is_tensor(noise) and noise.ndim == 4:
                batch_size = noise.shape[0]
            elif class_labels is not None and torch.as_tensor(class_labels).numel() > 1:
                batch_size = torch.as_tensor(class_labels).numel()
            elif isinstance(prompt, (list, tuple)):
                batch_size = len(prompt)
            elif init_image is not None and getattr(init_image, "ndim", 0) == 4:
                batch_size = init_image.shape[0]
        class_cond, class_uncond = self._class_cond(class_labels, batch_size, guidance_scale)
        text_cond, text_uncond = self._text_cond(prompt, negative_prompt, batch_size, guidance_scale)
        cond = class_cond if class_cond is not None else text_cond
        uncond = class_uncond if class_uncond is not None else text_uncond

        if generator is None:
            generator = torch.Generator("cpu")
            generator.manual_seed(seed if seed is not None else torch.seed())
        if init_image is not None:
            x, start_step = self._img2img_start(init_image, strength, steps, noise, batch_size, height, width,
                                                generator)
        else:
            x, start_step = self._initial_noise(noise, batch_size, height, width, generator), 0

        calls = num_model_calls(sampler, steps - start_step)
        calibrated = self.calibration if cache_schedule == "calibrated" else None
        full_steps = make_schedule(cache_schedule, calls, cache_interval, center=center, power=power,
                                   calibrated=calibrated, branch=cache_branch)
        cached = CachedUNet(self.unet, calls, full_steps, cache_branch)
        denoiser = self.make_denoiser(cached, cond, uncond, guidance_scale)
        causes = ["U-Net weights that are not finite or overflow", "noise that is not finite"]
        if uncond is not None:
            causes.insert(0, f"guidance_scale={guidance_scale} too large")
        if self.dtype in (torch.float16, torch.bfloat16):
            causes.insert(0, "half-precision overflow (try dtype=torch.float32)")

        def checked(i, t, x):  # stop at the first step that breaks, not after the whole run
            if not torch.isfinite(x).all():
                raise FloatingPointError(f"the sample became NaN/Inf at step {i + 1} (timestep {t}); likely "
                                         f"cause: {' or '.join(causes)}")
            if callback is not None:
                callback(i, t, x)

        kwargs = dict(generator=generator, progress=progress, callback=checked, start_step=start_step)
        if sampler == "ddim":
            kwargs["eta"] = eta
        elif eta:
            raise ValueError(f"eta applies to the ddim sampler only, not {sampler!r}")
        if sampler == "plms":
            kwargs.pop("generator")

        start = time.perf_counter()
        x = SAMPLERS[sampler](denoiser, x, self.scheduler, steps, **kwargs)
        result = x if output == "latent" else self.decode(x)
        self.last_run = RunStats(steps, cached.calls, cached.full_calls, cached.shallow_calls,
                                 time.perf_counter() - start, sorted(cached.full_steps))
        return result

    def _initial_noise(self, noise, batch_size, height, width, generator):
        cfg = self.unet.config
        if noise is not None:
            if not torch.is_tensor(noise):
                raise ValueError(f"noise must be a tensor of shape (B, {cfg.in_channels}, H, W), got "
                                 f"{type(noise).__name__}")
            if noise.ndim != 4 or noise.shape[1] != cfg.in_channels or noise.shape[0] < 1:
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
        multiple = self.latent_scale * self.unet.config.downsample_factor
        for name, size in (("height", height), ("width", width)):
            if not isinstance(size, int) or size < multiple or size % multiple or size > 16384:
                raise ValueError(f"{name} must be a multiple of {multiple} (the model's total downsampling) "
                                 f"between {multiple} and 16384, got {size!r}")

    def _img2img_start(self, image, strength, steps, noise, batch_size, height, width, generator):
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
        t = make_timesteps(self.scheduler, steps)[start_step]
        alpha = NoiseSchedule.from_config(self.scheduler, latents.device).alphas_cumprod[t]
        x = alpha ** 0.5 * latents + (1 - alpha) ** 0.5 * noise.to(latents.device, latents.dtype)
        return x.to(self.dtype), start_step

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Final sample -> images in [0, 1]; latent models decode in float32."""
        if self.autoencoder is not None:
            x = self.autoencoder.decode(x.float())
        return ((x.float() + 1) / 2).clamp(0, 1)

    # -- saving -------------------------------------------------------------------------------

    def config_dict(self) -> dict:
        d = {"format": FORMAT, "format_version": FORMAT_VERSION, "unet": self.unet.config.to_dict(),
             "null_class": self.null_class, "class_names": self.class_names, **self.meta}
        if self.autoencoder is not None:
            d["autoencoder"] = self.autoencoder.config.to_dict()
        if self.text_encoder is not None:
            d["text_encoder"] = self.text_encoder.config.to_dict()
        return d

    def state_dict(self) -> dict:
        sd = {f"unet.{k}": v for k, v in self.unet.state_dict().items()}
        for name in ("autoencoder", "text_encoder"):
            module = getattr(self, name)
            if module is not None:
                sd.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        return sd

    def save(self, dst, *, overwrite: bool = False):
        """Write the native folder atomically: a crash leaves the old folder (or none), never half."""
        with atomic_folder(dst, overwrite=overwrite) as tmp:
            save_json(self.config_dict(), tmp / "config.json")
            save_json(self.scheduler.to_dict(), tmp / "scheduler.json")
            save_safetensors(self.state_dict(), tmp / "model.safetensors")
            if self.tokenizer is not None:
                self.tokenizer.save(tmp / "tokenizer")
            if self.calibration is not None:
                save_json(self.calibration, tmp / "calibration.json")


def _check_args(*, steps, sampler, eta, cache_interval, batch_size, guidance_scale, output, seed, power):
    if isinstance(steps, bool) or isinstance(cache_interval, bool) or isinstance(batch_size, bool):
        raise ValueError("steps, cache_interval and batch_size must be ints, not True/False")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 64):
        raise ValueError(f"seed must be None or an int in [0, 2**64 - 1], got {seed!r}")
    if not isinstance(steps, int) or not 1 <= steps <= 10_000:
        raise ValueError(f"steps must be an int in [1, 10000], got {steps!r}")
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    if not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    if not isinstance(cache_interval, int) or not 1 <= cache_interval <= 10_000:
        raise ValueError(f"cache_interval must be an int in [1, 10000], got {cache_interval!r}")
    if not isinstance(batch_size, int) or not 1 <= batch_size <= 4096:
        raise ValueError(f"batch_size must be an int in [1, 4096], got {batch_size!r}")
    if guidance_scale is not None and (not isinstance(guidance_scale, (int, float)) or
                                       not math.isfinite(guidance_scale) or not 0.0 <= guidance_scale <= 100.0):
        raise ValueError(f"guidance_scale must be a number in [0, 100], got {guidance_scale!r}")
    if output not in ("image", "latent"):
        raise ValueError(f"output must be 'image' or 'latent', got {output!r}")
    if not isinstance(power, (int, float)) or not 1.0 < power <= 10.0:  # the non-uniform search steps power by 0.02
        raise ValueError(f"power (of the non-uniform cache schedule) must be a number in (1, 10], got {power!r}")


def _read_json(path: Path, what: str) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path.parent} is not a minidiff model folder: {path.name} ({what}) is missing. "
                              "Convert public checkpoints with the scripts in convert/ first")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({what}): {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} ({what}) must hold a JSON object, got a {type(data).__name__}")
    return data


def split_state_dict(sd: dict) -> dict:
    """{"unet": {...}, "autoencoder": {...}, ...} from component-prefixed keys."""
    parts: dict = {}
    for key, value in sd.items():
        component, _, rest = key.partition(".")
        parts.setdefault(component, {})[rest] = value
    return parts


def load(path, *, device="cpu", dtype: Optional[torch.dtype] = None, allow_nan: bool = False) -> Pipeline:
    """Load a native minidiff model folder (see convert/ for public checkpoints)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; minidiff.load takes a model folder (config.json, scheduler.json, "
                              "model.safetensors). Convert single-file checkpoints with convert/ first")
    config = _read_json(path / "config.json", "model config")
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path / 'config.json'} is not a minidiff config (format={config.get('format')!r}); "
                              "convert the model with the scripts in convert/ first")
    if not isinstance(config.get("unet"), dict):
        raise CheckpointError(f"{path / 'config.json'} has no \"unet\" section; the folder is damaged or not a "
                              "minidiff model")
    scheduler = SchedulerConfig.from_dict(_read_json(path / "scheduler.json", "noise schedule"))
    weights = path / "model.safetensors"
    if not weights.exists():
        raise CheckpointError(f"{weights} is missing")
    parts = split_state_dict(read_state_dict(weights, allow_nan=True))
    unknown = sorted(set(parts) - {"unet", "autoencoder", "text_encoder"})
    if unknown:
        raise CheckpointError(f"{weights} has weights for unknown component(s) {unknown}")

    unet = UNet(UNetConfig.from_dict(config["unet"]))
    load_weights(unet, parts.get("unet", {}), "U-Net")
    autoencoder = text_encoder = tokenizer = None
    if config.get("autoencoder") is not None:
        from .autoencoder import Autoencoder, AutoencoderConfig

        autoencoder = Autoencoder(AutoencoderConfig.from_dict(config["autoencoder"]))
        load_weights(autoencoder, parts.get("autoencoder", {}), "autoencoder")
    if config.get("text_encoder") is not None:
        from .text import CLIPTextConfig, CLIPTextEncoder, CLIPTokenizer

        text_encoder = CLIPTextEncoder(CLIPTextConfig.from_dict(config["text_encoder"]))
        load_weights(text_encoder, parts.get("text_encoder", {}), "text encoder")
        tokenizer = CLIPTokenizer.from_folder(path / "tokenizer")
    for name, module in (("U-Net", unet), ("autoencoder", autoencoder), ("text encoder", text_encoder)):
        if module is not None and not allow_nan:
            check_finite(module.state_dict(), f"{weights} ({name})")
    meta = {k: v for k, v in config.items() if k not in ("format", "format_version", "unet", "autoencoder",
                                                          "text_encoder", "null_class", "class_names")}
    pipe = Pipeline(unet, scheduler, autoencoder=autoencoder, text_encoder=text_encoder, tokenizer=tokenizer,
                    null_class=config.get("null_class"), class_names=config.get("class_names"),
                    calibration=load_calibrated(path / "calibration.json"), meta=meta)
    return pipe.to(device=device, dtype=dtype)
