"""The caching contract: what every cacheable network offers, and what caching needs from it.

DeepCache cuts a denoising step in two. The layers before the cut run at every step; the deep part
after it runs only on a full step, and a shallow step reuses (or forecasts) the deep feature the
last full step left. A network offers that as three primitives:

    state = net.forward_cut(x, t, cond, branch=b)  # the layers before the cut, which every step runs
    out, cache = net.forward_rest(state)           # a full step: the deep part, keeping its feature
    out = net.forward_from_cache(state, hidden)    # a shallow step: finish from a deep feature

`branch` (0 .. num_branches - 1) says where the cut lies; branch 0 keeps the fewest layers live.
Between the cut and the choice a caller may look at `state.h`, the feature at the cut: the
adaptive schedule decides per sample from it, and runs `state.rows(i)` of a batch each way.
The two paths every caller knows are compositions of the primitives, defined once, here:

    forward_full(x, t, cond, branch=b)    = forward_rest(forward_cut(x, t, cond, branch=b))
    forward_shallow(x, t, cond, cache=c)  = forward_from_cache(forward_cut(x, t, cond, branch=c.branch), c.hidden)
    forward(x, t, cond)                   = forward_full without keeping the cache

A network subclasses `Denoiser` and writes only what is its own:

    num_branches                          how many places the cut may lie
    _check_input(x), _check_cond(x, t, cond) -> (t, cond)
                                          the checks of one call (they run outside compiled code)
    _cut(x, t, cond, branch) -> CutState  the primitives, unchecked (`compile_paths` compiles them)
    _rest(state, keep) -> (out, hidden or None), _from_cache(state, hidden) -> out
    cache_shape(height, width, branch)    (C, H, W) of the deep feature a shallow step at `branch` reuses
    feature_shapes(height, width)         (C, H, W) of what one step holds at its peak (memory estimates)
    input_multiple                        input sizes must be multiples of this
    layer_names(), cached_layer(branch), layer_role(name)
                                          recorder names (`recorder(name, tensor)`, minidiff.analysis)

and gets from it the checked public paths, `macs` (the cost of both paths, counted by running
them) and `compile_paths`. `check_denoiser` refuses, with a sentence, a network that lacks a part.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

# What a Pipeline and the caching wrapper call on a network (check_denoiser looks for each).
CONTRACT = ("num_branches", "check_branch", "forward_cut", "forward_rest", "forward_from_cache", "forward_full",
            "forward_shallow", "macs", "compile_paths", "cache_shape", "feature_shapes", "input_multiple",
            "layer_names", "cached_layer", "layer_role", "recorder", "num_train_timesteps", "config")


@dataclass
class FeatureCache:
    """The deep feature a full step at `branch` left for later shallow steps; `branch` records where
    it was taken, so a shallow step can check the cache belongs to it."""

    branch: int
    hidden: torch.Tensor


@dataclass
class CutState:
    """A step after the layers before the cut: what every step computes before it must choose between
    the deep part (a refresh) and a deep feature from the cache.

    `h` is the feature at the cut, `skips` what the layers after it still need (a U-Net's skip
    connections, a DiT's block inputs), `cond` the step's embedded conditioning."""

    branch: int
    h: torch.Tensor
    skips: list
    cond: Any

    def rows(self, index: torch.Tensor) -> "CutState":
        """The same state for a subset of the batch (a sub-batch that refreshes, or one that does not)."""
        return CutState(self.branch, self.h[index], [s[index] for s in self.skips], _rows(self.cond, index))


def _rows(value, index):
    """`value` with every tensor inside it (dataclass fields, tuple items) cut to the rows `index`."""
    if torch.is_tensor(value):
        return value[index]
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: _rows(getattr(value, f.name), index)
                                             for f in dataclasses.fields(value)})
    if isinstance(value, tuple):
        items = [_rows(v, index) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)  # a NamedTuple keeps its type
    return value


class Denoiser(nn.Module):
    """A network that implements the caching contract (the module docstring); U-Net and DiT are two."""

    input_multiple = 1

    def __init__(self):
        super().__init__()
        # Called as recorder(name, tensor) for every layer output when set (see minidiff.analysis).
        self.recorder: Optional[Callable[[str, torch.Tensor], None]] = None
        # The noise schedule's length when known (a Pipeline sets it): timesteps must lie below it.
        self.num_train_timesteps: Optional[int] = None

    # -- the paths, each checked once ------------------------------------------------------------

    def forward(self, x, t, cond=None):
        """The whole network, nothing kept."""
        t, cond = self._checked(x, t, cond)
        return self._rest(self._cut(x, t, cond, 0), False)[0]

    def forward_cut(self, x, t, cond=None, *, branch: int = 0) -> CutState:
        """Only the layers before the cut at `branch`: the part a full and a shallow step share."""
        t, cond = self._checked(x, t, cond, branch=branch)
        return self._cut(x, t, cond, branch)

    def forward_rest(self, state: CutState):
        """Continue a cut into the deep part: (output, FeatureCache), equal to forward_full's."""
        out, hidden = self._rest(state, True)
        return out, FeatureCache(state.branch, hidden)

    def forward_from_cache(self, state: CutState, hidden: torch.Tensor) -> torch.Tensor:
        """Finish a cut from a deep feature (cached or forecast), as forward_shallow does."""
        return self._from_cache(state, hidden)

    def forward_full(self, x, t, cond=None, *, branch: int = 0):
        """The whole network; also returns the cache a later shallow step at `branch` reuses."""
        return self.forward_rest(self.forward_cut(x, t, cond, branch=branch))

    def forward_shallow(self, x, t, cond=None, *, cache: FeatureCache, branch: Optional[int] = None):
        """Only the layers around the cut, reusing the cached deep feature.

        `branch`, if given, must be the cache's; the cache must fit this input (checked cheaply)."""
        t, cond = self._checked(x, t, cond, cache=cache, branch=branch)
        return self._from_cache(self._cut(x, t, cond, cache.branch), cache.hidden)

    # -- checks --------------------------------------------------------------------------------

    def _checked(self, x, t, cond, *, branch: Optional[int] = None, cache: Optional[FeatureCache] = None):
        """Every check of one call, before any work: (t as a (B,) tensor, checked conditioning)."""
        if branch is not None and cache is None:
            self.check_branch(branch)
        self._check_input(x)
        if cache is not None:
            self.check_cache(x, cache, branch)
        self._check_timesteps(t)
        return self._check_cond(x, t, cond)

    def check_branch(self, branch: int, name: str = "cache branch"):
        if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < self.num_branches:
            raise ValueError(f"{name} must be an int in [0, {self.num_branches - 1}], got {branch!r}")

    def check_cache(self, x, cache: FeatureCache, branch: Optional[int] = None):
        """The cheap facts that tie a cache to this call: branch, batch, shape, dtype, device."""
        if not isinstance(cache, FeatureCache):
            raise TypeError(f"cache must be the FeatureCache returned by forward_full, got {type(cache).__name__}")
        self.check_branch(cache.branch)
        if branch is not None and branch != cache.branch:
            raise ValueError(f"the cache was taken at branch {cache.branch}, this shallow step asks for branch "
                             f"{branch}; run forward_full with branch={branch} first")
        hidden = cache.hidden
        if not torch.is_tensor(hidden) or hidden.ndim != 4:
            raise ValueError(f"cache.hidden must be a (B, C, H, W) tensor, got "
                             f"{tuple(hidden.shape) if torch.is_tensor(hidden) else type(hidden).__name__}")
        if hidden.shape[0] != x.shape[0]:
            raise ValueError(f"the cache was made for batch {hidden.shape[0]}, this step has batch {x.shape[0]}")
        shape = tuple(self.cache_shape(x.shape[2], x.shape[3], cache.branch))
        if tuple(hidden.shape[1:]) != shape:
            raise ValueError(f"the cache holds a {tuple(hidden.shape[1:])} feature, but branch {cache.branch} of a "
                             f"{x.shape[2]}x{x.shape[3]} input needs {shape}: it was made for another branch, size "
                             "or model")
        if hidden.dtype != x.dtype or hidden.device != x.device:
            raise ValueError(f"the cache is {hidden.dtype} on {hidden.device}, the input {x.dtype} on {x.device}; "
                             "make the cache with the same model, dtype and device")

    def _check_timesteps(self, t):
        """NaN, negative or past the schedule is an error. Checked where it costs no device sync:
        Python numbers and CPU tensors (the samplers' timesteps); device tensors are trusted."""
        if torch.is_tensor(t):
            if t.device.type != "cpu" or t.numel() == 0:
                return
            low, high = (t.min(), t.max()) if t.numel() > 1 else (t, t)
            low, high = float(low), float(high)
        elif isinstance(t, (int, float)) and not isinstance(t, bool):
            low = high = float(t)
        else:
            return  # lists and the like: torch.as_tensor decides
        last = self.num_train_timesteps
        if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or (last is not None and high >= last):
            bad = low if not math.isfinite(low) or low < 0 else high
            span = f"[0, {last})" if last is not None else "[0, the schedule's length)"
            raise ValueError(f"timestep t={bad} lies outside the noise schedule {span}; pass t from the schedule "
                             "(e.g. minidiff.schedules.make_timesteps)")

    # -- cost and speed ------------------------------------------------------------------------

    @torch.no_grad()
    def macs(self, x: torch.Tensor, t=500, cond=None, *, branch: int = 0) -> dict:
        """Multiply-accumulates of one full and one shallow step at `branch`, counted by running them."""
        return count_macs(self, x, t, cond, branch)

    def compile_paths(self, *, pack: bool = True, **kwargs) -> "Denoiser":
        """torch.compile the three primitives, so every schedule (the adaptive one too) runs compiled;
        each branch compiles once, on first use.

        Not `nn.Module.compile`, which compiles `__call__` in place; this returns the network itself.
        The batch dimension is compiled dynamic, so a guided run (2B) and an unguided one (B), or a
        smaller last batch, reuse one graph; batch 1 is the exception, compiled once on its own."""
        from .checkpoint import finish_finite_checks
        from .packing import pack_now

        finish_finite_checks(self)  # checks pending since a lazy load would break the compiled graph
        if pack:
            pack_now(self)  # the graph calls packed layers as opaque oneDNN kernels (CPU float32 only)
        self._cut = _batch_dynamic(torch.compile(self._cut, **kwargs))
        self._rest = _batch_dynamic(torch.compile(self._rest, **kwargs))
        self._from_cache = _batch_dynamic(torch.compile(self._from_cache, **kwargs))
        return self


def check_denoiser(net) -> None:
    """Refuse, before any work, a network that lacks a part of the caching contract."""
    missing = [name for name in CONTRACT if not hasattr(net, name)]
    if missing:
        raise TypeError(f"{type(net).__name__} cannot be a Pipeline's denoiser: it lacks {', '.join(missing)} "
                        "(the caching contract: subclass minidiff.denoiser.Denoiser)")


@torch.no_grad()
def count_macs(model: nn.Module, x: torch.Tensor, t, cond, branch: int) -> dict:
    """{"full", "shallow"}: multiply-accumulates of one forward_full and one forward_shallow of `model`."""
    from torch.utils.flop_counter import FlopCounterMode

    # torch's counter knows the GPU attention kernels but not the CPU one, which it counts as 0
    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}
    counts = {}
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        _, cache = model.forward_full(x, t, cond, branch=branch)
    counts["full"] = counter.get_total_flops() // 2
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        model.forward_shallow(x, t, cond, cache=cache)
    counts["shallow"] = counter.get_total_flops() // 2
    return counts


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of softmax(QK^T)V: two matrix products, 2 FLOPs per multiply-accumulate."""
    *batch, queries, dim = query_shape
    return 2 * math.prod(batch) * queries * key_shape[-2] * (dim + value_shape[-1])


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
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):  # a CutState and its conditioning
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name))
    elif isinstance(value, (tuple, list)):  # PreparedContext is a tuple too
        for item in value:
            yield from _tensors(item)
