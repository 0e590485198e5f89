"""minidiff's native keys spelled the public way: the inverse of unet_keys, vae_keys and text_keys.

The block structure comes from the forward tables themselves (`unet_keys._block_prefixes`, the top
tables), read backwards. What the forward tables cannot say is which of the spellings they accept a
layout writes (`.to_out.` comes from `to_out.0` and `proj_attn`; `norm1` is a ResBlock's `in_layers.0`
but a transformer block's own `norm1`), so each layout's choice is one short table below. Every
inverse is checked by running the forward table over its result: it must give back each native key
with its shape, or the export stops (`InverseError`) before anything is written.
"""
from __future__ import annotations

import re

import torch

from . import unet_keys, vae_keys
from ..unet import UNetConfig

# A block sitting directly in a U-Net layer (ResBlock, attention, down/upsampler), not inside one.
_SLOT = r"^((?:input|output)_blocks\.\d+\.\d+|middle_block\.\d+)\."

# Native inner name -> the spelling each layout writes, applied in order to native keys.
_DIFFUSERS_UNET_SPELLING = [
    (_SLOT + r"emb_proj\.", r"\1.time_emb_proj."),
    (_SLOT + r"shortcut\.", r"\1.conv_shortcut."),
    (r"\.blocks\.(\d+)\.", r".transformer_blocks.\1."),
    (r"\.to_out\.", ".to_out.0."),
    (r"\.ff\.proj\.", ".ff.net.0.proj."),
    (r"\.ff\.out\.", ".ff.net.2."),
]
_DIFFUSERS_SELF_ATTENTION_NORM = (_SLOT + r"norm\.", r"\1.group_norm.")  # DDPM attention's GroupNorm
_OPENAIMODEL_UNET_SPELLING = [
    (_SLOT + r"norm1\.", r"\1.in_layers.0."),
    (_SLOT + r"conv1\.", r"\1.in_layers.2."),
    (_SLOT + r"emb_proj\.", r"\1.emb_layers.1."),
    (_SLOT + r"norm2\.", r"\1.out_layers.0."),
    (_SLOT + r"conv2\.", r"\1.out_layers.3."),
    (_SLOT + r"shortcut\.", r"\1.skip_connection."),
    (r"^(input_blocks\.\d+\.0)\.conv\.", r"\1.op."),  # the downsampler's strided conv
    *_DIFFUSERS_UNET_SPELLING[2:],  # transformer blocks are spelled alike in both
]
_DIFFUSERS_VAE_SPELLING = [
    (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
    (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
    (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2."),
    (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"^decoder\.up\.(\d+)\.block\.(\d+)\.", r"decoder.up_blocks.\1.resnets.\2."),
    (r"^decoder\.up\.(\d+)\.upsample\.", r"decoder.up_blocks.\1.upsamplers.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
]


class InverseError(ValueError):
    """The inverse tables and the forward ones disagree: a bug, never a user error."""


def _spell(key: str, spelling) -> str:
    for pattern, replacement in spelling:
        key = re.sub(pattern, replacement, key)
    return key


def _unprefix(key: str, prefixes) -> str:
    """The source key of a native one, through the (source prefix, native prefix) table; where the
    table lists a native slot twice (an upsampler sits where a level without attention has none),
    the later entry is the block that exists."""
    for source, native in reversed(prefixes):
        if key.startswith(native):
            return source + key[len(native):]
    return key


def _checked(native: dict, exported: dict, forward, layout: str) -> dict:
    """`exported` if the forward table maps it back onto `native` key for key and shape for shape."""
    placeholders = {k: torch.empty(tuple(v.shape), device="meta") for k, v in exported.items()}
    back = forward(placeholders)
    if list(back) != list(native) or any(tuple(back[k].shape) != tuple(v.shape) for k, v in native.items()):
        wrong = next((f"{k!r} -> {b!r}" for k, b in zip(native, back) if k != b), "a shape")
        raise InverseError(f"the {layout} key table does not invert: {wrong}")
    return exported


def unet_names(native_keys, cfg: UNetConfig, layout: str) -> dict:
    """{native key: its name in `layout`} ("diffusers" or "openaimodel"), unchecked (see `unet_to`)."""
    if layout == "diffusers":
        prefixes = unet_keys._DIFFUSERS_TOP + unet_keys._block_prefixes(cfg, "diffusers")
        spelling = _DIFFUSERS_UNET_SPELLING + ([_DIFFUSERS_SELF_ATTENTION_NORM] if cfg.attention_type == "self" else [])
    else:
        prefixes, spelling = unet_keys._OPENAI_TOP, _OPENAIMODEL_UNET_SPELLING
    return {key: _unprefix(_spell(key, spelling), prefixes) for key in native_keys}


def unet_to(state_dict: dict, cfg: UNetConfig, layout: str) -> dict:
    """A native U-Net state dict in the diffusers or openaimodel (CompVis) layout, checked."""
    names = unet_names(state_dict, cfg, layout)
    exported = {names[k]: v for k, v in state_dict.items()}
    forward = unet_keys.diffusers_to_native if layout == "diffusers" else unet_keys.openaimodel_to_native
    return _checked(state_dict, exported, lambda sd: forward(sd, cfg), layout)


def vae_to_diffusers(state_dict: dict, config) -> dict:
    """A native (LDM-layout) autoencoder state dict in diffusers' AutoencoderKL layout, checked;
    attention projections become the Linear weights diffusers holds."""
    exported = {}
    for key, value in state_dict.items():
        name = vae_keys.reverse_up_blocks(_spell(key, _DIFFUSERS_VAE_SPELLING), len(config.channel_mult))
        if vae_keys.ATTENTION_PROJECTION.search(key) and value.ndim == 4:
            value = value[:, :, 0, 0]  # 1x1 conv [C, C, 1, 1] -> Linear [C, C]
        exported[name] = value
    return _checked(state_dict, exported, lambda sd: vae_keys.diffusers_to_native(sd, config), "diffusers autoencoder")
