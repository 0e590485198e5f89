"""A small Diffusion Transformer (DiT: patchify, adaLN-Zero blocks), with the U-Net's caching API.

The image is cut into p x p patches, each a token; a stack of `depth` identical blocks updates the
tokens, each block modulated by the time + class embedding through adaLN-Zero (LayerNorm without
affine weights, then a per-sample scale, shift and residual gate predicted from the embedding, the
gate initialised to zero so every block starts as the identity).

A DiT has no skip connections, so DeepCache's cut becomes a cut in the residual stream. Let h_k be
the tokens entering block k. A shallow step at branch b runs blocks 0..b and the last b + 1 blocks,
and replaces the blocks between by the residual they added on the last full step:
    h_{L-1-b} = h_{b+1} + (h_{L-1-b} - h_{b+1})_cached
as Learning-to-Cache and Delta-DiT cache DiT blocks. Branch 0 keeps the fewest blocks live.

Recorder names: `block.i` is the output of block i (tokens as a (B, D, H/p, W/p) map, so analysis
pools it like a U-Net feature map) and `cache.b` the residual a shallow step at branch b reuses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import config_from_dict, config_to_dict
from .checks import batch_timesteps, check_labels
from .packing import Conv2d, Linear
from .unet import CrossAttention, FeatureCache, TimeEmbedding, count_macs, timestep_embedding


@dataclass
class DiTConfig:
    in_channels: int = 1
    out_channels: int = 1
    patch_size: int = 2
    hidden_size: int = 128
    depth: int = 8
    num_heads: int = 4
    mlp_ratio: int = 4
    num_classes: Optional[int] = None  # class-conditional with this many classes (the null class included)
    sample_size: Optional[int] = None  # the training resolution, a default for sampling

    def __post_init__(self):
        self.validate()

    def validate(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(f"DiTConfig: {msg}")

        limits = {"in_channels": 1024, "out_channels": 1024, "patch_size": 64, "hidden_size": 65_536, "depth": 256,
                  "num_heads": 1024, "mlp_ratio": 64}
        for name, top in limits.items():
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= top,
                 f"{name} must be an int in [1, {top}], got {value!r}")
        need(self.depth >= 3, f"depth must be at least 3 (one cached block between two live ones), got {self.depth}")
        need(self.hidden_size % self.num_heads == 0,
             f"hidden_size {self.hidden_size} cannot be split into {self.num_heads} heads")
        need(self.hidden_size % 4 == 0, f"hidden_size must be a multiple of 4 (2-D sin-cos positions), "
                                        f"got {self.hidden_size}")
        need(self.num_classes is None or (isinstance(self.num_classes, int) and not isinstance(self.num_classes, bool)
                                          and 1 <= self.num_classes <= 10_000_000),
             f"num_classes must be None or a positive int, got {self.num_classes!r}")
        need(self.sample_size is None or (isinstance(self.sample_size, int) and not isinstance(self.sample_size, bool)
                                          and 1 <= self.sample_size <= 16384),
             f"sample_size must be None or an int in [1, 16384], got {self.sample_size!r}")

    # What Pipeline asks of any denoiser's config.
    context_dim = None

    @property
    def downsample_factor(self) -> int:
        return self.patch_size

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        return config_from_dict(cls, d)


def positions_2d(height: int, width: int, dim: int) -> torch.Tensor:
    """Fixed sin-cos position of every patch, (H*W, dim): half the channels encode the row, half the column."""
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width).reshape(-1, 1) * freqs
    cols = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width).reshape(-1, 1) * freqs
    return torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample affine of normalised tokens; (B, L, D) with (B, D) shift and scale."""
    return x * (1 + scale[:, None]) + shift[:, None]


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: int):
        super().__init__()
        self.fc1 = Linear(dim, dim * ratio)
        self.fc2 = Linear(dim * ratio, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Attention and MLP, each between an adaLN modulation and a zero-initialised residual gate."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, mlp_ratio)
        self.ada = Linear(dim, 6 * dim)  # emb -> shift, scale, gate for attention and for the MLP

    def forward(self, x, emb):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(emb).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_values: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = Linear(dim, 2 * dim)
        self.linear = Linear(dim, patch_values)

    def forward(self, x, emb):
        shift, scale = self.ada(emb).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = cfg = config
        dim, p = cfg.hidden_size, cfg.patch_size
        self.patch_embed = Conv2d(cfg.in_channels, dim, p, stride=p)
        self.time_embed = TimeEmbedding(dim, dim)
        self.class_embed = nn.Embedding(cfg.num_classes, dim) if cfg.num_classes is not None else None
        self.blocks = nn.ModuleList(DiTBlock(dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final = FinalLayer(dim, p * p * cfg.out_channels)
        self._initialize()
        # Called as recorder(name, tensor) for every block output when set (see minidiff.analysis).
        self.recorder: Optional[Callable[[str, torch.Tensor], None]] = None

    def _initialize(self):
        """DiT's init: Xavier linears, and adaLN-Zero (gates and output start at zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for linear in [block.ada for block in self.blocks] + [self.final.ada, self.final.linear]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    @property
    def num_branches(self) -> int:
        """Valid cache branches 0 .. num_branches - 1: branch b keeps 2(b + 1) blocks live, at least one cached."""
        return (self.config.depth - 1) // 2

    # -- analysis names ---------------------------------------------------------------------------

    def layer_names(self) -> list:
        """Recorder names in depth order, then the cached residuals."""
        return [f"block.{i}" for i in range(self.config.depth)] + [f"cache.{b}" for b in range(self.num_branches)]

    def cached_layer(self, branch: int) -> str:
        self._check_branch(branch)
        return f"cache.{branch}"

    def layer_role(self, name: str) -> str:
        kind, i = name.split(".")
        if kind == "cache":
            return f"residual of blocks {int(i) + 1}-{self.config.depth - 2 - int(i)}, cached at branch {i}"
        live = min(int(i), self.config.depth - 1 - int(i))
        return "live at every branch" if live == 0 else f"live at branch >= {live}"

    # -- conditioning -----------------------------------------------------------------------------

    def embed(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """SiLU(time + class embedding), (B, D); computed once per call."""
        cfg = self.config
        t = batch_timesteps(t, x)
        emb = self.time_embed(timestep_embedding(t, cfg.hidden_size, True, 0.0).to(x.dtype))
        if cfg.num_classes is None:
            if cond is not None:
                raise ValueError("this DiT is unconditional: pass cond=None")
            return F.silu(emb)
        return F.silu(emb + self.class_embed(self._check_labels(cond, x.shape[0])).to(emb.dtype))

    def _check_labels(self, labels, batch: int) -> torch.Tensor:
        return check_labels(labels, batch, self.config.num_classes, self.patch_embed.weight.device, "DiT")

    # -- the three paths --------------------------------------------------------------------------

    def _check_input(self, x):
        p, c = self.config.patch_size, self.config.in_channels
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"x must have shape (B, {c}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"image size {x.shape[2]}x{x.shape[3]} is not divisible by the patch size {p}; use a "
                             f"multiple of {p}")

    def _check_branch(self, branch: int):
        if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < self.num_branches:
            raise ValueError(f"cache branch must be an int in [0, {self.num_branches - 1}], got {branch!r}")

    def _tokens(self, x):
        """(B, C, H, W) -> (B, HW/p^2, D) patch tokens with positions added."""
        h = rearrange(self.patch_embed(x), "b d h w -> b (h w) d")
        grid = (x.shape[2] // self.config.patch_size, x.shape[3] // self.config.patch_size)
        return h + positions_2d(*grid, self.config.hidden_size).to(h)

    def _image(self, h, emb, x):
        """Tokens -> (B, C_out, H, W): the final adaLN layer, then patches back into place."""
        p = self.config.patch_size
        return rearrange(self.final(h, emb), "b (h w) (p q c) -> b c (h p) (w q)", h=x.shape[2] // p, p=p, q=p)

    def _run(self, h, emb, first: int, last: int, x):
        """Blocks first .. last - 1, recording each output; returns the list of inputs and the final tokens."""
        inputs = []
        for i in range(first, last):
            inputs.append(h)
            h = self.blocks[i](h, emb)
            if self.recorder is not None:
                self.recorder(f"block.{i}", self._as_map(h, x))
        return inputs, h

    def _as_map(self, h, x):
        p = self.config.patch_size
        return rearrange(h, "b (h w) d -> b d h w", h=x.shape[2] // p)

    def _full(self, x, t, cond, branch: Optional[int]):
        emb = self.embed(x, t, cond)
        inputs, h = self._run(self._tokens(x), emb, 0, self.config.depth, x)  # inputs[k] = h_k
        depth = self.config.depth
        if self.recorder is not None:
            for b in range(self.num_branches):
                self.recorder(f"cache.{b}", self._as_map(inputs[depth - 1 - b] - inputs[b + 1], x))
        hidden = None if branch is None else inputs[depth - 1 - branch] - inputs[branch + 1]
        return self._image(h, emb, x), hidden

    def forward(self, x, t, cond=None):
        """The whole network, nothing kept."""
        self._check_input(x)
        return self._full(x, t, cond, None)[0]

    def forward_full(self, x, t, cond=None, *, branch: int = 0):
        """The whole network; also returns the residual of the middle blocks a shallow step at `branch` reuses."""
        self._check_branch(branch)
        self._check_input(x)
        out, hidden = self._full(x, t, cond, branch)
        return out, FeatureCache(branch, self._as_map(hidden, x))

    def forward_shallow(self, x, t, cond=None, *, cache: FeatureCache):
        """Blocks 0..b and the last b + 1 blocks; the blocks between add their cached residual."""
        if not isinstance(cache, FeatureCache):
            raise TypeError(f"cache must be the FeatureCache returned by forward_full, got {type(cache).__name__}")
        self._check_branch(cache.branch)
        self._check_input(x)
        if cache.hidden.shape[0] != x.shape[0]:
            raise ValueError(f"the cache was made for batch {cache.hidden.shape[0]}, this step has batch {x.shape[0]}")
        b, depth = cache.branch, self.config.depth
        emb = self.embed(x, t, cond)
        _, h = self._run(self._tokens(x), emb, 0, b + 1, x)
        h = h + rearrange(cache.hidden, "b d h w -> b (h w) d")  # h_{b+1} + cached residual = h_{L-1-b}
        _, h = self._run(h, emb, depth - 1 - b, depth, x)
        return self._image(h, emb, x)

    @torch.no_grad()
    def macs(self, x: torch.Tensor, t=500, cond=None, *, branch: int = 0) -> dict:
        """Multiply-accumulates of one full and one shallow step at `branch`, counted by running them."""
        return count_macs(self, x, t, cond, branch)
