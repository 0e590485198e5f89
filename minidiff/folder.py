"""The native model folder: what `minidiff.load` reads and `Pipeline.save` writes.

    config.json        what the model is: {"format": "minidiff", "unet": {...}, "autoencoder": ...}
                       (a DiT's section is "dit"; exactly one denoising network)
    scheduler.json     the noise schedule and sampler conventions (SchedulerConfig)
    model.safetensors  all weights, keys prefixed by component: unet.* (or dit.*), autoencoder.*, text_encoder.*
    tokenizer/         vocab.json + merges.txt (text-conditioned models)
    calibration.json   optional: measured feature change for cache_schedule="calibrated"
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import torch

from .cache import load_calibrated
from .checkpoint import CheckpointError, build_loaded, read_state_dict
from .writing import atomic_folder, check_apart, save_json, save_safetensors
from .dit import DiT, DiTConfig
from .schedules import SchedulerConfig
from .unet import UNet, UNetConfig

DENOISERS = ("unet", "dit")  # config.json section (and weight prefix) of the denoising network

FORMAT = "minidiff"
FORMAT_VERSION = 1


def denoiser_kind(net) -> str:
    """"unet" or "dit": the config section and weight prefix of a denoising network."""
    return "dit" if isinstance(net, DiT) else "unet"


# -- writing ----------------------------------------------------------------------------------------

def config_dict(pipe) -> dict:
    """config.json of a Pipeline."""
    d = {"format": FORMAT, "format_version": FORMAT_VERSION,
         denoiser_kind(pipe.denoiser): pipe.denoiser.config.to_dict(),
         "null_class": pipe.null_class, "class_names": pipe.class_names, **pipe.meta}
    if pipe.autoencoder is not None:
        d["autoencoder"] = pipe.autoencoder.config.to_dict()
    if pipe.text_encoder is not None:
        d["text_encoder"] = pipe.text_encoder.config.to_dict()
    return d


def state_dict(pipe) -> dict:
    """Every weight of a Pipeline, prefixed by component."""
    sd = {f"{denoiser_kind(pipe.denoiser)}.{k}": v for k, v in pipe.denoiser.state_dict().items()}
    for name in ("autoencoder", "text_encoder"):
        module = getattr(pipe, name)
        if module is not None:
            sd.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    return sd


def save(pipe, dst, *, overwrite: bool = False, dtype: Optional[torch.dtype] = None):
    """Write a Pipeline's native folder atomically: a crash leaves the old folder (or none), never half.

    `dtype=torch.float16` (or bfloat16) stores every float weight in that precision, a file half
    the size, as the public `*-fp16` checkpoints; `load` reads it back in float32 or in that dtype.
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype such as torch.float16, got {dtype!r}")
    state = state_dict(pipe)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if getattr(pipe, "source", None) is not None:
        check_apart(pipe.source, dst)  # the weights are read from there; the folder is the user's model
    with atomic_folder(dst, overwrite=overwrite) as tmp:
        save_json(config_dict(pipe), tmp / "config.json")
        save_json(pipe.scheduler.to_dict(), tmp / "scheduler.json")
        save_safetensors(state, tmp / "model.safetensors")
        if pipe.tokenizer is not None:
            pipe.tokenizer.save(tmp / "tokenizer")
        if pipe.calibration is not None:
            save_json(pipe.calibration, tmp / "calibration.json")


# -- reading ----------------------------------------------------------------------------------------

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


def read(path, *, device="cpu", dtype: Optional[torch.dtype] = None, allow_nan: bool = False,
         check: str = "first-use") -> tuple:
    """(denoiser, scheduler, the Pipeline's other parts as keywords, why a damaged calibration.json was
    skipped or None): the folder read and checked, as `minidiff.pipeline.load` documents."""
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
    kinds = [k for k in DENOISERS if k in config]
    if len(kinds) != 1 or not isinstance(config[kinds[0]], dict):
        raise CheckpointError(f"{path / 'config.json'} needs exactly one \"unet\" or \"dit\" section (the denoising "
                              f"network), found {kinds or 'none'}; the folder is damaged or not a minidiff model")
    kind = kinds[0]
    scheduler = SchedulerConfig.from_dict(_read_json(path / "scheduler.json", "noise schedule"))
    weights = path / "model.safetensors"
    if not weights.exists():
        raise CheckpointError(f"{weights} is missing")
    parts = split_state_dict(read_state_dict(weights, allow_nan=True))
    unknown = sorted(set(parts) - {kind, "autoencoder", "text_encoder"})
    if unknown:
        raise CheckpointError(f"{weights} has weights for unknown component(s) {unknown}")

    # Built on the meta device, the mapped file's tensors become the parameters: one read, no copy
    # unless a dtype or device change needs one. The autoencoder stays float32 (see Pipeline.to).
    net_dtype = torch.float32 if dtype is None else dtype
    common = dict(device=device, allow_nan=allow_nan, source=str(weights), check_on_first_use=check == "first-use")
    network, config_class, model_class = ("DiT", DiTConfig, DiT) if kind == "dit" else ("U-Net", UNetConfig, UNet)
    net_config = config_class.from_dict(config[kind])
    net = build_loaded(lambda: model_class(net_config), parts.get(kind, {}), network, dtype=net_dtype, **common)
    autoencoder = text_encoder = tokenizer = None
    if config.get("autoencoder") is not None:
        from .autoencoder import Autoencoder, AutoencoderConfig

        vae_config = AutoencoderConfig.from_dict(config["autoencoder"])
        autoencoder = build_loaded(lambda: Autoencoder(vae_config), parts.get("autoencoder", {}), "autoencoder",
                                   dtype=torch.float32, **common)
    if config.get("text_encoder") is not None:
        from .text import CLIPTextConfig, CLIPTextEncoder, CLIPTokenizer

        text_config = CLIPTextConfig.from_dict(config["text_encoder"])
        text_encoder = build_loaded(lambda: CLIPTextEncoder(text_config), parts.get("text_encoder", {}),
                                    "text encoder", dtype=net_dtype, **common)
        tokenizer = CLIPTokenizer.from_folder(path / "tokenizer")
    meta = {k: v for k, v in config.items() if k not in ("format", "format_version", *DENOISERS, "autoencoder",
                                                          "text_encoder", "null_class", "class_names")}
    try:
        calibration, calibration_error = load_calibrated(path / "calibration.json"), None
    except ValueError as e:  # optional: only cache_schedule="calibrated" needs it
        calibration, calibration_error = None, str(e)
        warnings.warn(f"{calibration_error}. The model loads without it; cache_schedule='calibrated' is unavailable",
                      stacklevel=3)  # past minidiff.load
    others = dict(autoencoder=autoencoder, text_encoder=text_encoder, tokenizer=tokenizer,
                  null_class=config.get("null_class"), class_names=config.get("class_names"), calibration=calibration,
                  meta=meta)
    return net, scheduler, others, calibration_error
