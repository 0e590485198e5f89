"""Autoencoder state-dict keys of the public layouts, translated to minidiff's native (LDM) layout.

- CompVis / LDM single files: `first_stage_model.` + the native key, so conversion strips a prefix.
- diffusers AutoencoderKL / VQModel: `down_blocks.i.resnets.j`, `mid_block.attentions.0.to_q`, ...,
  attention projections as Linear [C, C], and decoder `up_blocks` in processing order (lowest
  resolution first) where LDM stores `decoder.up.{level}` by resolution level (0 = full size).
"""

from __future__ import annotations

import re

import torch

from ..autoencoder import NORM_GROUPS, SD_SCALE_FACTOR, AutoencoderConfig

NATIVE_TOP_LEVEL = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")

# Ordered (pattern, replacement) pairs, applied one after another to every diffusers key.
# `decoder.up_blocks.k` indices have already been flipped to resolution levels by `reverse_up_blocks`.
DIFFUSERS_TO_NATIVE_RENAMES: tuple[tuple[str, str], ...] = (
    # mid block: resnet, single-head attention (current and deprecated names), resnet
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|query)\.", r"\1.mid.attn_1.q."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(to_k|key)\.", r"\1.mid.attn_1.k."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(to_v|value)\.", r"\1.mid.attn_1.v."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(to_out\.0|proj_attn)\.", r"\1.mid.attn_1.proj_out."),
    # resolution levels
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.up.\1.block.\2."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", r"decoder.up.\1.upsample."),
    # names inside blocks and at the ends
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
)

# Attention projections that LDM stores as 1x1 convs [C, C, 1, 1] and diffusers as Linear [C, C].
ATTENTION_PROJECTION = re.compile(r"\.attn(_1|\.\d+)\.(q|k|v|proj_out)\.weight$")


def reverse_up_blocks(key: str, num_levels: int) -> str:
    """`decoder.up_blocks.k` (k-th block processed) -> `decoder.up_blocks.{num_levels-1-k}` (its level)."""
    def flip(match: re.Match) -> str:
        return f"decoder.up_blocks.{num_levels - 1 - int(match.group(1))}."

    return re.sub(r"^decoder\.up_blocks\.(\d+)\.", flip, key)


def diffusers_key_to_native(key: str, num_levels: int) -> str:
    """One diffusers AutoencoderKL / VQModel key -> its native name; keys with no rule pass unchanged."""
    key = reverse_up_blocks(key, num_levels)
    for pattern, replacement in DIFFUSERS_TO_NATIVE_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def diffusers_to_native(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL / VQModel state dict -> the native layout of `Autoencoder(config)`.

    Takes both attention spellings (`to_q/to_k/to_v/to_out.0` and the deprecated
    `query/key/value/proj_attn` of SD1.5's vae file) and 2-D or 1x1 4-D projection weights.
    Keys with no rule keep their name, so `check_state_dict` reports them as unexpected.
    """
    num_levels = len(config.channel_mult)
    native: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}
    for key, tensor in state_dict.items():
        new_key = diffusers_key_to_native(key, num_levels)
        if new_key in native:
            raise ValueError(f"diffusers keys {source_of[new_key]!r} and {key!r} both map to {new_key!r}; "
                             "the state dict holds the same weight twice (old and new attention names?). "
                             "Keep one spelling.")
        if ATTENTION_PROJECTION.search(new_key) and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
        native[new_key] = tensor
        source_of[new_key] = key
    return native


def ldm_to_native(state_dict: dict[str, torch.Tensor], prefix: str = "first_stage_model.",
                  ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The first stage of an LDM / SD checkpoint -> (native state dict, keys left unused).

    Strips `prefix` (use "" for a standalone first-stage checkpoint). Every other key, and anything
    under the prefix that is not part of the autoencoder (e.g. a training `loss.*`), is returned
    in the unused list for the caller to report, never dropped silently.
    """
    native: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for key, tensor in state_dict.items():
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name is not None and name.startswith(NATIVE_TOP_LEVEL):
            native[name] = tensor
        else:
            unused.append(key)
    return native, unused


# -- config readers ------------------------------------------------------------------------------

def autoencoder_config_from_ldm(ddconfig: dict, embed_dim: int, n_embed: int | None = None,
                                scale_factor: float = 1.0) -> AutoencoderConfig:
    """From an LDM `first_stage_config.params` (ddconfig, embed_dim, n_embed for VQ).

    `scale_factor` lives in the LatentDiffusion params, not the first stage: LDM's default is 1.0,
    Stable Diffusion's yaml sets 0.18215.
    """
    ddconfig = dict(ddconfig)
    unsupported = {"attn_type": "vanilla", "use_linear_attn": False, "resamp_with_conv": True,
                   "give_pre_end": False, "tanh_out": False}
    for key, expected in unsupported.items():
        if key in ddconfig and ddconfig.pop(key) != expected:
            raise ValueError(f"ddconfig.{key} must be {expected!r}: minidiff's autoencoder only "
                             "implements the vanilla LDM encoder/decoder.")
    # LDM's Normalize hard-codes 32 groups; a ddconfig that names its own count (as ports of other
    # autoencoders do, in diffusers' spelling) gets it.
    renames = {"ch": "base_channels", "ch_mult": "channel_mult", "out_ch": "out_channels",
               "norm_num_groups": "norm_groups"}
    params = {renames.get(k, k): v for k, v in ddconfig.items()}
    kind = "vq" if n_embed is not None else "kl"
    return AutoencoderConfig.from_dict({**params, "kind": kind, "embed_dim": embed_dim, "n_embed": n_embed,
                          "scale_factor": scale_factor})

def autoencoder_config_from_diffusers(config: dict, *, scale_factor: float | None = None) -> AutoencoderConfig:
    """From a diffusers AutoencoderKL or VQModel `config.json` dict.

    For KL a missing `scaling_factor` means diffusers' default 0.18215 (SD1.5's vae/config.json
    relies on it). For VQModel the same default is wrong for LDM's VQ-f4 models, which use 1.0
    (diffusers #6725), so without the key you must pass `scale_factor` yourself.
    """
    class_name = config.get("_class_name")
    if class_name not in (None, "AutoencoderKL", "VQModel"):
        raise ValueError(f"diffusers config is for {class_name}; minidiff reads AutoencoderKL and "
                         "VQModel configs only.")
    is_vq = class_name == "VQModel" or "num_vq_embeddings" in config or "vq_embed_dim" in config
    defaulted = set(config.get("_use_default_values", ()))  # filled in by diffusers, not in the file
    config = {k: v for k, v in config.items()
              if not k.startswith("_") and not (k == "scaling_factor" and k in defaulted)}
    expected = {"act_fn": "silu", "use_quant_conv": True,
                "use_post_quant_conv": True, "mid_block_add_attention": True, "shift_factor": None,
                "latents_mean": None, "latents_std": None, "norm_type": "group"}
    for key, value in expected.items():
        if config.get(key, value) != value:
            raise ValueError(f"diffusers config {key}={config[key]!r} is not supported; minidiff "
                             f"implements the LDM autoencoder ({key}={value!r}).")
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(t != block for t in config.get(key, ())):
            raise ValueError(f"diffusers config {key}={config[key]} is not supported; only plain "
                             f"{block} blocks (no per-level attention) map onto the LDM layout.")
    ignored = {"sample_size", "force_upcast", "lookup_from_codebook", "scaling_factor"}
    known = {"in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
             "num_vq_embeddings", "vq_embed_dim", "down_block_types", "up_block_types", *expected, *ignored}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"diffusers autoencoder config has key(s) {unknown} that minidiff does not "
                         "know; check that this is an AutoencoderKL or VQModel config.")
    if scale_factor is None:
        scale_factor = config.get("scaling_factor", None if is_vq else SD_SCALE_FACTOR)
    if scale_factor is None:
        raise ValueError("This VQModel config has no scaling_factor. diffusers would assume 0.18215, "
                         "but LDM's VQ-f4 models (cin256-v2, ldm-celebahq-256) use 1.0; pass "
                         "scale_factor= explicitly.")
    widths = list(config.get("block_out_channels", (64,)))
    base = widths[0]
    if any(w % base for w in widths):
        raise ValueError(f"diffusers block_out_channels {widths} are not multiples of the first "
                         "width, so they cannot be written as base_channels * channel_mult.")
    latent = config.get("latent_channels", 3 if is_vq else 4)
    return AutoencoderConfig(
        kind="vq" if is_vq else "kl",
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        base_channels=base,
        channel_mult=tuple(w // base for w in widths),
        num_res_blocks=config.get("layers_per_block", 1),
        z_channels=latent,
        embed_dim=(config.get("vq_embed_dim") or latent) if is_vq else latent,
        double_z=not is_vq,
        resolution=config.get("sample_size", 256),
        n_embed=config.get("num_vq_embeddings", 256) if is_vq else None,
        scale_factor=float(scale_factor),
        norm_groups=config.get("norm_num_groups", NORM_GROUPS),
    )
