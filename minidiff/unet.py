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
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import config_from_dict, config_to_dict


@dataclass
class UNetConfig:
    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 128
    channel_mult: tuple = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_levels: tuple = (1,)  # levels (0 = full resolution) with attention after each ResBlock
    mid_attention: bool = True
    attention_type: str = "self"  # "self": DDPM attention block; "transformer": spatial transformer
    num_heads: Optional[int] = None  # heads per attention layer ...
    head_channels: Optional[int] = None  # ... or channels per head; neither: one head
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
        self.validate()

    def validate(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(f"UNetConfig: {msg}")

        limits = {"in_channels": 1024, "out_channels": 1024, "model_channels": 65_536, "num_res_blocks": 64,
                  "norm_groups": 1024, "transformer_depth": 64}
        for name, top in limits.items():
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= top,
                 f"{name} must be an int in [1, {top}], got {value!r}")
        need(len(self.channel_mult) >= 1 and all(isinstance(m, int) and 1 <= m <= 1024 for m in self.channel_mult),
             f"channel_mult must be a non-empty list of positive ints, got {list(self.channel_mult)}")
        need(len(self.channel_mult) <= 12, f"channel_mult has {len(self.channel_mult)} levels; at most 12 are supported")
        need(all(isinstance(lv, int) and 0 <= lv < len(self.channel_mult) for lv in self.attention_levels),
             f"attention_levels must name levels 0..{len(self.channel_mult) - 1}, got {list(self.attention_levels)}")
        need(self.attention_type in ("self", "transformer"),
             f"attention_type must be 'self' or 'transformer', got {self.attention_type!r}")
        need(self.class_cond in ("add", "context"), f"class_cond must be 'add' or 'context', got {self.class_cond!r}")
        need(self.num_classes is None or (isinstance(self.num_classes, int) and 1 <= self.num_classes <= 10_000_000),
             f"num_classes must be None or a positive int, got {self.num_classes!r}")
        need(self.num_heads is None or (isinstance(self.num_heads, int) and self.num_heads >= 1),
             f"num_heads must be None or a positive int, got {self.num_heads!r}")
        need(self.head_channels is None or (isinstance(self.head_channels, int) and self.head_channels >= 1),
             f"head_channels must be None or a positive int, got {self.head_channels!r}")
        need(self.context_dim is None or (isinstance(self.context_dim, int) and self.context_dim >= 1),
             f"context_dim must be None or a positive int, got {self.context_dim!r}")
        need(self.context_dim is None or self.attention_type == "transformer",
             "context_dim needs attention_type 'transformer' (cross-attention lives in spatial transformers)")
        need(not (self.class_cond == "context" and self.num_classes and self.context_dim is None),
             "class_cond 'context' needs context_dim (the width of the class token)")
        number = (int, float)
        need(isinstance(self.dropout, number) and 0.0 <= self.dropout < 1.0,
             f"dropout must be a number in [0, 1), got {self.dropout!r}")
        need(isinstance(self.norm_eps, number) and 0.0 < self.norm_eps < 1.0,
             f"norm_eps must be a number in (0, 1), got {self.norm_eps!r}")
        need(not isinstance(self.downsample_padding, bool) and self.downsample_padding in (0, 1),
             f"downsample_padding must be 0 or 1, got {self.downsample_padding!r}")
        for name in ("mid_attention", "flip_sin_to_cos", "use_linear_projection"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        need(isinstance(self.freq_shift, (int, float)) and not isinstance(self.freq_shift, bool)
             and math.isfinite(self.freq_shift) and 0 <= self.freq_shift < self.model_channels // 2,
             f"freq_shift must be a number in [0, {self.model_channels // 2}), got {self.freq_shift!r}")
        need(self.sample_size is None or (isinstance(self.sample_size, int) and not isinstance(self.sample_size, bool)
                                          and 1 <= self.sample_size <= 16384),
             f"sample_size must be None or an int in [1, 16384], got {self.sample_size!r}")
        need(not (self.num_classes and self.class_cond == "add" and self.context_dim is not None),
             "class_cond 'add' with context_dim would need a text context besides the labels, which minidiff does "
             "not support; use class_cond 'context' (the class token is the context) or drop context_dim")
        widest = self.model_channels * max(self.channel_mult)
        need(widest <= 65_536, f"the widest level has {widest} channels (model_channels x max(channel_mult)); at "
                               "most 65536 are supported")
        for ch in self.level_channels:
            need(ch % self.norm_groups == 0, f"channels {ch} are not divisible by norm_groups {self.norm_groups}")
            heads = self.heads_for(ch)
            need(ch % heads == 0, f"{ch} channels cannot be split into {heads} heads")

    @property
    def level_channels(self) -> list:
        return [self.model_channels * m for m in self.channel_mult]

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def heads_for(self, channels: int) -> int:
        if self.num_heads is not None:
            return self.num_heads
        if self.head_channels is not None:
            return max(1, channels // self.head_channels)
        return 1

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        return config_from_dict(cls, d)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32, as openaimodel does, so half precision stays finite."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


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
        self.linear_1 = nn.Linear(channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


# Every block below takes (h, emb, context): one signature lets a layer be a plain loop.

class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, eps: float, dropout: float):
        super().__init__()
        self.norm1 = GroupNorm32(groups, in_ch, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = GroupNorm32(groups, out_ch, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, emb, context=None):
        # In place where it is free: at high resolution a shallow step is memory-bound, and every
        # fresh activation costs page faults. Residual adds are always safe under autograd; SiLU
        # only without it (its backward needs its input).
        fresh = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=fresh))
        h += self.emb_proj(emb)[:, :, None, None]  # emb arrives already through SiLU
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=fresh)))
        h += x if self.shortcut is None else self.shortcut(x)
        return h


def attention(q, k, v, heads: int):
    """Multi-head scaled dot-product attention over (B, L, C) tensors."""
    q, k, v = (rearrange(z, "b l (h d) -> b h l d", h=heads) for z in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return rearrange(out, "b h l d -> b l (h d)")


class SelfAttention(nn.Module):
    """The DDPM attention block: GroupNorm, one or more heads over all positions, residual."""

    def __init__(self, channels: int, heads: int, groups: int, eps: float):
        super().__init__()
        self.heads = heads
        self.norm = GroupNorm32(groups, channels, eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

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


class Attention(nn.Module):
    """Multi-head attention of a transformer block; cross-attention when context_dim is given."""

    def __init__(self, dim: int, heads: int, context_dim: Optional[int] = None):
        super().__init__()
        self.heads = heads
        self.kv_index: Optional[int] = None  # this layer's entry in a PreparedContext (cross-attention only)
        kv_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

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
        self.proj = nn.Linear(dim, dim * mult * 2)
        self.out = nn.Linear(dim * mult, dim)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: Optional[int]):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)  # self-attention again when there is no context
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
        proj = (lambda: nn.Linear(channels, channels)) if linear_projection else (lambda: nn.Conv2d(channels, channels, 1))
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
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x, emb=None, context=None):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb=None, context=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class InputConv(nn.Conv2d):
    def forward(self, x, emb=None, context=None):
        return super().forward(x)


class Layer(nn.ModuleList):
    """One entry of input_blocks / middle_block / output_blocks: its blocks applied in order."""

    def forward(self, h, emb, context):
        for block in self:
            h = block(h, emb, context)
        return h


@dataclass
class FeatureCache:
    """The decoder state entering output_blocks[-1 - branch], kept from the last full step."""

    branch: int
    hidden: torch.Tensor


@dataclass
class _Cond:
    emb: torch.Tensor
    context: Optional[torch.Tensor]


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        emb_dim, groups, eps = cfg.time_embed_dim, cfg.norm_groups, cfg.norm_eps
        self.time_embed = TimeEmbedding(cfg.model_channels, emb_dim)
        self.class_embed = None
        if cfg.num_classes is not None:
            width = emb_dim if cfg.class_cond == "add" else cfg.context_dim
            self.class_embed = nn.Embedding(cfg.num_classes, width)

        def attn(ch):
            if cfg.attention_type == "self":
                return SelfAttention(ch, cfg.heads_for(ch), groups, eps)
            return SpatialTransformer(ch, cfg.heads_for(ch), cfg.transformer_depth, cfg.context_dim, groups,
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
                    blocks.append(attn(ch))
                self.input_blocks.append(Layer(blocks))
                skip_channels.append(ch)
            if level != len(levels) - 1:
                self.input_blocks.append(Layer([Downsample(ch, cfg.downsample_padding)]))
                skip_channels.append(ch)

        self.middle_block = Layer([res(ch, ch)] + ([attn(ch)] if cfg.mid_attention else []) + [res(ch, ch)])

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(levels))):
            out_ch = levels[level]
            for i in range(cfg.num_res_blocks + 1):
                blocks = [res(ch + skip_channels.pop(), out_ch)]
                ch = out_ch
                if level in cfg.attention_levels:
                    blocks.append(attn(ch))
                if level != 0 and i == cfg.num_res_blocks:
                    blocks.append(Upsample(ch))
                self.output_blocks.append(Layer(blocks))

        self.out_norm = GroupNorm32(groups, ch, eps)
        self.out_conv = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        for i, layer in enumerate(self._cross_attention_layers()):
            layer.kv_index = i
        # Activations run channels-last (NHWC): oneDNN and cuDNN convolutions skip their layout
        # reorders, and a transformer's (B, C, H, W) -> (B, HW, C) becomes a view. Weights keep
        # this layout through load_state_dict; files are written contiguous as usual.
        self.to(memory_format=torch.channels_last)
        # Called as recorder(name, tensor) for every layer output when set (see minidiff.analysis).
        self.recorder: Optional[Callable[[str, torch.Tensor], None]] = None

    @property
    def num_branches(self) -> int:
        """Valid cache branches are 0 .. num_branches - 1 (one per skip connection)."""
        return len(self.input_blocks)

    def skip_shapes(self, height: int, width: int) -> list:
        """(C, H, W) of every skip connection for an input of the given size."""
        shapes, f = [], 1
        for layer in self.input_blocks:
            last = layer[-1]
            if isinstance(last, Downsample):
                f *= 2
            ch = last.out_channels if isinstance(last, InputConv) else _channels_of(last)
            shapes.append((ch, height // f, width // f))
        return shapes

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
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        elif t.shape != (x.shape[0],):
            raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
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
        return _Cond(F.silu(emb), context)  # every consumer of emb applies SiLU first

    def _check_labels(self, labels, batch: int) -> torch.Tensor:
        n = self.config.num_classes
        if labels is None:
            raise ValueError(f"this U-Net is class-conditional: pass class labels in [0, {n - 1}] as cond")
        labels = torch.as_tensor(labels, device=self.time_embed.linear_1.weight.device)
        if labels.ndim == 0:
            labels = labels.expand(batch)
        if labels.dtype not in (torch.int64, torch.int32) or labels.shape != (batch,):
            raise ValueError(f"class labels must be {batch} integers, got dtype {labels.dtype} shape "
                             f"{tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
            raise ValueError(f"class labels must lie in [0, {n - 1}], got {labels.tolist()}")
        return labels.long()

    # -- the three paths ------------------------------------------------------------------------

    def _check_input(self, x):
        f = self.config.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"x must have shape (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image size {x.shape[2]}x{x.shape[3]} is not divisible by {f}, the network's "
                             f"total downsampling; use a multiple of {f}")

    def _check_branch(self, branch: int):
        if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < self.num_branches:
            raise ValueError(f"cache branch must be an int in [0, {self.num_branches - 1}], got {branch!r}")

    def _encode(self, h, c: _Cond, layers):
        skips = []
        for i, layer in enumerate(layers):
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
            h = self.output_blocks[i](torch.cat([h, skips.pop()], dim=1), c.emb, c.context)
            if self.recorder is not None:
                self.recorder(f"dec.{i}", h)
        return self.out_conv(F.silu(self.out_norm(h), inplace=not torch.is_grad_enabled())).contiguous(), cached

    def _full(self, x, t, cond, cache_at):
        x = x.contiguous(memory_format=torch.channels_last)
        c = self.embed(x, t, cond)
        h, skips = self._encode(x, c, self.input_blocks)
        h = self.middle_block(h, c.emb, c.context)
        if self.recorder is not None:
            self.recorder("mid", h)
        return self._decode(h, skips, c, 0, cache_at)

    def forward(self, x, t, cond=None):
        """The whole network, nothing kept."""
        self._check_input(x)
        t, cond = self._check_cond(x, t, cond)
        return self._full(x, t, cond, None)[0]

    def forward_full(self, x, t, cond=None, *, branch: int = 0):
        """The whole network; also returns the cache a later shallow step at `branch` reuses."""
        self._check_branch(branch)
        self._check_input(x)
        t, cond = self._check_cond(x, t, cond)
        out, hidden = self._full(x, t, cond, len(self.output_blocks) - 1 - branch)
        return out, FeatureCache(branch, hidden)

    def forward_shallow(self, x, t, cond=None, *, cache: FeatureCache):
        """Only the skip branch: input_blocks[:b+1] and output_blocks[-1-b:], reusing the cached state."""
        if not isinstance(cache, FeatureCache):
            raise TypeError(f"cache must be the FeatureCache returned by forward_full, got {type(cache).__name__}")
        self._check_branch(cache.branch)
        self._check_input(x)
        if cache.hidden.shape[0] != x.shape[0]:
            raise ValueError(f"the cache was made for batch {cache.hidden.shape[0]}, this step has batch {x.shape[0]}")
        t, cond = self._check_cond(x, t, cond)
        return self._shallow(x, t, cond, cache.hidden, cache.branch)

    def _shallow(self, x, t, cond, hidden, branch):
        x = x.contiguous(memory_format=torch.channels_last)
        c = self.embed(x, t, cond)
        _, skips = self._encode(x, c, self.input_blocks[: branch + 1])
        return self._decode(hidden, skips, c, len(self.output_blocks) - 1 - branch)[0]

    def compile(self, **kwargs) -> "UNet":
        """torch.compile the full and the shallow path (each branch compiles once, on first use).

        The batch dimension is compiled dynamic, so a guided run (2B) and an unguided one (B), or a
        smaller last batch, reuse one graph; batch 1 is the exception, compiled once on its own.
        """
        self._full = _batch_dynamic(torch.compile(self._full, **kwargs))
        self._shallow = _batch_dynamic(torch.compile(self._shallow, **kwargs))
        return self

    # -- cost -----------------------------------------------------------------------------------

    @torch.no_grad()
    def macs(self, x: torch.Tensor, t=500, cond=None, *, branch: int = 0) -> dict:
        """Multiply-accumulates of one full and one shallow step at `branch`, counted by running them."""
        from torch.utils.flop_counter import FlopCounterMode

        # torch's counter knows the GPU attention kernels but not the CPU one, which it counts as 0
        cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}
        counts = {}
        with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
            _, cache = self.forward_full(x, t, cond, branch=branch)
        counts["full"] = counter.get_total_flops() // 2
        with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
            self.forward_shallow(x, t, cond, cache=cache)
        counts["shallow"] = counter.get_total_flops() // 2
        return counts


def _batch_dynamic(path: Callable) -> Callable:
    """Call a compiled path with the batch dimension of every tensor argument marked dynamic."""

    def run(*args):
        for tensor in _tensors(args):
            if tensor.ndim:
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return path(*args)

    return run


def _tensors(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (tuple, list)):  # PreparedContext is a tuple too
        for item in value:
            yield from _tensors(item)


def _channels_of(block: nn.Module) -> int:
    if isinstance(block, ResBlock):
        return block.conv2.out_channels
    if isinstance(block, Downsample):
        return block.conv.out_channels
    if isinstance(block, SelfAttention):
        return block.to_out.out_features
    if isinstance(block, SpatialTransformer):
        return block.norm.num_channels
    raise TypeError(f"unexpected block {type(block).__name__}")


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of softmax(QK^T)V: two matrix products, 2 FLOPs per multiply-accumulate."""
    *batch, queries, dim = query_shape
    return 2 * math.prod(batch) * queries * key_shape[-2] * (dim + value_shape[-1])


def mac_bound(interval: int, shallow_over_full: float) -> float:
    """Best speedup of uniform caching with one full step every `interval` steps (compute only)."""
    return interval / (1 + (interval - 1) * shallow_over_full)
