"""Convert a CompVis latent-diffusion checkpoint (LDM-4-G ImageNet `cin256-v2` and class-conditional
models of its family) to a minidiff model folder.

    python convert/ldm.py SRC DST [--config MODEL.yaml] [--overwrite] [--no-ema] [--dtype float16|bfloat16]

SRC is the single file the CompVis code writes: `model.ckpt`, a PyTorch Lightning pickle read
without executing anything in it (weights under "state_dict"), or a flat `.safetensors` export.
It holds four things under fixed prefixes, which land in one native folder:

    model.diffusion_model.*          the openaimodel U-Net            -> unet.*
    model_ema.<dotless key>          LitEma copy of it (preferred)    -> unet.*
    cond_stage_model.embedding.*     ClassEmbedder, n_classes x D     -> unet.class_embed.*
    first_stage_model.*              the VQ (or KL) first stage       -> autoencoder.*

The schedule buffers (betas, alphas_cumprod, ...), `logvar` and Lightning's outer entries are
ignored: the schedule is recomputed from the config, as LDM does.

The architecture comes from the model's yaml (`--config`); without it the values of cin256-v2.yaml
are used (built in below). The yaml is read by `compvis.read_yaml`: PyYAML's safe_load when
installed (`pip install 'minidiff[convert]'`), any valid YAML; otherwise a small reader of the block
style the CompVis configs use, which names the line of anything else.

Sampling follows LDM's DDIM: its "linear" schedule (linear in sqrt(beta), diffusers'
`scaled_linear`), timesteps `range(0, T, T // S) + 1` (`steps_offset=1`, leading spacing) and the
last step landing on alphas_cumprod[0] (`set_alpha_to_one=False`), no clipping. The class
embedding's last row (1000 for ImageNet) is the unconditional class used for guidance.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..autoencoder import Autoencoder, AutoencoderConfig
from ..checkpoint import CheckpointError, check_state_dict, load_weights, read_state_dict
from ..writing import check_conversion_paths
from .compvis import EMA_PREFIX, ema_key, read_yaml
from ..pipeline import Pipeline
from ..schedules import SchedulerConfig
from ..unet import UNet, UNetConfig
from .storage import add_dtype_argument, storage_dtype
from ..formats.unet_keys import config_from_openaimodel, openaimodel_to_native
from ..formats.vae_keys import autoencoder_config_from_ldm, ldm_to_native

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
CLASS_EMBEDDING = "cond_stage_model.embedding.weight"

# Checkpoint keys that say "this is another family", checked in order, with what to do instead.
OTHER_FAMILIES = [
    ("cond_stage_model.transformer.text_model.",
     "this is a text-conditioned Stable Diffusion checkpoint; use convert/sd15.py"),
    ("cond_stage_model.transformer.",
     "this is a text-conditioned LDM (BERT text encoder); only class-conditional LDMs are supported"),
    ("cond_stage_model.model.",
     "this is a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder), which minidiff does not support"),
    ("temb.dense.0.", "this is an original DDPM checkpoint (pesser's pytorch_diffusion); use convert/ddpm.py"),
    ("time_embedding.linear_1.", "this holds diffusers U-Net weights; convert the whole diffusers folder with "
                                 "convert/ddpm.py (DDPM) or convert/sd15.py (Stable Diffusion)"),
    ("encoder.conv_in.", "this is a first-stage autoencoder alone, not a latent diffusion model"),
]

# cin256-v2.yaml (CompVis/latent-diffusion configs/latent-diffusion/), the values that describe the model.
CIN256_V2 = {
    "model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 64, "channels": 3,
            "conditioning_key": "crossattn",
            "unet_config": {
                "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                "params": {"image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 192,
                           "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 5],
                           "num_heads": 1, "use_spatial_transformer": True, "transformer_depth": 1,
                           "context_dim": 512},
            },
            "first_stage_config": {
                "target": "ldm.models.autoencoder.VQModelInterface",
                "params": {"embed_dim": 3, "n_embed": 8192,
                           "ddconfig": {"double_z": False, "z_channels": 3, "resolution": 256, "in_channels": 3,
                                        "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4], "num_res_blocks": 2,
                                        "attn_resolutions": [], "dropout": 0.0}},
            },
            "cond_stage_config": {
                "target": "ldm.modules.encoders.modules.ClassEmbedder",
                "params": {"n_classes": 1001, "embed_dim": 512, "key": "class_label"},
            },
        },
    },
}


# -- the model described by a config ----------------------------------------------------------------

@dataclass
class LDMConfig:
    """What a CompVis class-conditional LDM yaml says, in minidiff's terms."""

    unet: UNetConfig
    autoencoder: AutoencoderConfig
    scheduler: SchedulerConfig
    null_class: int


def _params(parent: dict, name: str) -> dict:
    """`parent[name]["params"]`, with an error naming the section when the config lacks it."""
    section = parent.get(name)
    if not isinstance(section, dict) or not isinstance(section.get("params", {}), dict):
        raise ValueError(f"config: {name} must be a mapping with `target` and `params`, got {section!r}")
    return section.get("params") or {}


def ldm_config(yaml: dict) -> LDMConfig:
    """The U-Net, first stage, noise schedule and null class of a CompVis LatentDiffusion config."""
    model = yaml.get("model", yaml)
    target = str(model.get("target", ""))
    if not target.endswith("LatentDiffusion"):
        raise ValueError(f"config: model.target is {target!r}; expected ldm.models.diffusion.ddpm.LatentDiffusion "
                         "(DDPM configs go to convert/ddpm.py)")
    p = _params({"model": model}, "model")
    cond = p.get("cond_stage_config")
    cond_target = str(cond.get("target", cond)) if isinstance(cond, dict) else str(cond)
    if "CLIP" in cond_target:
        raise ValueError(f"config: cond_stage_config is {cond_target}; this is a text-conditioned Stable Diffusion "
                         "config; use convert/sd15.py")
    if not cond_target.endswith("ClassEmbedder"):
        raise ValueError(f"config: cond_stage_config is {cond_target!r}; convert/ldm.py converts class-conditional "
                         "LDMs (ldm.modules.encoders.modules.ClassEmbedder) only")
    if p.get("conditioning_key") != "crossattn":
        raise ValueError(f"config: conditioning_key is {p.get('conditioning_key')!r}; the class token must reach "
                         "the U-Net through cross-attention ('crossattn')")
    for key, want in (("beta_schedule", "linear"), ("parameterization", "eps")):
        if p.get(key, want) != want:
            raise ValueError(f"config: {key} {p[key]!r} is not supported (minidiff converts {key}: {want})")
    cond_params = _params(p, "cond_stage_config")
    n_classes, width = cond_params.get("n_classes", 1000), cond_params["embed_dim"]
    unet = config_from_openaimodel(_params(p, "unet_config"), num_classes=n_classes)
    if unet.context_dim != width:
        raise ValueError(f"config: the class embedding is {width} wide but the U-Net's context_dim is "
                         f"{unet.context_dim}")
    first = _params(p, "first_stage_config")
    autoencoder = autoencoder_config_from_ldm(first["ddconfig"], first["embed_dim"],
                                                         first.get("n_embed"), p.get("scale_factor", 1.0))
    if unet.in_channels != autoencoder.embed_dim:
        raise ValueError(f"config: the U-Net takes {unet.in_channels} channels but the first stage makes "
                         f"{autoencoder.embed_dim}-channel latents")
    scheduler = SchedulerConfig(num_train_timesteps=p.get("timesteps", 1000), beta_start=p.get("linear_start", 1e-4),
                                beta_end=p.get("linear_end", 2e-2), beta_schedule="scaled_linear",
                                steps_offset=1, set_alpha_to_one=False, timestep_spacing="leading", clip_sample=False)
    return LDMConfig(unet, autoencoder, scheduler, null_class=n_classes - 1)


# -- checkpoint keys -> native parts ----------------------------------------------------------------

def check_family(state_dict: dict, src="the checkpoint"):
    """Raise a CheckpointError naming the right converter when this is not a class-conditional LDM file."""
    for prefix, message in OTHER_FAMILIES:
        if any(k.startswith(prefix) for k in state_dict):
            raise CheckpointError(f"{src}: {message}")
    if not any(k.startswith(UNET_PREFIX) for k in state_dict):
        sample = ", ".join(sorted(state_dict)[:5]) or "no tensors at all"
        raise CheckpointError(f"{src} is not a CompVis latent diffusion checkpoint: it has no {UNET_PREFIX}* keys "
                              f"(found e.g. {sample})")


def map_checkpoint(state_dict: dict, unet_config: UNetConfig, *, use_ema: bool = True,
                   source: str = "the checkpoint") -> dict:
    """Split a CompVis LDM state dict into native parts; pure key work, so meta tensors do too.

    Returns {"unet": ..., "autoencoder": ..., "ema": used EMA weights?, "ignored": keys left out}.
    Wrong or missing model keys are left for `check_state_dict` / `load_weights` to report.
    """
    check_family(state_dict, source)
    unet_keys = [k for k in state_dict if k.startswith(UNET_PREFIX)]
    has_ema = any(k.startswith(EMA_PREFIX + "diffusion_model") for k in state_dict)
    ema = use_ema and has_ema
    if ema:
        missing = [ema_key(k) for k in unet_keys if ema_key(k) not in state_dict]
        if missing:
            raise CheckpointError(f"the checkpoint's EMA weights are incomplete: {len(missing)} U-Net key(s) have no "
                                  f"EMA copy, e.g. {', '.join(missing[:5])}; pass --no-ema to use the model weights")
    source_of = {k: ema_key(k) if ema else k for k in unet_keys}  # U-Net key -> the key its weights come from
    unet = openaimodel_to_native({k[len(UNET_PREFIX):]: state_dict[source_of[k]] for k in unet_keys}, unet_config)
    if CLASS_EMBEDDING in state_dict:
        if "class_embed.weight" in unet:
            raise CheckpointError("the checkpoint has both an openaimodel label_emb and a ClassEmbedder; "
                                  "class-conditional LDMs have only the ClassEmbedder")
        unet["class_embed.weight"] = state_dict[CLASS_EMBEDDING]
    strays = sorted(k for k in state_dict if k.startswith("cond_stage_model.") and k != CLASS_EMBEDDING)
    if strays:
        raise CheckpointError(f"unexpected conditioning weights {strays[:5]}: a ClassEmbedder has only "
                              f"{CLASS_EMBEDDING}")
    autoencoder, not_first_stage = ldm_to_native(state_dict, FIRST_STAGE_PREFIX)
    converted = set(source_of.values()) | {CLASS_EMBEDDING}
    ignored = sorted(k for k in not_first_stage if k not in converted)
    return {"unet": unet, "autoencoder": autoencoder, "ema": ema, "ignored": ignored}


# -- reading and writing ----------------------------------------------------------------------------

def load_config(path=None) -> LDMConfig:
    """The LDM config of a yaml file, or cin256-v2's built-in values when `path` is None."""
    if path is None:
        return ldm_config(CIN256_V2)
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read the config {path}: {e}") from None
    try:
        return ldm_config(read_yaml(text, str(path)))
    except KeyError as e:
        raise ValueError(f"{path}: the config lacks {e}, which a LatentDiffusion config has") from None


def from_checkpoint(src, config: LDMConfig, *, use_ema: bool = True) -> Pipeline:
    """A Pipeline holding the U-Net (with class embedding) and first stage of a CompVis checkpoint."""
    src = Path(src)
    state_dict = read_state_dict(src)
    parts = map_checkpoint(state_dict, config.unet, use_ema=use_ema, source=str(src))
    ae_config = config.autoencoder
    if "scale_factor" in state_dict:  # written by scale_by_std training; it overrides the yaml
        scale_factor = float(state_dict["scale_factor"])
        ae_config = AutoencoderConfig.from_dict({**ae_config.to_dict(), "scale_factor": scale_factor})
    with torch.device("meta"):  # keys and shapes first: a mismatch is refused before cin256's 400M weights exist
        check_state_dict(UNet(config.unet), parts["unet"], f"U-Net of {src}")
    unet = load_weights(UNet(config.unet), parts["unet"], f"U-Net of {src}")
    autoencoder = load_weights(Autoencoder(ae_config), parts["autoencoder"], f"first stage of {src}")
    meta = {"source": str(src), "family": "ldm", "weights": "ema" if parts["ema"] else "model"}
    return Pipeline(unet, config.scheduler, autoencoder=autoencoder, null_class=config.null_class, meta=meta)


def convert(src, dst, *, config=None, overwrite: bool = False, use_ema: bool = True, dtype=None) -> Pipeline:
    """Read SRC (CompVis .ckpt / .safetensors) and write the native folder DST atomically (in
    `dtype`: "float16" / "bfloat16" halve the file)."""
    dtype = storage_dtype(dtype)
    src, dst = check_conversion_paths(src, dst, overwrite)
    try:
        pipe = from_checkpoint(src, load_config(config), use_ema=use_ema)
    except CheckpointError as e:
        if config is not None or "do not fit" not in str(e):
            raise
        raise CheckpointError(f"{src} does not fit cin256-v2, the architecture assumed without --config (its "
                              "weights have other keys or shapes); pass the model's yaml with --config model.yaml"
                              ) from None
    pipe.save(dst, overwrite=overwrite, dtype=dtype)
    return pipe


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="CompVis checkpoint: model.ckpt (Lightning) or .safetensors")
    parser.add_argument("dst", help="minidiff model folder to write")
    parser.add_argument("--config", help="the model's CompVis yaml (default: cin256-v2's values)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--no-ema", action="store_true", help="use model.diffusion_model.* even when EMA weights exist")
    add_dtype_argument(parser)
    args = parser.parse_args(argv)
    try:
        pipe = convert(args.src, args.dst, config=args.config, overwrite=args.overwrite, use_ema=not args.no_ema,
                       dtype=args.dtype)
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    unet = sum(p.numel() for p in pipe.denoiser.parameters())
    ae = sum(p.numel() for p in pipe.autoencoder.parameters())
    print(f"wrote {args.dst}: U-Net {unet:,} parameters incl. class embedding ({pipe.meta['weights']} weights), "
          f"{pipe.autoencoder.config.kind.upper()} first stage {ae:,}, {pipe.denoiser.num_branches} cache branches, "
          f"null class {pipe.null_class}; {args.dtype} weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
