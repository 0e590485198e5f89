"""Autoencoder state-dict keys of the public layouts, translated to minidiff's native (LDM) layout.

- CompVis / LDM single files: `first_stage_model.` + the native key, so conversion strips a prefix.
- diffusers AutoencoderKL / VQModel: `down_blocks.i.resnets.j`, `mid_block.attentions.0.to_q`, ...,
  attention projections as Linear [C, C], and decoder `up_blocks` in processing order (lowest
  resolution first) where LDM stores `decoder.up.{level}` by resolution level (0 = full size).
"""

from __future__ import annotations

import re

import torch

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
