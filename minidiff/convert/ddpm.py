"""Convert a DDPM checkpoint (CIFAR-10, LSUN church / bedroom / cat) to a minidiff model folder.

    python convert/ddpm.py SRC DST [--overwrite] [--variance fixed_small|fixed_large]
                           [--dtype float16|bfloat16]

SRC may be
- a diffusers folder: `unet/` + `scheduler/` sub-folders, or the flat layout of the google/ddpm-*
  repos (config.json, diffusion_pytorch_model.{safetensors,bin}, scheduler_config.json side by side);
- an original DDPM file converted from TensorFlow (pesser's pytorch_diffusion, the files DeepCache
  uses: `ema_diffusion_cifar10_model/model-790000.ckpt`, ...), keys like `down.0.block.0.norm1`.
  Its architecture is read off the keys; the noise schedule is Ho et al.'s (linear 1e-4..0.02, 1000
  steps) with the variance CIFAR-10 (fixed_large) or LSUN (fixed_small) was sampled with.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ..checkpoint import CheckpointError, load_weights, read_state_dict
from ..writing import check_conversion_paths
from ..pipeline import Pipeline
from ..schedules import SchedulerConfig
from ..unet import UNet
from .storage import add_dtype_argument, storage_dtype
from ..formats.unet_keys import config_from_diffusers, config_from_pesser, diffusers_to_native, pesser_to_native

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors")


def _find_weights(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (folder / name).exists():
            return folder / name
    raise CheckpointError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_NAMES)}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def from_diffusers_folder(src: Path) -> Pipeline:
    """Nested (unet/, scheduler/) or flat google/ddpm-* layout."""
    unet_dir = src / "unet" if (src / "unet" / "config.json").exists() else src
    if not (unet_dir / "config.json").exists():
        raise CheckpointError(f"{src} is not a diffusers DDPM folder: no unet/config.json or config.json")
    unet_cfg = _read_json(unet_dir / "config.json")
    if unet_cfg.get("_class_name") not in (None, "UNet2DModel"):
        raise CheckpointError(f"{unet_dir / 'config.json'} describes a {unet_cfg.get('_class_name')}, not a DDPM "
                              "UNet2DModel; use convert/sd15.py or convert/ldm.py for latent models")
    sched_path = next((p for p in (src / "scheduler" / "scheduler_config.json", src / "scheduler_config.json")
                       if p.exists()), None)
    if sched_path is None:
        raise CheckpointError(f"{src} has no scheduler/scheduler_config.json or scheduler_config.json")
    sched = _read_json(sched_path)
    if sched.get("_class_name") not in (None, "DDPMScheduler", "DDIMScheduler", "PNDMScheduler"):
        raise CheckpointError(f"unsupported scheduler {sched.get('_class_name')!r} in {sched_path}")
    config = config_from_diffusers(unet_cfg)
    state = diffusers_to_native(read_state_dict(_find_weights(unet_dir)), config)
    unet = load_weights(UNet(config), state, f"U-Net of {unet_dir}")
    return Pipeline(unet, SchedulerConfig.from_dict(sched), meta={"source": str(src), "family": "ddpm"})


def _pesser_config(sd: dict):
    levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"down\.(\d+)\.", k)))
    blocks = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"down\.0\.block\.(\d+)\.", k)))
    ch = sd["conv_in.weight"].shape[0]
    mult = [sd[f"down.{i}.block.{blocks - 1}.conv2.weight"].shape[0] // ch for i in range(levels)]
    attn_levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"down\.(\d+)\.attn\.", k))})
    # DDPM's two public architectures: 4 levels at 32 px (CIFAR-10), 6 levels at 256 px (LSUN)
    resolution = {4: 32, 6: 256}.get(levels)
    if resolution is None:
        raise CheckpointError(f"a DDPM checkpoint with {levels} levels is neither CIFAR-10 (4) nor LSUN (6)")
    return config_from_pesser(ch, mult, blocks, [resolution // 2 ** i for i in attn_levels], resolution,
                              in_channels=sd["conv_in.weight"].shape[1], out_ch=sd["conv_out.weight"].shape[0],
                              dropout=0.1 if levels == 4 else 0.0)


def from_pesser_file(src: Path, variance: str | None = None) -> Pipeline:
    sd = read_state_dict(src)
    if "temb.dense.0.weight" not in sd or "conv_in.weight" not in sd:
        family = "Stable Diffusion / LDM" if any(k.startswith("model.diffusion_model.") for k in sd) else "unknown"
        raise CheckpointError(f"{src} is not an original DDPM checkpoint (no temb.dense.0 / conv_in keys; looks "
                              f"like: {family}). Use convert/ldm.py or convert/sd15.py for latent models")
    config = _pesser_config(sd)
    unet = load_weights(UNet(config), pesser_to_native(sd, config), f"DDPM U-Net of {src}")
    variance = variance or ("fixed_large" if config.sample_size == 32 else "fixed_small")
    sched = SchedulerConfig(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                            variance_type=variance, clip_sample=True)
    return Pipeline(unet, sched, meta={"source": str(src), "family": "ddpm"})


def convert(src, dst, *, overwrite: bool = False, variance: str | None = None, dtype=None) -> Pipeline:
    """Read SRC (folder or original file), write the native folder DST atomically (in `dtype`:
    "float16" / "bfloat16" halve the file)."""
    dtype = storage_dtype(dtype)
    src, dst = check_conversion_paths(src, dst, overwrite)
    pipe = from_diffusers_folder(src) if src.is_dir() else from_pesser_file(src, variance)
    if variance and src.is_dir():
        pipe.scheduler.variance_type = variance
    pipe.save(dst, overwrite=overwrite, dtype=dtype)
    return pipe


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="diffusers folder or original DDPM .ckpt/.pt/.bin/.safetensors file")
    parser.add_argument("dst", help="minidiff model folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--variance", choices=["fixed_small", "fixed_large"], help="override the DDPM variance")
    add_dtype_argument(parser)
    args = parser.parse_args(argv)
    try:
        pipe = convert(args.src, args.dst, overwrite=args.overwrite, variance=args.variance,
                       dtype=args.dtype)
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = sum(p.numel() for p in pipe.denoiser.parameters())
    print(f"wrote {args.dst}: DDPM U-Net, {n:,} parameters, {pipe.denoiser.num_branches} cache branches, "
          f"variance {pipe.scheduler.variance_type}; {args.dtype} weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
