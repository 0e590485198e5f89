"""A minidiff model folder written back out in the layouts other tools read.

    python -m minidiff export --format diffusers MODEL DST [--overwrite]
    python -m minidiff export --format original MODEL DST.safetensors [--overwrite]

`diffusers` writes what `DiffusionPipeline.from_pretrained` loads: for a Stable Diffusion 1.x-style
model (U-Net + KL VAE + CLIP text encoder) `model_index.json`, `unet/`, `vae/`, `text_encoder/`,
`tokenizer/` and `scheduler/`; for a pixel-space U-Net a `UNet2DModel` and a DDPM scheduler (a
class-conditional one as `num_class_embeds`: diffusers adds the class embedding to the time
embedding, as minidiff's `class_cond="add"` does). `original` writes SD's single `.safetensors`
file with the CompVis key names (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.transformer.text_model.*`). Key names come from the converters' tables run
backwards (formats/export_keys), so converting in and exporting out gives back every tensor the
converter read, exactly. A model a format cannot express is refused, naming what is missing,
before anything is written; DST is written atomically and replaced only with --overwrite.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .writing import atomic_folder, check_apart, save_json, save_safetensors
from .formats.export_keys import unet_to, vae_to_diffusers
from .unet import UNetConfig

FORMATS = ("diffusers", "original")
EXPORT_KIND = "diffusers export"  # what atomic_folder's --overwrite may replace (see writing.folder_kind)
SAFETENSORS_METADATA = {"format": "pt"}  # transformers and diffusers check this entry
# The prefixes of SD's single file (the same as convert/sd15.py reads).
UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = ("model.diffusion_model.", "first_stage_model.",
                                        "cond_stage_model.transformer.text_model.")


# -- configs ----------------------------------------------------------------------------------------

def _attention_head_dim(cfg: UNetConfig, conditional: bool):
    """diffusers' `attention_head_dim`: UNet2DConditionModel reads it as heads per level (one value
    when all agree), UNet2DModel as one head width for every block (None: one head per block)."""
    levels = range(len(cfg.channel_mult))
    if conditional:
        heads = [cfg.heads_for(ch, level) for level, ch in zip(levels, cfg.level_channels)]
        return heads[0] if len(set(heads)) == 1 else heads
    layers = [(ch, cfg.heads_for(ch, level)) for level, ch in zip(levels, cfg.level_channels)
              if level in cfg.attention_levels]
    if cfg.mid_attention:
        layers.append((cfg.level_channels[-1], cfg.heads_for(cfg.level_channels[-1])))
    if all(heads == 1 for _, heads in layers):
        return None
    widths = {ch // heads for ch, heads in layers}
    if len(widths) != 1:
        raise CheckpointError(f"the U-Net's attention heads are {sorted(widths)} channels wide at different levels; "
                              "diffusers' UNet2DModel takes one head width for every block (attention_head_dim)")
    return widths.pop()


def unet_config(cfg: UNetConfig, conditional: bool) -> dict:
    """The diffusers config.json of a UNet2DConditionModel (`conditional`) or UNet2DModel equal to `cfg`."""
    if cfg.num_classes is not None and cfg.class_cond != "add":
        raise CheckpointError("the U-Net takes its class through cross-attention (LDM's ClassEmbedder, "
                              "class_cond='context'); diffusers' U-Nets only add a class embedding to the time "
                              "embedding (num_class_embeds), so the model cannot be expressed")
    if conditional != (cfg.attention_type == "transformer"):
        raise CheckpointError(f"the U-Net has {cfg.attention_type!r} attention but the model is "
                              f"{'' if conditional else 'not '}text-conditioned; diffusers has no U-Net for that")
    levels = len(cfg.channel_mult)
    attn, plain = ("CrossAttn", "") if conditional else ("Attn", "")
    down = [f"{attn if level in cfg.attention_levels else plain}DownBlock2D" for level in range(levels)]
    up = [f"{attn if level in cfg.attention_levels else plain}UpBlock2D" for level in reversed(range(levels))]
    config = {
        "_class_name": "UNet2DConditionModel" if conditional else "UNet2DModel",
        "sample_size": cfg.sample_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "block_out_channels": cfg.level_channels, "layers_per_block": cfg.num_res_blocks,
        "down_block_types": down, "up_block_types": up, "attention_head_dim": _attention_head_dim(cfg, conditional),
        "norm_num_groups": cfg.norm_groups, "norm_eps": cfg.norm_eps, "downsample_padding": cfg.downsample_padding,
        "flip_sin_to_cos": cfg.flip_sin_to_cos, "freq_shift": cfg.freq_shift, "dropout": cfg.dropout,
        "act_fn": "silu", "time_embedding_type": "positional", "resnet_time_scale_shift": "default",
        "class_embed_type": None, "num_class_embeds": cfg.num_classes,
    }
    if conditional:
        if not cfg.mid_attention:
            raise CheckpointError("the U-Net has no attention in its middle block; diffusers' UNet2DConditionModel "
                                  "always has one (UNetMidBlock2DCrossAttn)")
        config.update(cross_attention_dim=cfg.context_dim, transformer_layers_per_block=cfg.transformer_depth,
                      use_linear_projection=cfg.use_linear_projection, center_input_sample=False)
    else:
        config.update(add_attention=cfg.mid_attention, center_input_sample=False)
    return config


def vae_config(cfg) -> dict:
    """The diffusers AutoencoderKL config.json of a KL autoencoder without per-level attention."""
    missing = [why for bad, why in (
        (cfg.kind != "kl", f"it is a {cfg.kind.upper()} autoencoder (diffusers' Stable Diffusion folders hold an "
                           "AutoencoderKL)"),
        (bool(cfg.attn_resolutions), f"it has attention at resolutions {list(cfg.attn_resolutions)} "
                                     "(AutoencoderKL has attention in its middle block only)"),
        (cfg.embed_dim != cfg.z_channels or not cfg.double_z,
         "its latent width differs from z_channels (AutoencoderKL has one latent_channels)")) if bad]
    if missing:
        raise CheckpointError(f"the autoencoder cannot be written as a diffusers AutoencoderKL: {'; '.join(missing)}")
    levels = len(cfg.channel_mult)
    return {"_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": [cfg.base_channels * m for m in cfg.channel_mult],
            "layers_per_block": cfg.num_res_blocks, "act_fn": "silu", "latent_channels": cfg.z_channels,
            "norm_num_groups": cfg.norm_groups, "sample_size": cfg.resolution, "scaling_factor": cfg.scale_factor}


def scheduler_config(pipe, class_name: str) -> dict:
    """The noise schedule as a diffusers scheduler_config.json; an unset timestep_spacing stays unset,
    so each scheduler diffusers switches to takes its own default, as minidiff's samplers do."""
    config = {k: v for k, v in pipe.scheduler.to_dict().items() if not (k == "timestep_spacing" and v is None)}
    extra = {"skip_prk_steps": True} if class_name == "PNDMScheduler" else {}
    return {"_class_name": class_name, **config, **extra}


def _tokenizer_files(pipe, folder: Path):
    """vocab.json + merges.txt, and the settings transformers' CLIPTokenizer needs besides (77 tokens)."""
    pipe.tokenizer.save(folder)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    save_json({"tokenizer_class": "CLIPTokenizer", "model_max_length": pipe.text_encoder.config.max_position_embeddings,
               "do_lower_case": True, "errors": "replace", "add_prefix_space": False, **special},
              folder / "tokenizer_config.json")
    save_json(special, folder / "special_tokens_map.json")


# -- writers ----------------------------------------------------------------------------------------

def _check_exportable(pipe, fmt: str):
    """Refuse, before anything is written, a model that `fmt` cannot express; names what is missing."""
    if not hasattr(pipe.denoiser, "input_blocks"):
        raise CheckpointError("a DiT cannot be exported: minidiff's DiT (its patch embedding, adaLN blocks and "
                              "class-conditioned final layer) has no diffusers or CompVis layout written here")
    latent, text = pipe.autoencoder is not None, pipe.text_encoder is not None
    if fmt == "original" and not (latent and text):
        raise CheckpointError("--format original writes Stable Diffusion's single file, which needs a U-Net, a KL "
                              f"VAE and a CLIP text encoder; this model has {'no text encoder' if latent else 'none'}"
                              " (use --format diffusers)")
    if latent and not text:
        raise CheckpointError("a latent model without a text encoder (a class-conditional LDM) has no diffusers "
                              "pipeline layout written here; diffusers' LDM pipelines take a VQModel and no classes")
    if text and pipe.tokenizer is None:
        raise CheckpointError("the model has a text encoder but no tokenizer/, which the exported folder needs")
    unet_config(pipe.denoiser.config, conditional=text)
    if latent:
        vae_config(pipe.autoencoder.config)


def _state(module) -> dict:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def write_diffusers(pipe, dst, *, overwrite: bool = False):
    """Write `pipe` as a diffusers folder at `dst` (atomically)."""
    _check_exportable(pipe, "diffusers")
    text = pipe.text_encoder is not None
    cfg = pipe.denoiser.config
    unet = unet_to(_state(pipe.denoiser), cfg, "diffusers")
    with atomic_folder(dst, overwrite=overwrite, kind=EXPORT_KIND, marker=True) as tmp:
        save_json(unet_config(cfg, conditional=text), tmp / "unet" / "config.json")
        save_safetensors(unet, tmp / "unet" / "diffusion_pytorch_model.safetensors", SAFETENSORS_METADATA)
        if not text:
            save_json(scheduler_config(pipe, "DDPMScheduler"), tmp / "scheduler" / "scheduler_config.json")
            save_json({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                       "scheduler": ["diffusers", "DDPMScheduler"]}, tmp / "model_index.json")
            return
        vae = vae_to_diffusers(_state(pipe.autoencoder), pipe.autoencoder.config)
        save_json(vae_config(pipe.autoencoder.config), tmp / "vae" / "config.json")
        save_safetensors(vae, tmp / "vae" / "diffusion_pytorch_model.safetensors", SAFETENSORS_METADATA)
        tokenizer = pipe.tokenizer
        save_json({"architectures": ["CLIPTextModel"], **pipe.text_encoder.config.to_dict(),
                   "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id},
                  tmp / "text_encoder" / "config.json")
        # `text_model.` as in SD1.5's own folder: transformers 4 needs it, 5 takes it
        save_safetensors({f"text_model.{k}": v for k, v in _state(pipe.text_encoder).items()},
                         tmp / "text_encoder" / "model.safetensors", SAFETENSORS_METADATA)
        _tokenizer_files(pipe, tmp / "tokenizer")
        save_json(scheduler_config(pipe, "PNDMScheduler"), tmp / "scheduler" / "scheduler_config.json")
        save_json({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"],
                   "safety_checker": [None, None], "feature_extractor": [None, None],
                   "requires_safety_checker": False}, tmp / "model_index.json")


def write_original(pipe, dst, *, overwrite: bool = False):
    """Write `pipe` as Stable Diffusion's single `.safetensors` file at `dst` (atomically)."""
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"--format original writes a .safetensors file; {dst} has suffix {dst.suffix!r} "
                         "(a .ckpt would be a pickle)")
    if dst.is_dir():
        raise FileExistsError(f"{dst} is a folder; --format original writes one .safetensors file")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
    _check_exportable(pipe, "original")
    state = {UNET_PREFIX + k: v for k, v in unet_to(_state(pipe.denoiser), pipe.denoiser.config, "openaimodel").items()}
    state.update({VAE_PREFIX + k: v for k, v in _state(pipe.autoencoder).items()})  # native = LDM layout
    state.update({TEXT_PREFIX + k: v for k, v in _state(pipe.text_encoder).items()})
    positions = pipe.text_encoder.config.max_position_embeddings
    state[TEXT_PREFIX + "embeddings.position_ids"] = torch.arange(positions)[None]  # as CompVis files hold it
    save_safetensors(state, dst, SAFETENSORS_METADATA, overwrite=overwrite)


def export(model, dst, *, format: str = "diffusers", overwrite: bool = False):
    """Export a model folder (or a loaded Pipeline) to `dst` in `format` ("diffusers" or "original")."""
    from .pipeline import Pipeline, load

    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if not isinstance(model, Pipeline):
        check_apart(model, dst)
        model = load(model, check="now", pack=False)
    (write_diffusers if format == "diffusers" else write_original)(model, dst, overwrite=overwrite)
    return model


def main(argv=None) -> int:
    """`minidiff export`; user errors propagate to the CLI's error edge (one line, exit 1)."""
    parser = argparse.ArgumentParser(prog="minidiff export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=FORMATS, help="diffusers folder or SD single file")
    parser.add_argument("model", help="minidiff model folder")
    parser.add_argument("dst", help="folder (diffusers) or .safetensors file (original) to write")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists (only a previous export)")
    args = parser.parse_args(argv)
    if Path(args.dst).exists() and not args.overwrite:
        raise FileExistsError(f"{args.dst} exists; pass --overwrite to replace it")
    pipe = export(args.model, args.dst, format=args.format, overwrite=args.overwrite)
    print(f"wrote {args.dst}: {args.format} layout of {args.model} "
          f"({sum(p.numel() for p in pipe.denoiser.parameters()):,} U-Net parameters)")
    return 0
