"""The first stage of a latent diffusion model: a KL or VQ autoencoder between images and latents.

The module tree reproduces the original LDM layout (`ldm/modules/diffusionmodules/model.py`), so a
CompVis checkpoint loads by stripping its `first_stage_model.` prefix (see `minidiff.formats.vae_keys`):

    encoder.conv_in -> encoder.down.{level}.block.{j} (+ .attn.{j}) -> .downsample -> encoder.mid
    decoder.mid -> decoder.up.{level}.block.{j} (+ .attn.{j}) -> .upsample, level 0 = full resolution

The decoder runs its levels from the lowest resolution up, but stores them by resolution level.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .checkpoint import check_state_dict
from .config import config_from_dict, config_to_dict

NORM_GROUPS = 32  # LDM's and SD's VAEs use GroupNorm(32, C, eps=1e-6); diffusers' norm_num_groups can differ
SD_SCALE_FACTOR = 0.18215  # Stable Diffusion's KL-f8 latents; LDM's VQ-f4 models use 1.0


@dataclass
class AutoencoderConfig:
    """Shape of a KL ("kl") or VQ ("vq") autoencoder; the defaults are Stable Diffusion's KL-f8 VAE."""

    kind: str = "kl"
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    double_z: bool = True
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 256  # only decides where `attn_resolutions` apply, never the input size
    dropout: float = 0.0
    n_embed: int | None = None  # VQ codebook size
    scale_factor: float = SD_SCALE_FACTOR
    norm_groups: int = NORM_GROUPS  # GroupNorm groups in every norm (diffusers' norm_num_groups)

    def __post_init__(self):
        for name in ("channel_mult", "attn_resolutions"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"AutoencoderConfig.{name} must be a list or tuple of ints, got {value!r}.")
            setattr(self, name, tuple(value))
        if self.kind not in ("kl", "vq"):
            raise ValueError(f"AutoencoderConfig.kind must be 'kl' or 'vq', got {self.kind!r}.")
        for name in ("in_channels", "out_channels", "base_channels", "num_res_blocks", "z_channels",
                     "embed_dim", "resolution", "norm_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AutoencoderConfig.{name} must be a positive int, got {value!r}.")
        if not self.channel_mult or not all(isinstance(m, int) and m >= 1 for m in self.channel_mult):
            raise ValueError("AutoencoderConfig.channel_mult must be a non-empty sequence of positive "
                             f"ints, got {self.channel_mult!r}.")
        groups = self.norm_groups
        bad = [self.base_channels * m for m in self.channel_mult if (self.base_channels * m) % groups]
        if bad:
            raise ValueError(f"AutoencoderConfig.base_channels * channel_mult gives {bad}, which GroupNorm"
                             f"({groups}) cannot split; use multiples of norm_groups={groups}.")
        if not all(isinstance(r, int) and r >= 1 for r in self.attn_resolutions):
            raise ValueError("AutoencoderConfig.attn_resolutions must hold positive ints (feature-map "
                             f"sizes, as in LDM's ddconfig), got {self.attn_resolutions!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AutoencoderConfig.dropout must be in [0, 1), got {self.dropout!r}.")
        if not isinstance(self.scale_factor, (int, float)) or self.scale_factor <= 0:
            raise ValueError(f"AutoencoderConfig.scale_factor must be a positive number, got "
                             f"{self.scale_factor!r} (SD: 0.18215, LDM VQ-f4: 1.0).")
        if self.kind == "kl":
            if not self.double_z:
                raise ValueError("AutoencoderConfig.double_z must be True for kind='kl': the encoder "
                                 "emits mean and log-variance.")
            if self.n_embed is not None:
                raise ValueError("AutoencoderConfig.n_embed is a VQ codebook size; leave it None for "
                                 "kind='kl' or set kind='vq'.")
        else:
            if self.double_z:
                raise ValueError("AutoencoderConfig.double_z must be False for kind='vq'.")
            if not isinstance(self.n_embed, int) or isinstance(self.n_embed, bool) or self.n_embed < 1:
                raise ValueError("AutoencoderConfig.n_embed must be the codebook size (a positive int) "
                                 f"for kind='vq', got {self.n_embed!r}.")

    @classmethod
    def from_dict(cls, data: dict) -> AutoencoderConfig:
        """Build from a plain dict (e.g. JSON); unknown fields are an error, not silently dropped."""
        return config_from_dict(cls, data)

    def to_dict(self) -> dict:
        """Plain, JSON-ready dict (tuples become lists) that `from_dict` reads back."""
        return config_to_dict(self)


def group_norm(channels: int, groups: int = NORM_GROUPS) -> nn.GroupNorm:
    """GroupNorm with LDM's autoencoder settings (32 groups unless told, eps 1e-6)."""
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Pre-activation residual block; no time embedding, unlike the U-Net's."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = NORM_GROUPS):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:  # a 1x1 conv matches widths on the skip path
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q/k/v/proj_out are 1x1 convs as in LDM checkpoints."""

    def __init__(self, channels: int, groups: int = NORM_GROUPS):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        height = x.shape[2]
        # (B, C, H, W) -> (B, 1 head, HW, C); SDPA's default scale C**-0.5 is LDM's
        q, k, v = (rearrange(conv(h), "b c h w -> b 1 (h w) c") for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=height)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv after padding right and bottom only."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # asymmetric (0, 1, 0, 1) padding: what the checkpoints were trained with, not padding=1
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: residual blocks, each optionally followed by attention, then a resample."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, use_attn: bool,
                 dropout: float, resample: str | None, groups: int = NORM_GROUPS):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b, dropout, groups) for a, b in zip(widths, widths[1:]))
        self.attn = nn.ModuleList(AttnBlock(out_channels, groups) for _ in range(num_blocks) if use_attn)
        if resample == "down":
            self.downsample = Downsample(out_channels)
        elif resample == "up":
            self.upsample = Upsample(out_channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[j](h)
        if hasattr(self, "downsample"):
            h = self.downsample(h)
        if hasattr(self, "upsample"):
            h = self.upsample(h)
        return h


class MidBlock(nn.Module):
    """Residual block, single-head attention, residual block at the lowest resolution."""

    def __init__(self, channels: int, dropout: float, groups: int = NORM_GROUPS):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Images (B, in_channels, H, W) -> moments (B, 2*z or z, H/f, W/f), f = 2**(levels-1)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(config.in_channels, config.base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        in_channels, resolution = config.base_channels, config.resolution
        for level, width in enumerate(widths):
            self.down.append(Level(in_channels, width, config.num_res_blocks,
                                   resolution in config.attn_resolutions, config.dropout,
                                   resample="down" if level != last else None, groups=config.norm_groups))
            in_channels, resolution = width, resolution // 2
        self.mid = MidBlock(widths[-1], config.dropout, config.norm_groups)
        self.norm_out = group_norm(widths[-1], config.norm_groups)
        out = 2 * config.z_channels if config.double_z else config.z_channels
        self.conv_out = nn.Conv2d(widths[-1], out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents (B, z, h, w) -> images (B, out_channels, h*f, w*f)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        self.conv_in = nn.Conv2d(config.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], config.dropout, config.norm_groups)
        levels: list[Level | None] = [None] * len(widths)
        in_channels = widths[-1]
        resolution = config.resolution // 2 ** (len(widths) - 1)
        for level in reversed(range(len(widths))):  # built in processing order, lowest resolution first
            levels[level] = Level(in_channels, widths[level], config.num_res_blocks + 1,
                                  resolution in config.attn_resolutions, config.dropout,
                                  resample="up" if level != 0 else None, groups=config.norm_groups)
            in_channels, resolution = widths[level], resolution * 2
        self.up = nn.ModuleList(levels)  # indexed by resolution level: up[0] is full resolution
        self.norm_out = group_norm(widths[0], config.norm_groups)
        self.conv_out = nn.Conv2d(widths[0], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The KL encoder's posterior: moments (B, 2C, H, W) split into mean and log-variance."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        # LDM's bounds: keep exp() finite for an untrained or badly scaled encoder
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise, the noise drawn from `generator` (on its own device) when given."""
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)


class VectorQuantizer(nn.Module):
    """Snap each latent vector to its nearest codebook entry (L2), as taming's VectorQuantizer2 at inference."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Codebook index of every latent pixel: (B, C, H, W) -> (B, H, W)."""
        batch, _, height, width = z.shape
        codebook = self.embedding.weight
        nearest = []
        # one image at a time bounds the (HW, n_embed) distances: 128 MiB for VQ-f4 at 256 px
        for vectors in rearrange(z, "b c h w -> b (h w) c"):
            # |z - e|^2 = |z|^2 + |e|^2 - 2 z.e, one matmul instead of materialising every difference
            distance = vectors.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * vectors @ codebook.T
            nearest.append(distance.argmin(dim=1))
        return torch.stack(nearest).view(batch, height, width)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return rearrange(self.embedding(self.indices(z)), "b h w c -> b c h w")


class Autoencoder(nn.Module):
    """KL or VQ first stage: `encode` gives U-Net-ready (scaled) latents, `decode` gives images."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.kind == "kl":  # moments: mean and log-variance for each latent channel
            self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        else:
            self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
            self.quantize = VectorQuantizer(config.n_embed, config.embed_dim)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def scale_factor(self) -> float:
        return self.config.scale_factor

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD, 4 for VQ-f4)."""
        return 2 ** (len(self.config.channel_mult) - 1)

    def encode(self, x: torch.Tensor, *, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> latents times scale_factor (B, embed_dim, H/f, W/f).

        KL gives the posterior mean, or a sample with `sample=True`. VQ gives the latent before
        quantisation, as LDM's `encode_first_stage`; `decode` quantises it.
        """
        h = self.quant_conv(self.encoder(x.to(self.encoder.conv_in.weight.dtype)))
        if self.config.kind == "kl":
            posterior = DiagonalGaussian(h)
            h = posterior.sample(generator) if sample else posterior.mean
        elif sample:
            raise ValueError("sample=True needs a KL autoencoder; a VQ encoder is deterministic, "
                             "call encode(x) without it.")
        return h * self.scale_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> float32 images, nominally in [-1, 1] (not clamped, as LDM and diffusers).

        The decode path always runs in float32: half-precision decoding overflows in the
        full-resolution GroupNorm/conv stack and returns NaN or black images. A module cast to
        fp16/bf16 gets its decode path upcast here, once; the encoder keeps its dtype.
        """
        decode_path = [self.post_quant_conv, self.decoder]
        if self.config.kind == "vq":
            decode_path.append(self.quantize)
        if any(p.dtype != torch.float32 for m in decode_path for p in m.parameters()):
            for module in decode_path:
                module.float()
        with torch.autocast(z.device.type, enabled=False):
            z = z.float() / self.scale_factor
            if self.config.kind == "vq":  # LDM's VQModelInterface.decode(force_not_quantize=False)
                z = self.quantize(z)
            return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction: decode(encode(x))."""
        return self.decode(self.encode(x))

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a native-layout state dict after checking every key and shape (nothing is assigned on error).

        Convert first with `minidiff.formats.vae_keys.ldm_to_native` or `diffusers_to_native`. A model built
        on the meta device takes the tensors themselves.
        """
        check_state_dict(self, state_dict, what=f"{self.config.kind.upper()} autoencoder")
        on_meta = any(p.is_meta for p in self.parameters())
        self.load_state_dict(state_dict, strict=True, assign=on_meta)
