"""ControlNet: a trained copy of the U-Net's encoder that steers it with a control image (edges,
depth, pose), and the rule by which it is cached.

The copy reads the noisy latent plus the control image's hint feature, and each of its input
blocks (and its middle) adds a residual, through a 1x1 "zero convolution", to the skip the U-Net's
decoder reads there (and to the middle block's output). The caching rule follows from that: a
shallow step at branch b reads only skips 0..b, so only the ControlNet's `input_blocks[:b + 1]`
run; its deeper residuals entered the deep feature the last full step cached (or its forecast).
The U-Net's primitives carry this out (`unet.Control`): `forward_cut` steers the skips before the
cut, `forward_rest` runs the rest of each ControlNet. The hint feature depends on the control
image only, so it is embedded once per run, not at every step.

A ControlNet folder (written by convert/controlnet.py) holds config.json (format
"minidiff-controlnet", the encoder's U-Net config and the hint encoder's widths) and
controlnet.safetensors.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, build_loaded, read_state_dict
from .checks import batch_timesteps
from .config import config_from_dict, config_to_dict
from .unet import Control, PreparedContext, UNet, UNetConfig
from .writing import atomic_folder, save_json, save_safetensors

FORMAT = "minidiff-controlnet"
FORMAT_VERSION = 1
WEIGHTS = "controlnet.safetensors"


@dataclass
class ControlNetConfig:
    """The encoder copy's U-Net config (the base model's) and the hint encoder's widths."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    hint_channels: int = 3  # channels of the control image
    hint_block_channels: tuple = (16, 32, 96, 256)  # each after the first halves the size (8x for SD)

    def __post_init__(self):
        if isinstance(self.unet, dict):
            self.unet = UNetConfig.from_dict(self.unet)
        self.hint_block_channels = tuple(self.hint_block_channels)
        if not self.hint_block_channels or any(not isinstance(c, int) or c < 1 for c in self.hint_block_channels):
            raise ValueError(f"hint_block_channels must be positive ints, got {self.hint_block_channels}")

    @property
    def hint_downsample(self) -> int:
        """Control-image pixels per latent pixel."""
        return 2 ** (len(self.hint_block_channels) - 1)

    def to_dict(self) -> dict:
        return {**config_to_dict(self), "unet": self.unet.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "ControlNetConfig":
        return config_from_dict(cls, d)


class HintEmbedding(nn.Module):
    """Control image -> a feature of the latent's size and the first block's width: a conv, then per
    width a conv and a stride-2 conv (SiLU after each), then a projection."""

    def __init__(self, in_channels: int, channels: tuple, out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(channels, channels[1:]):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)

    def forward(self, image):
        h = F.silu(self.conv_in(image))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


class ControlNet(nn.Module):
    """The U-Net's encoder (built by minidiff's own UNet, without a decoder), the hint embedding and
    one zero convolution per skip plus one for the middle."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        self.encoder = UNet(config.unet, decoder=False)
        self.hint_embed = HintEmbedding(config.hint_channels, config.hint_block_channels,
                                        config.unet.level_channels[0])
        self.zero_convs = nn.ModuleList(nn.Conv2d(ch, ch, 1) for ch in self.encoder.skip_channels)
        deepest = self.encoder.skip_channels[-1]
        self.middle_out = nn.Conv2d(deepest, deepest, 1)
        self.to(memory_format=torch.channels_last)

    @property
    def num_blocks(self) -> int:
        return len(self.encoder.input_blocks)

    def embed_hint(self, image: torch.Tensor) -> torch.Tensor:
        """(B, hint_channels, H, W) control image in [0, 1] -> its hint feature at latent size."""
        weight = self.hint_embed.conv_in.weight
        return self.hint_embed(image.to(weight.device, weight.dtype).contiguous(memory_format=torch.channels_last))

    def forward(self, x, t, context, hint, scale: float = 1.0):
        """Every residual at once: (one per skip, the middle's), as diffusers' ControlNetModel returns."""
        x = x.contiguous(memory_format=torch.channels_last)  # as the U-Net's primitives run it
        t = batch_timesteps(t, x)
        steering = Controlled(context, (self,), (hint,), (scale,)).start(x, t)
        steering, residuals = steering.steer([0] * self.num_blocks)
        return residuals, steering.steer_middle(0)


@dataclass
class Controlled(Control):
    """The U-Net's conditioning `cond` with ControlNets and each one's hint feature and scale."""

    cond: Any
    nets: tuple
    hints: tuple  # each (B, C, h, w) at the latent's size (ControlNet.embed_hint)
    scales: tuple

    def check(self, x):
        for net, hint in zip(self.nets, self.hints):
            want = (x.shape[0], net.encoder.skip_channels[0], x.shape[2], x.shape[3])
            if tuple(hint.shape) != want:
                raise ValueError(f"a ControlNet hint of shape {tuple(hint.shape)} does not fit latents "
                                 f"{tuple(x.shape)} (it needs {want}): the control image must be the generated "
                                 "image's size, one per sample or one for all")

    def with_cond(self, cond) -> "Controlled":
        return dataclasses.replace(self, cond=cond)

    def repeat(self, copies: int) -> "Controlled":
        """The hints for a batch of `copies` stacked copies (guidance runs the batch twice)."""
        return dataclasses.replace(self, hints=tuple(torch.cat([h] * copies) for h in self.hints))

    def start(self, x, t) -> "Steering":
        tokens = self.cond.tokens if isinstance(self.cond, PreparedContext) else self.cond
        conds = tuple(net.encoder.embed(x, t, tokens) for net in self.nets)
        return Steering(self.nets, self.scales, conds, tuple(x for _ in self.nets), self.hints, 0)


@dataclass
class Steering:
    """One step of the ControlNets: each one's feature after its first `done` input blocks."""

    nets: tuple
    scales: tuple
    conds: tuple
    h: tuple
    hints: tuple
    done: int

    def steer(self, skips: list) -> tuple:
        """Run every ControlNet's next len(skips) input blocks; (the advanced state, skips + residuals)."""
        stop = self.done + len(skips)
        total = [None] * len(skips)
        features = []
        for net, scale, c, h, hint in zip(self.nets, self.scales, self.conds, self.h, self.hints):
            for j, i in enumerate(range(self.done, stop)):
                h = net.encoder.input_blocks[i](h, c.emb, c.context)
                if i == 0:
                    h = h + hint  # the control image enters after the input convolution
                r = net.zero_convs[i](h) * scale
                total[j] = r if total[j] is None else total[j] + r
            features.append(h)
        return dataclasses.replace(self, h=tuple(features), done=stop), [s + r for s, r in zip(skips, total)]

    def steer_middle(self, h):
        """The middle block's output plus every ControlNet's middle residual (after all its input blocks)."""
        for net, scale, c, feature in zip(self.nets, self.scales, self.conds, self.h):
            assert self.done == net.num_blocks, "steer_middle before every input block ran"
            h = h + net.middle_out(net.encoder.middle_block(feature, c.emb, c.context)) * scale
        return h


# -- the folder ---------------------------------------------------------------------------------------

def save(net: ControlNet, dst, *, overwrite: bool = False, meta: Optional[dict] = None):
    """Write a ControlNet folder atomically (config.json + controlnet.safetensors)."""
    with atomic_folder(dst, overwrite=overwrite, kind=FORMAT) as tmp:
        state = {k: v.contiguous() for k, v in net.state_dict().items()}
        save_safetensors(state, Path(tmp) / WEIGHTS)
        save_json({"format": FORMAT, "format_version": FORMAT_VERSION, "controlnet": net.config.to_dict(),
                   **(meta or {})}, Path(tmp) / "config.json")


def load(path, *, device="cpu", dtype: Optional[torch.dtype] = None, allow_nan: bool = False) -> ControlNet:
    """Read a ControlNet folder, checked whole before anything is built."""
    import json

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a ControlNet folder (no config.json); convert one with "
                              "convert/controlnet.py first")
    try:
        config = json.loads((path / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a minidiff ControlNet folder (config.json format="
                              f"{config.get('format') if isinstance(config, dict) else None!r}); convert it with "
                              "convert/controlnet.py")
    cfg = ControlNetConfig.from_dict(config["controlnet"])
    state = read_state_dict(path / WEIGHTS, allow_nan=True)
    return build_loaded(lambda: ControlNet(cfg), state, "ControlNet", device=device,
                        dtype=torch.float32 if dtype is None else dtype, allow_nan=allow_nan,
                        source=str(path / WEIGHTS)).eval()


def check_fits(net: ControlNet, unet, source="the ControlNet"):
    """Refuse a ControlNet made for another base model: its residuals must match the U-Net's skips."""
    cfg, base = net.config.unet, unet.config
    problems = []
    if tuple(net.encoder.skip_channels) != tuple(getattr(unet, "skip_channels", ())):
        problems.append(f"its skips have channels {list(net.encoder.skip_channels)}, the U-Net's "
                        f"{list(getattr(unet, 'skip_channels', ()))}")
    for name in ("in_channels", "context_dim", "num_classes"):
        if getattr(cfg, name) != getattr(base, name, None):
            problems.append(f"its {name} is {getattr(cfg, name)}, the U-Net's {getattr(base, name, None)}")
    if problems:
        raise ValueError(f"{source} was made for another base model: {'; '.join(problems)}")


def control_for(nets: list, images, scales, batch: int, latent_hw: tuple) -> Controlled:
    """The Controlled conditioning of a run: each control image checked and embedded once."""
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    scales = list(scales) if isinstance(scales, (list, tuple)) else [scales] * len(nets)
    if len(images) != len(nets) or len(scales) != len(nets):
        raise ValueError(f"{len(nets)} ControlNet(s) need as many control images and scales, got {len(images)} "
                         f"image(s) and {len(scales)} scale(s)")
    hints = []
    for net, image, scale in zip(nets, images, scales):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ValueError(f"controlnet_scale must be a number, got {scale!r}")
        size = tuple(n * net.config.hint_downsample for n in latent_hw)
        if not torch.is_tensor(image) or image.ndim != 4 or image.shape[1] != net.config.hint_channels \
                or image.shape[0] not in (1, batch) or tuple(image.shape[2:]) != size:
            raise ValueError(f"control_image must be a tensor of shape ({batch} or 1, {net.config.hint_channels}, "
                             f"{size[0]}, {size[1]}) (the generated image's size), got "
                             f"{tuple(getattr(image, 'shape', ()))}")
        if image.min() < 0 or image.max() > 1:
            raise ValueError("control_image must hold values in [0, 1]")
        hints.append(net.embed_hint(image).expand(batch, -1, -1, -1))
    return Controlled(None, tuple(nets), tuple(hints), tuple(float(s) for s in scales))
