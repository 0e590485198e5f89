"""The U-Net, with DeepCache-style partial execution built into its forward.

One module covers the DDPM family (diffusers' UNet2DModel, pesser's TF port), the LDM family
(openaimodel with spatial transformers, e.g. cin256-v2) and Stable Diffusion 1.x.

The network is two flat lists, as in openaimodel: every entry of `input_blocks` produces one skip
connection and every entry of `output_blocks` consumes one, in reverse. Skip 0 is the input
convolution; skip b is the output of `input_blocks[b]` and is consumed by `output_blocks[-1 - b]`.
Caching at branch b is therefore a slice: a shallow step runs `input_blocks[:b + 1]` and
`output_blocks[-1 - b:]`, and reuses the decoder state that entered `output_blocks[-1 - b]` on the
last full step. That state is the deep ("main branch") feature DeepCache found to change slowly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .checks import batch_timesteps, check_config, check_labels
from .config import config_from_dict, config_to_dict
from .denoiser import CutState, Denoiser, FeatureCache, count_macs  # noqa: F401 (importable from here as before)
from .packing import Conv2d, Linear


@dataclass
class UNetConfig:
    """What a U-Net is: widths, depth, attention and conditioning (validated on construction)."""

    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 128
    channel_mult: tuple = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_levels: tuple = (1,)  # levels (0 = full resolution) with attention after each ResBlock
    mid_attention: bool = True
    attention_type: str = "self"  # "self": DDPM attention block; "transformer": spatial transformer
    num_heads: Optional[int | tuple] = None  # heads per attention layer, or one count per level ...
    head_channels: Optional[int | tuple] = None  # ... or channels per head (per level); neither: one head
    transformer_depth: int = 1
    context_dim: Optional[int] = None  # width of the cross-attention context (text or class tokens)
    use_linear_projection: bool = False
    num_classes: Optional[int] = None
    class_cond: str = "add"  # "add": class embedding added to the time embedding; "context": one-token context
    dropout: float = 0.0
    norm_groups: int = 32
    norm_eps: float = 1e-6
    downsample_padding: int = 0  # 0: pad (0,1,0,1) then stride-2 conv (DDPM); 1: symmetric padding (LDM, SD)
    flip_sin_to_cos: bool = False
    freq_shift: float = 1.0
    sample_size: Optional[int] = None  # the training resolution, a default for sampling

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_levels = tuple(self.attention_levels)
        for name in ("num_heads", "head_channels"):  # per-level lists arrive from JSON as lists
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))
        self.validate()

    def validate(self):
        """Range and type checks of every field (`checks.check_config`)."""
        check_config(self)

    @property
    def level_channels(self) -> list:
        return [self.model_channels * m for m in self.channel_mult]

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def heads_for(self, channels: int, level: Optional[int] = None) -> int:
        """Heads of an attention layer at `level`; None is the middle block, which takes the deepest
        level's setting (as diffusers' per-level `attention_head_dim` does)."""
        level = len(self.channel_mult) - 1 if level is None else level
        if self.num_heads is not None:
            return self.num_heads[level] if isinstance(self.num_heads, tuple) else self.num_heads
        if self.head_channels is not None:
            width = self.head_channels[level] if isinstance(self.head_channels, tuple) else self.head_channels
            return max(1, channels // width)
        return 1

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        return config_from_dict(cls, d)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32, as openaimodel does, so half precision stays finite. The
    parameters are cast with the input: CPU kernels refuse float32 input with half weights."""

    def forward(self, x):
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), in both codebases' conventions."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], -1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimeEmbedding(nn.Module):
    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.linear_1 = Linear(channels, dim)
        self.linear_2 = Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


# Every block below takes (h, emb, context): one signature lets a layer be a plain loop.

class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, eps: float, dropout: float):
        super().__init__()
        self.norm1 = GroupNorm32(groups, in_ch, eps)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = Linear(emb_dim, out_ch)
        self.norm2 = GroupNorm32(groups, out_ch, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, emb, context=None):
        # In place where it is free: at high resolution a shallow step is memory-bound, and every
        # fresh activation costs page faults. Residual adds are always safe under autograd; SiLU
        # only without it (its backward needs its input).
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h += self.emb_proj(emb)[:, :, None, None]  # emb arrives already through SiLU
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=inplace)))
        h += x if self.shortcut is None else self.shortcut(x)
        return h


def attention(q, k, v, heads: int):
    """Multi-head scaled dot-product attention over (B, L, C) tensors."""
    q, k, v = (rearrange(z, "b l (h d) -> b h l d", h=heads) for z in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return rearrange(out, "b h l d -> b l (h d)")


class AttentionBlock(nn.Module):
    """The DDPM attention block: GroupNorm, one or more heads over all positions, residual."""

    def __init__(self, channels: int, heads: int, groups: int, eps: float):
        super().__init__()
        self.heads = heads
        self.norm = GroupNorm32(groups, channels, eps)
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        self.to_out = Linear(channels, channels)

    def forward(self, x, emb=None, context=None):
        b, c, hgt, wid = x.shape
        h = rearrange(self.norm(x), "b c h w -> b (h w) c")
        h = self.to_out(attention(self.to_q(h), self.to_k(h), self.to_v(h), self.heads))
        return x + rearrange(h, "b (h w) c -> b c h w", h=hgt, w=wid)


class PreparedContext(NamedTuple):
    """A constant cross-attention context with every layer's keys and values projected once
    (`UNet.prepare_context`), so that sampling steps skip those projections."""

    tokens: torch.Tensor  # (B, L, D)
    keys_values: tuple  # ((k, v), ...), each (B, L, C), one pair per cross-attention layer


class CrossAttention(nn.Module):
    """Multi-head attention of a transformer block; cross-attention when context_dim is given."""

    def __init__(self, dim: int, heads: int, context_dim: Optional[int] = None):
        super().__init__()
        self.heads = heads
        self.kv_index: Optional[int] = None  # this layer's entry in a PreparedContext (cross-attention only)
        kv_dim = context_dim or dim
        self.to_q = Linear(dim, dim, bias=False)
        self.to_k = Linear(kv_dim, dim, bias=False)
        self.to_v = Linear(kv_dim, dim, bias=False)
        self.to_out = Linear(dim, dim)

    def forward(self, x, context=None):
        if isinstance(context, PreparedContext):
            k, v = context.keys_values[self.kv_index]
        else:
            kv = x if context is None else context
            k, v = self.to_k(kv), self.to_v(kv)
        return self.to_out(attention(self.to_q(x), k, v, self.heads))


class GEGLU(nn.Module):
    """Gated-GELU feed-forward: proj to 2x the hidden width, gate one half with GELU of the other."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj = Linear(dim, dim * mult * 2)
        self.out = Linear(dim * mult, dim)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: Optional[int]):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, heads, context_dim)  # self-attention again when there is no context
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLU(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Norm, project to tokens, transformer blocks with cross-attention to the context, project back."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: Optional[int], groups: int,
                 linear_projection: bool):
        super().__init__()
        self.norm = GroupNorm32(groups, channels, 1e-6)
        self.linear_projection = linear_projection
        proj = (lambda: Linear(channels, channels)) if linear_projection else (lambda: Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.blocks = nn.ModuleList(TransformerBlock(channels, heads, context_dim) for _ in range(depth))
        self.proj_out = proj()

    def forward(self, x, emb=None, context=None):
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        if self.linear_projection:
            h = self.proj_in(rearrange(h, "b c h w -> b (h w) c"))
        else:
            h = rearrange(self.proj_in(h), "b c h w -> b (h w) c")
        for block in self.blocks:
            h = block(h, context)
        if self.linear_projection:
            h = rearrange(self.proj_out(h), "b (h w) c -> b c h w", h=hgt, w=wid)
        else:
            h = self.proj_out(rearrange(h, "b (h w) c -> b c h w", h=hgt, w=wid))  # a channels-last view
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.asymmetric = padding == 0
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x, emb=None, context=None):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb=None, context=None, size=None):
        """Nearest 2x, or to `size`, the next skip's, where an odd size was rounded going down
        (as diffusers' `forward_upsample_size`)."""
        if size is None or tuple(size) == (2 * x.shape[2], 2 * x.shape[3]):
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class InputConv(Conv2d):
    def forward(self, x, emb=None, context=None):
        return super().forward(x)


class Layer(nn.ModuleList):
    """One entry of input_blocks / middle_block / output_blocks: its blocks applied in order."""

    def forward(self, h, emb, context, size=None):
        for block in self:
            h = block(h, emb, context, size) if isinstance(block, Upsample) else block(h, emb, context)
        return h


class Control:
    """Conditioning that also steers the skips: `cond` is the U-Net's own, and `start(x, t)` returns
    the step's steering state (minidiff.controlnet.Controlled is the one kind, a ControlNet's hints).

    The state offers `steer(skips) -> (state, skips)`, which adds residuals to the next skips the
    encoder made, and `steer_middle(h)`; the primitives call them only as deep as they run, so a
    shallow step steers only the skips it reads."""

    def check(self, x):
        raise NotImplementedError

    def with_cond(self, cond) -> "Control":
        raise NotImplementedError

    def start(self, x, t):
        raise NotImplementedError


@dataclass
class _Cond:
    emb: torch.Tensor
    context: Optional[torch.Tensor]
    control: object = None  # a Control's steering state for this step, or None


class UNet(Denoiser):
    # Input sizes need be multiples of this only: stride-2 convs round odd sizes and upsampling meets
    # each skip's size (a network without the attribute is held to its downsample_factor).
    input_multiple = 1

    def __init__(self, config: UNetConfig, *, decoder: bool = True):
        """`decoder=False` builds only the embeddings, input_blocks and middle_block (a ControlNet's copy)."""
        super().__init__()
        self.config = cfg = config
        emb_dim, groups, eps = cfg.time_embed_dim, cfg.norm_groups, cfg.norm_eps
        self.time_embed = TimeEmbedding(cfg.model_channels, emb_dim)
        self.class_embed = None
        if cfg.num_classes is not None:
            width = emb_dim if cfg.class_cond == "add" else cfg.context_dim
            self.class_embed = nn.Embedding(cfg.num_classes, width)

        def attn(ch, level=None):
            heads = cfg.heads_for(ch, level)
            if cfg.attention_type == "self":
                return AttentionBlock(ch, heads, groups, eps)
            return SpatialTransformer(ch, heads, cfg.transformer_depth, cfg.context_dim, groups,
                                      cfg.use_linear_projection)

        def res(i, o):
            return ResBlock(i, o, emb_dim, groups, eps, cfg.dropout)

        levels = cfg.level_channels
        self.input_blocks = nn.ModuleList([Layer([InputConv(cfg.in_channels, levels[0], 3, padding=1)])])
        skip_channels = [levels[0]]
        ch = levels[0]
        for level, out_ch in enumerate(levels):
            for _ in range(cfg.num_res_blocks):
                blocks = [res(ch, out_ch)]
                ch = out_ch
                if level in cfg.attention_levels:
                    blocks.append(attn(ch, level))
                self.input_blocks.append(Layer(blocks))
                skip_channels.append(ch)
            if level != len(levels) - 1:
                self.input_blocks.append(Layer([Downsample(ch, cfg.downsample_padding)]))
                skip_channels.append(ch)

        self.skip_channels = tuple(skip_channels)  # one per input block, in order
        self.middle_block = Layer([res(ch, ch)] + ([attn(ch)] if cfg.mid_attention else []) + [res(ch, ch)])
        if decoder:
            self._build_decoder(res, attn, ch)
        for i, layer in enumerate(self._cross_attention_layers()):
            layer.kv_index = i
        # Activations run channels-last (NHWC): oneDNN and cuDNN convolutions skip their layout
        # reorders, and a transformer's (B, C, H, W) -> (B, HW, C) becomes a view. Weights keep
        # this layout through load_state_dict; files are written contiguous as usual.
        self.to(memory_format=torch.channels_last)

    def _build_decoder(self, res, attn, ch):
        cfg, levels, skip_channels = self.config, self.config.level_channels, list(self.skip_channels)
        groups, eps = cfg.norm_groups, cfg.norm_eps
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(levels))):
            out_ch = levels[level]
            for i in range(cfg.num_res_blocks + 1):
                blocks = [res(ch + skip_channels.pop(), out_ch)]
                ch = out_ch
                if level in cfg.attention_levels:
                    blocks.append(attn(ch, level))
                if level != 0 and i == cfg.num_res_blocks:
                    blocks.append(Upsample(ch))
                self.output_blocks.append(Layer(blocks))

        self.out_norm = GroupNorm32(groups, ch, eps)
        self.out_conv = Conv2d(ch, cfg.out_channels, 3, padding=1)

    @property
    def num_branches(self) -> int:
        """Valid cache branches are 0 .. num_branches - 1 (one per skip connection)."""
        return len(self.input_blocks)

    def skip_shapes(self, height: int, width: int) -> list:
        """(C, H, W) of every skip connection for an input of the given size."""
        shapes = []
        for layer, ch in zip(self.input_blocks, self.skip_channels):
            last = layer[-1]
            if isinstance(last, Downsample):  # a stride-2 3x3 conv: odd sizes round up (padding 1) or down
                height, width = ((n + 1) // 2 if not last.asymmetric else n // 2 for n in (height, width))
            shapes.append((ch, height, width))
        return shapes

    def feature_shapes(self, height: int, width: int) -> list:
        """What one step holds at its peak: every skip connection (all alive when decoding starts)."""
        return self.skip_shapes(height, width)

    def cache_shape(self, height: int, width: int, branch: int) -> tuple:
        """(C, H, W) of the decoder state entering output_blocks[-1 - branch], which a shallow step reuses."""
        skip_channels, h, w = self.skip_shapes(height, width)[branch]
        return self.output_blocks[-1 - branch][0].conv1.in_channels - skip_channels, h, w  # h is cat with the skip

    # -- recorder names -------------------------------------------------------------------------
    # enc.i is the output of input_blocks[i] (skip i), mid the bottleneck, dec.i the output of
    # output_blocks[i]. A shallow step at branch b reuses the state entering output_blocks[-1 - b]:
    # the output of dec.{n - 2 - b}, or of mid for the deepest branch.

    def layer_names(self) -> list:
        """Recorder names in depth order: enc.0 .. enc.n-1, mid, dec.0 .. dec.n-1."""
        return ([f"enc.{i}" for i in range(len(self.input_blocks))] + ["mid"]
                + [f"dec.{i}" for i in range(len(self.output_blocks))])

    def cached_layer(self, branch: int) -> str:
        """The layer whose output a shallow step at `branch` reuses (what FeatureCache.hidden holds)."""
        self.check_branch(branch)
        i = len(self.output_blocks) - 2 - branch
        return "mid" if i < 0 else f"dec.{i}"

    def layer_role(self, name: str) -> str:
        """What a layer is in DeepCache's terms, for tables."""
        n = len(self.output_blocks)
        if name == "mid":
            return f"bottleneck, cached at branch {n - 1}"
        kind, i = name.split(".")
        if kind == "enc":
            return f"skip {i}"
        consumes = f"consumes skip {n - 1 - int(i)}"
        return consumes if int(i) == n - 1 else f"{consumes}, cached at branch {n - 2 - int(i)}"

    # -- conditioning ---------------------------------------------------------------------------

    def _cross_attention_layers(self) -> list:
        return [m.attn2 for m in self.modules() if isinstance(m, TransformerBlock) and self.config.context_dim]

    @torch.no_grad()
    def prepare_context(self, context: torch.Tensor) -> PreparedContext:
        """Project a (B, L, context_dim) context to every cross-attention layer's keys and values once.

        The text context is the same at every step of a sampling run, so its projections are too;
        the result goes wherever `cond` goes, with the same numbers as the context itself."""
        if self.config.num_classes is not None:
            raise ValueError("this U-Net is class-conditional: its context comes from the class labels")
        self._check_context(context, None)
        context = context.to(self.time_embed.linear_1.weight.dtype)
        return PreparedContext(context, tuple((m.to_k(context), m.to_v(context))
                                              for m in self._cross_attention_layers()))

    def _check_context(self, cond, batch: Optional[int]):
        cfg = self.config
        tokens = cond.tokens if isinstance(cond, PreparedContext) else cond
        if tokens is None or not torch.is_tensor(tokens) or tokens.ndim != 3 or tokens.shape[-1] != cfg.context_dim \
                or tokens.shape[0] != (batch or tokens.shape[0]):
            got = None if tokens is None else tuple(getattr(tokens, "shape", ()))
            raise ValueError(f"this U-Net needs a context of shape ({batch or 'B'}, L, {cfg.context_dim}) as cond, "
                             f"got {got}")

    def _check_cond(self, x: torch.Tensor, t, cond) -> tuple:
        """(timesteps as a (B,) tensor, checked conditioning): the checks run outside the compiled paths."""
        cfg = self.config
        if isinstance(cond, Control):  # the U-Net's own conditioning inside, checked as usual
            cond.check(x)
            t, inner = self._check_cond(x, t, cond.cond)
            return t, cond.with_cond(inner)
        t = batch_timesteps(t, x)
        if cfg.num_classes is not None:
            return t, self._check_labels(cond, x.shape[0])
        if cfg.context_dim is not None:
            self._check_context(cond, x.shape[0])
        elif cond is not None:
            raise ValueError("this U-Net is unconditional: pass cond=None")
        return t, cond

    def embed(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> _Cond:
        """Time (+ class) embedding and cross-attention context for a checked batch; once per call."""
        cfg = self.config
        control = None
        if isinstance(cond, Control):
            control, cond = cond.start(x, t), cond.cond
        emb = self.time_embed(timestep_embedding(t, cfg.model_channels, cfg.flip_sin_to_cos, cfg.freq_shift)
                              .to(x.dtype))
        context = None
        if cfg.num_classes is not None:
            if cfg.class_cond == "add":
                emb = emb + self.class_embed(cond).to(emb.dtype)
            else:
                context = self.class_embed(cond)[:, None, :].to(x.dtype)  # (B, 1, D)
        elif cfg.context_dim is not None:
            context = cond if isinstance(cond, PreparedContext) else cond.to(x.dtype)
        return _Cond(F.silu(emb), context, control)  # every consumer of emb applies SiLU first

    def _check_labels(self, labels, batch: int) -> torch.Tensor:
        return check_labels(labels, batch, self.config.num_classes, self.time_embed.linear_1.weight.device, "U-Net")

    # -- the primitives (minidiff.denoiser), unchecked --------------------------------------------

    def _check_input(self, x):
        f = self.config.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"x must have shape (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] < f or x.shape[3] < f:  # any size works (upsampling meets each skip's size); none below f
            raise ValueError(f"image size {x.shape[2]}x{x.shape[3]} is smaller than {f}, the network's total "
                             f"downsampling; use at least {f}x{f}")

    def _encode(self, h, c: _Cond, layers, start: int = 0):
        skips = []
        for i, layer in enumerate(layers, start):
            h = layer(h, c.emb, c.context)
            skips.append(h)
            if self.recorder is not None:
                self.recorder(f"enc.{i}", h)
        return h, skips

    def _decode(self, h, skips, c: _Cond, start: int, cache_at: Optional[int] = None):
        """Run output_blocks[start:], consuming `skips` from the end; returns (out, state at cache_at)."""
        cached = None
        for i in range(start, len(self.output_blocks)):
            if i == cache_at:
                cached = h
            h = torch.cat([h, skips.pop()], dim=1)
            h = self.output_blocks[i](h, c.emb, c.context, skips[-1].shape[2:] if skips else None)
            if self.recorder is not None:
                self.recorder(f"dec.{i}", h)
        return self.out_conv(F.silu(self.out_norm(h), inplace=not torch.is_grad_enabled())).contiguous(), cached

    def _cut(self, x, t, cond, branch) -> CutState:
        """input_blocks[:branch + 1]; h is the last of their skips."""
        x = x.contiguous(memory_format=torch.channels_last)
        c = self.embed(x, t, cond)
        h, skips = self._encode(x, c, self.input_blocks[: branch + 1])
        if c.control is not None:  # a ControlNet steers only the skips this step reads (minidiff.controlnet)
            c.control, skips = c.control.steer(skips)
        return CutState(branch, h, skips, c)

    def _rest(self, state: CutState, keep: bool):
        """The rest of the encoder, the middle and the whole decoder; keeps the state entering
        output_blocks[-1 - branch] when `keep`."""
        c = state.cond
        h, deeper = self._encode(state.h, c, self.input_blocks[state.branch + 1:], start=state.branch + 1)
        h = self.middle_block(h, c.emb, c.context)
        if self.recorder is not None:
            self.recorder("mid", h)
        if c.control is not None:  # and, on a full step, the deeper skips and the middle
            control, deeper = c.control.steer(deeper)
            h = control.steer_middle(h)
        cache_at = len(self.output_blocks) - 1 - state.branch if keep else None
        return self._decode(h, state.skips + deeper, c, 0, cache_at)

    def _from_cache(self, state: CutState, hidden):
        """output_blocks[-1 - branch:] from a deep feature, with the cut's skips."""
        return self._decode(hidden, list(state.skips), state.cond, len(self.output_blocks) - 1 - state.branch)[0]
