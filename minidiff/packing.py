"""oneDNN weight prepacking for CPU inference: the Conv2d and Linear layers minidiff's networks are built from.

A float32 convolution or linear layer on CPU hands oneDNN a plain (OIHW) weight, which oneDNN
reorders into its blocked layout on every call. Where the arithmetic is small next to the weight
(the U-Net's deep levels: 1280 channels at 8x8 or 4x4 latents) that reorder costs as much as the
convolution itself. The `Conv2d` and `Linear` below are torch's, plus one piece of state: once
`pack(model)` turns packing on (a Pipeline does, on CPU in float32), each layer reorders its weight
on its first inference call and keeps that blocked copy for the calls after it, through two
custom ops that torch.compile traces as opaque kernels. `repr` shows it: `..., packed`.

The plain `weight` stays the layer's parameter and the one source of truth; the blocked copy is a
cache, made again on the next call after the weight changes. A change is seen through the weight's
identity, storage and autograd version counter (in-place ops such as an EMA's `lerp_`,
`load_state_dict`, `copy_`), and through any `torch.optim` step (fused optimizers write without
counting versions). Only writes that bypass autograd altogether (through `.data` or a numpy view)
are not seen: call `unpack(model)` after them. So a model can be sampled, trained, and sampled again.

Everything else is the plain layers': `state_dict` / `load_state_dict`; a call that needs
gradients or runs under a dispatch mode (FLOP counting, fake tensors) uses the plain weight;
`.to()` / `.half()` / `.cuda()` and `unpack(model)` turn packing off and drop the copies; a deep
copy packs again on its first call. The pages of a memory-mapped weight (`minidiff.load` maps the
file) are given back once packed, so a loaded model is not held twice; a weight in ordinary memory
is held twice, plain and packed. Outputs agree with plain layers to float32 rounding: 3x3
convolutions are bit-identical on the shapes measured, linear and 1x1 layers differ in the last
bits, as two BLAS kernels do.
"""
import ctypes
import functools
import itertools
import mmap
import sys
import weakref
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["Conv2d", "Linear", "available", "pack", "pack_now", "unpack", "packed_layers"]


def available(device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32) -> bool:
    """Whether packing applies: float32 on a CPU whose torch has oneDNN and its packed kernels."""
    return (torch.device(device).type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and _kernels_work())


@functools.lru_cache(maxsize=None)
def _kernels_work() -> bool:
    """Run both packed kernels once on a tiny layer: a torch build whose oneDNN lacks them (some
    non-x86 builds) keeps plain layers instead of failing in the middle of a sampling run."""
    try:
        with torch.inference_mode():
            x, w = torch.ones(1, 2, 3, 3), torch.ones(4, 2, 3, 3)
            conv = torch.ops.mkldnn._convolution_pointwise(
                x, torch.ops.mkldnn._reorder_convolution_weight(w, [1, 1], [1, 1], [1, 1], 1), None,
                [1, 1], [1, 1], [1, 1], 1, "none", [], "")
            linear = torch.ops.mkldnn._linear_pointwise(
                torch.ones(3, 2), torch.ops.mkldnn._reorder_linear_weight(torch.ones(4, 2)), None, "none", [], "")
        return conv[0, 0, 1, 1].item() == 18.0 and linear[0, 0].item() == 2.0
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


# Fused optimizers (`torch.optim.AdamW(..., fused=True)`) write parameters in place without bumping
# their version counters, so every optimizer step counts as a possible change to every weight.
_optimizer_steps = 0


def _count_step(optimizer, args, kwargs):
    global _optimizer_steps
    _optimizer_steps += 1


@functools.lru_cache(maxsize=None)
def _watch_optimizers():
    register_optimizer_step_post_hook(_count_step)


def _version(weight: torch.Tensor) -> int:
    try:
        return weight._version
    except RuntimeError:  # an inference tensor keeps no version counter (and no autograd can write it)
        return -1


# Compiled graphs reach a layer's packed copy through an int handle, not as a tensor: torch.compile
# traces the two custom ops below as opaque calls (fusing the norms, activations and adds around
# them), and never has to trace a blocked-layout tensor, which it cannot. The copy is made or
# renewed inside the op, when the compiled graph runs.
_LAYERS: dict = {}  # handle -> weakref to a packing layer
_handles = itertools.count()


def _register(layer: nn.Module) -> int:
    handle = next(_handles)
    _LAYERS[handle] = weakref.ref(layer, lambda _, handle=handle: _LAYERS.pop(handle, None))
    return handle


def _packed_weight_of(handle: int) -> torch.Tensor:
    layer = _LAYERS[handle]() if handle in _LAYERS else None
    if layer is None:
        raise RuntimeError(f"packing layer {handle} no longer exists (it was freed)")
    return layer._packed_weight(layer.weight)


def _conv(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor], padding: List[int],
          stride: List[int], dilation: List[int], groups: int) -> torch.Tensor:
    """A convolution with a packed weight; channels-last out for channels-last in, else the default layout."""
    out = torch.ops.mkldnn._convolution_pointwise(x, packed, bias, padding, stride, dilation, groups, "none", [], "")
    return _as_laid_out(out, x)


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A linear layer with a packed weight over the last dimension of x (any strides)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _as_laid_out(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """oneDNN answers channels-last; a caller passing the default layout gets it back."""
    return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


@torch.library.custom_op("minidiff::packed_conv2d", mutates_args=())
def packed_conv2d(x: torch.Tensor, bias: Optional[torch.Tensor], handle: int, out_channels: int, kernel: List[int],
                  padding: List[int], stride: List[int], dilation: List[int], groups: int) -> torch.Tensor:
    return _conv(x, _packed_weight_of(handle), bias, padding, stride, dilation, groups)


@packed_conv2d.register_fake
def _(x, bias, handle, out_channels, kernel, padding, stride, dilation, groups):
    size = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, p, s, d in zip(x.shape[2:], kernel, padding, stride, dilation)]
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return x.new_empty((x.shape[0], out_channels, *size)).contiguous(memory_format=layout)


@torch.library.custom_op("minidiff::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, bias: Optional[torch.Tensor], handle: int, out_features: int) -> torch.Tensor:
    return _linear(x, _packed_weight_of(handle), bias)


@packed_linear.register_fake
def _(x, bias, handle, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


class _Packing:
    """What `Conv2d` and `Linear` add to torch's layers: packing on or off (`packs`, set by `pack`
    and `unpack`), and the packed copy of the weight with the state of the weight it was made from."""

    _handle: Optional[int] = None  # set while packing is on
    _packed: Optional[torch.Tensor] = None
    _packed_from: tuple = ()  # (weakref to the weight, its data pointer, its version, optimizer steps)

    @property
    def packs(self) -> bool:
        return self._handle is not None

    def _start_packing(self):
        if self._handle is None:
            _watch_optimizers()
            self._handle = _register(self)

    def _stop_packing(self):
        if self._handle is not None:
            _LAYERS.pop(self._handle, None)
        self.__dict__.pop("_handle", None)
        self._drop_packed()

    def _drop_packed(self):
        self.__dict__.pop("_packed", None)
        self.__dict__.pop("_packed_from", None)

    def _holds_copy_of(self, weight: torch.Tensor) -> bool:
        """Whether the packed copy is of `weight` as it is now (checked on every call: a few
        attribute reads, no weight data)."""
        made_from = self._packed_from
        return (self._packed is not None and made_from[0]() is weight and made_from[1] == weight.data_ptr()
                and made_from[2] == _version(weight) and made_from[3] == _optimizer_steps)

    def _packed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The blocked copy of `weight` (the layer's) as it is now, made again if it changed since."""
        if not self._holds_copy_of(weight):
            self._drop_packed()
            with torch.no_grad():
                self._packed = self._reorder(weight.detach())
            self._packed_from = (weakref.ref(weight), weight.data_ptr(), _version(weight), _optimizer_steps)
            _release_file_pages(weight)
        return self._packed

    def _uses_packed(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
        """False for calls that need the plain weight: other devices or dtypes, gradients, dispatch modes."""
        if not (self.packs and x.device.type == "cpu" and x.dtype == torch.float32 and weight.device.type == "cpu"
                and weight.dtype == torch.float32):
            return False
        if torch.compiler.is_compiling():  # traced: grad mode and modes are the compiler's own
            return True
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or bias is not None and bias.requires_grad):
            return False
        return _get_current_dispatch_mode() is None

    def _packed_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       out_features: int) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the op, so the graph holds it as an opaque node
            return packed_linear(x, bias, self._handle, out_features)
        return _linear(x, self._packed_weight(weight), bias)  # its body: the op's dispatch costs ~20 us a call

    def _apply(self, fn, recurse=True):
        self._stop_packing()  # .to(), .half(), .cuda(): back to plain layers, as `unpack`
        return super()._apply(fn, recurse)

    def __getstate__(self):  # deepcopy, pickle: the copy packs again on its first call
        state = super().__getstate__()
        state.pop("_packed", None)
        state.pop("_packed_from", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if self.__dict__.pop("_handle", None) is not None:
            self._start_packing()  # a handle of its own

    def extra_repr(self) -> str:
        if not self.packs:
            return super().extra_repr()
        return super().extra_repr() + (", packed" if self._holds_copy_of(self.weight) else ", packs on next use")


class Conv2d(_Packing, nn.Conv2d):
    """torch's Conv2d, which can keep its weight packed for oneDNN (see the module docstring)."""

    def _pointwise(self) -> bool:
        """A 1x1 convolution is a linear layer over channels, and is packed as one: oneDNN's blocked
        1x1 formats depend on the input size, and one packed for another size is reordered again
        on every call (25x slower than not packing)."""
        return (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
                and self.dilation == (1, 1) and self.groups == 1)

    def _reorder(self, weight: torch.Tensor) -> torch.Tensor:
        if self._pointwise():
            return torch.ops.mkldnn._reorder_linear_weight(weight.reshape(weight.shape[:2]).contiguous())
        return torch.ops.mkldnn._reorder_convolution_weight(weight.contiguous(), list(self.padding), list(self.stride),
                                                            list(self.dilation), self.groups)

    def _conv_forward(self, x, weight, bias):
        if x.ndim != 4 or not self._uses_packed(x, weight, bias):
            return super()._conv_forward(x, weight, bias)
        if self._pointwise():  # (B, C, H, W) -> (B, H, W, C): a view when x is channels-last
            out = self._packed_linear(x.permute(0, 2, 3, 1), weight, bias, self.out_channels).permute(0, 3, 1, 2)
            return _as_laid_out(out, x)
        if torch.compiler.is_compiling():
            return packed_conv2d(x, bias, self._handle, self.out_channels, list(self.kernel_size), list(self.padding),
                                 list(self.stride), list(self.dilation), self.groups)
        return _conv(x, self._packed_weight(weight), bias, list(self.padding), list(self.stride), list(self.dilation),
                     self.groups)


class Linear(_Packing, nn.Linear):
    """torch's Linear, which can keep its weight packed for oneDNN (see the module docstring)."""

    def _reorder(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())

    def forward(self, x):
        weight, bias = self.weight, self.bias
        if not self._uses_packed(x, weight, bias):
            return F.linear(x, weight, bias)
        return self._packed_linear(x, weight, bias, self.out_features)


_MADV_PAGEOUT = 21  # Linux 5.4+


@functools.lru_cache(maxsize=None)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _release_file_pages(tensor: torch.Tensor):
    """Ask the kernel to drop the pages of a weight memory-mapped from a model file (`minidiff.load`
    maps the file instead of copying it), which its packed copy stands in for: otherwise both stay
    resident. Advisory and safe: a page read again comes back from the file, and a page written
    since it was mapped is kept. Only file-backed mappings are touched; anywhere but Linux, nothing."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                low, high = (int(a, 16) for a in fields[0].split("-"))
                if low <= start < high:
                    if len(fields) < 6 or fields[4] == "0" or not fields[5].startswith("/"):
                        return  # anonymous memory: the plain weight stays, as the parameter it is
                    break
            else:
                return
        page = mmap.PAGESIZE
        first, last = -(-start // page) * page, min(end, high) // page * page  # whole pages of this tensor only
        if last > first:
            _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_PAGEOUT)
    except (OSError, ValueError, AttributeError):
        pass  # an older kernel or a restricted /proc: the pages stay, as without this


def _can_pack(layer: nn.Module) -> bool:
    if not isinstance(layer, _Packing):
        return False
    if isinstance(layer, nn.Conv2d) and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
        return False
    weight = layer.weight
    return isinstance(weight, torch.Tensor) and not weight.is_meta and available(weight.device, weight.dtype)


def pack(model: nn.Module) -> int:
    """Turn packing on for every CPU float32 `Conv2d` and `Linear` of this module (other layers,
    torch's own among them, are left alone); returns how many pack. Nothing is read or reordered
    here: each layer packs on its first inference call. A no-op without oneDNN."""
    layers = [layer for layer in model.modules() if _can_pack(layer)]
    for layer in layers:
        layer._start_packing()
    return len(layers)


def unpack(model: nn.Module) -> int:
    """Turn packing off for every layer of `model` and drop the packed copies; returns how many had it on."""
    layers = [layer for layer in model.modules() if isinstance(layer, _Packing) and layer.packs]
    for layer in layers:
        layer._stop_packing()
    return len(layers)


def pack_now(model: nn.Module) -> int:
    """Turn packing on as `pack` does, and pack every such layer's weight now rather than on its first
    call (compile_paths does, so the first compiled run costs no more than the ones after it); returns
    how many layers hold a packed copy."""
    pack(model)
    for layer in model.modules():
        if isinstance(layer, _Packing) and layer.packs:
            layer._packed_weight(layer.weight)
    return packed_layers(model)


def packed_layers(model: nn.Module) -> int:
    """How many layers of `model` hold a packed copy of their weight as it is now."""
    return sum(isinstance(layer, _Packing) and layer.packs and layer._holds_copy_of(layer.weight)
               for layer in model.modules())
