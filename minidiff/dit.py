"""A small Diffusion Transformer (DiT: patchify, adaLN-Zero blocks), with the caching contract (minidiff.denoiser).

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
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import config_from_dict, config_to_dict
from .checks import batch_timesteps, check_labels
from .denoiser import CutState, Denoiser
from .packing import Conv2d, Linear
from .unet import CrossAttention, TimeEmbedding, timestep_embedding


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


@dataclass
class _Cond:
    emb: torch.Tensor  # SiLU(time + class embedding), (B, D)
    grid: tuple  # (rows, columns) of patches, to put the tokens back into an image


class DiT(Denoiser):
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

    # -- sizes --------------------------------------------------------------------------------------

    @property
    def input_multiple(self) -> int:
        """Input sizes must be whole patches."""
        return self.config.patch_size

    def cache_shape(self, height: int, width: int, branch: int) -> tuple:
        """The cached residual, as a (D, H/p, W/p) map whatever the branch."""
        p = self.config.patch_size
        return self.config.hidden_size, height // p, width // p

    def feature_shapes(self, height: int, width: int) -> list:
        """What one step holds at its peak: every block's input tokens (a full step keeps them for the
        residual), the cached residual, and the MLP's widened tokens."""
        d, p = self.config.hidden_size, self.config.patch_size
        tokens = (d, height // p, width // p)
        return [tokens] * (self.config.depth + 2) + [(d * self.config.mlp_ratio, height // p, width // p)]

    # -- analysis names ---------------------------------------------------------------------------

    def layer_names(self) -> list:
        """Recorder names in depth order, then the cached residuals."""
        return [f"block.{i}" for i in range(self.config.depth)] + [f"cache.{b}" for b in range(self.num_branches)]

    def cached_layer(self, branch: int) -> str:
        self.check_branch(branch)
        return f"cache.{branch}"

    def layer_role(self, name: str) -> str:
        kind, i = name.split(".")
        if kind == "cache":
            return f"residual of blocks {int(i) + 1}-{self.config.depth - 2 - int(i)}, cached at branch {i}"
        live = min(int(i), self.config.depth - 1 - int(i))
        return "live at every branch" if live == 0 else f"live at branch >= {live}"

    # -- conditioning -----------------------------------------------------------------------------

    def _check_cond(self, x: torch.Tensor, t, cond) -> tuple:
        """(timesteps as a (B,) tensor, checked labels): the checks run outside the compiled paths."""
        t = batch_timesteps(t, x)
        if self.config.num_classes is None:
            if cond is not None:
                raise ValueError("this DiT is unconditional: pass cond=None")
            return t, None
        return t, check_labels(cond, x.shape[0], self.config.num_classes, self.patch_embed.weight.device, "DiT")

    def embed(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """SiLU(time + class embedding), (B, D), for checked timesteps and labels; once per call."""
        cfg = self.config
        emb = self.time_embed(timestep_embedding(batch_timesteps(t, x), cfg.hidden_size, True, 0.0).to(x.dtype))
        if cfg.num_classes is None:
            return F.silu(emb)
        return F.silu(emb + self.class_embed(cond).to(emb.dtype))

    # -- the primitives (minidiff.denoiser), unchecked --------------------------------------------

    def _check_input(self, x):
        p, c = self.config.patch_size, self.config.in_channels
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"x must have shape (B, {c}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"image size {x.shape[2]}x{x.shape[3]} is not divisible by the patch size {p}; use a "
                             f"multiple of {p}")

    def _tokens(self, x):
        """(B, C, H, W) -> (B, HW/p^2, D) patch tokens with positions added."""
        h = rearrange(self.patch_embed(x), "b d h w -> b (h w) d")
        grid = (x.shape[2] // self.config.patch_size, x.shape[3] // self.config.patch_size)
        return h + positions_2d(*grid, self.config.hidden_size).to(h)

    def _image(self, h, emb, height: int):
        """Tokens -> (B, C_out, H, W): the final adaLN layer, then patches back into place."""
        p = self.config.patch_size
        return rearrange(self.final(h, emb), "b (h w) (p q c) -> b c (h p) (w q)", h=height // p, p=p, q=p)

    def _run(self, h, emb, first: int, last: int, rows: int):
        """Blocks first .. last - 1, recording each output; returns the list of inputs and the final tokens."""
        inputs = []
        for i in range(first, last):
            inputs.append(h)
            h = self.blocks[i](h, emb)
            if self.recorder is not None:
                self.recorder(f"block.{i}", self._as_map(h, rows))
        return inputs, h

    @staticmethod
    def _as_map(h, rows: int):
        """(B, HW, D) tokens -> a (B, D, H, W) map (a view)."""
        return rearrange(h, "b (h w) d -> b d h w", h=rows)

    def _cut(self, x, t, cond, branch) -> CutState:
        """Blocks 0..branch; h is h_{branch+1}, skips the block inputs h_0..h_branch."""
        c = _Cond(self.embed(x, t, cond), (x.shape[2] // self.config.patch_size, x.shape[3] // self.config.patch_size))
        inputs, h = self._run(self._tokens(x), c.emb, 0, branch + 1, c.grid[0])
        return CutState(branch, h, inputs, c)

    def _rest(self, state: CutState, keep: bool):
        """The blocks after the cut; keeps the residual the middle blocks add, h_{L-1-b} - h_{b+1}, when `keep`."""
        c, b, depth = state.cond, state.branch, self.config.depth
        later, h = self._run(state.h, c.emb, b + 1, depth, c.grid[0])
        inputs = state.skips + later  # inputs[k] = h_k
        if self.recorder is not None:
            for branch in range(self.num_branches):
                self.recorder(f"cache.{branch}", self._as_map(inputs[depth - 1 - branch] - inputs[branch + 1],
                                                              c.grid[0]))
        hidden = self._as_map(inputs[depth - 1 - b] - inputs[b + 1], c.grid[0]) if keep else None
        return self._image(h, c.emb, c.grid[0] * self.config.patch_size), hidden

    def _from_cache(self, state: CutState, hidden):
        """The last b + 1 blocks from h_{b+1} + the cached residual (= h_{L-1-b} on the full step)."""
        c, b, depth = state.cond, state.branch, self.config.depth
        h = state.h + rearrange(hidden, "b d h w -> b (h w) d")
        _, h = self._run(h, c.emb, depth - 1 - b, depth, c.grid[0])
        return self._image(h, c.emb, c.grid[0] * self.config.patch_size)
