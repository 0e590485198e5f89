"""oneDNN weight prepacking for CPU inference.

A float32 convolution or linear layer on CPU hands oneDNN a plain (OIHW) weight, which oneDNN
reorders into its blocked layout on every call. Where the arithmetic is small next to the weight
(the U-Net's deep levels: 1280 channels at 8x8 or 4x4 latents) that reorder costs as much as the
convolution itself. `pack(model)` marks every Conv2d and Linear to keep its weight in the blocked
layout: each layer reorders its weight once, on its first inference call (so a lazily loaded model
still reads each weight only when it is first needed), keeps only the blocked copy (the pages of a
memory-mapped file weight are given back), and from then on calls oneDNN directly, through two
custom ops that torch.compile traces as opaque kernels (`UNet.compile_paths` packs first).

What stays as before: `state_dict` reads and writes the plain layout; `load_state_dict` works;
`.to()` / `.half()` / `.cuda()` return layers to plain weights first; a call that needs gradients
or runs under a dispatch mode (FLOP counting, fake tensors) uses the plain weight; `deepcopy` works.
`unpack(model)` undoes it all. Outputs agree with the plain layers to float32 rounding: 3x3
convolutions are bit-identical on the shapes measured, linear and 1x1 layers differ in the last
bits, as two BLAS kernels do.
"""
import copy
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
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .layout import memory_format

__all__ = ["available", "pack", "pack_now", "unpack", "packed_layers"]


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


class _PackedWeight(nn.Parameter):
    """A weight in oneDNN's blocked layout (deep-copyable: Parameter's own copy asks for a memory
    format that blocked tensors refuse)."""

    def __deepcopy__(self, memo):
        if id(self) not in memo:
            memo[id(self)] = _PackedWeight(self.data.clone(), requires_grad=False)
        return memo[id(self)]


# Packed weights reach the kernels through an int handle, not as tensors: torch.compile traces the
# two custom ops below as opaque calls (fusing the norms, activations and adds around them), and
# never has to trace a blocked-layout tensor, which it cannot.
_WEIGHTS: dict = {}  # handle -> weakref to a _PackedWeight
_handles = itertools.count()


def _register(weight: torch.Tensor) -> int:
    handle = next(_handles)
    _WEIGHTS[handle] = weakref.ref(weight, lambda _, handle=handle: _WEIGHTS.pop(handle, None))
    return handle


def _weight(handle: int) -> torch.Tensor:
    weight = _WEIGHTS[handle]() if handle in _WEIGHTS else None
    if weight is None:
        raise RuntimeError(f"packed weight {handle} no longer exists (its layer was unpacked or freed)")
    return weight


def _conv2d(x: torch.Tensor, bias: Optional[torch.Tensor], handle: int, out_channels: int, kernel: List[int],
            padding: List[int], stride: List[int], dilation: List[int], groups: int) -> torch.Tensor:
    """A convolution with a packed weight; channels-last out for channels-last in, else the default layout."""
    out = torch.ops.mkldnn._convolution_pointwise(x, _weight(handle), bias, padding, stride, dilation, groups,
                                                  "none", [], "")
    return _as_laid_out(out, x)


def _as_laid_out(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """oneDNN answers channels-last; a caller passing the default layout gets it back."""
    return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


packed_conv2d = torch.library.custom_op("minidiff::packed_conv2d", _conv2d, mutates_args=())


@packed_conv2d.register_fake
def _(x, bias, handle, out_channels, kernel, padding, stride, dilation, groups):
    size = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, p, s, d in zip(x.shape[2:], kernel, padding, stride, dilation)]
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return x.new_empty((x.shape[0], out_channels, *size)).contiguous(memory_format=layout)


def _linear(x: torch.Tensor, bias: Optional[torch.Tensor], handle: int, out_features: int) -> torch.Tensor:
    """A linear layer with a packed weight over the last dimension of x (any strides)."""
    return torch.ops.mkldnn._linear_pointwise(x, _weight(handle), bias, "none", [], "")


packed_linear = torch.library.custom_op("minidiff::packed_linear", _linear, mutates_args=())


@packed_linear.register_fake
def _(x, bias, handle, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


def _kernels() -> tuple:
    """(conv2d, linear): the custom ops while torch.compile traces, so the graph holds them as
    opaque nodes; their bodies otherwise (the ops' dispatch costs ~20 us a call)."""
    return (packed_conv2d, packed_linear) if torch.compiler.is_compiling() else (_conv2d, _linear)


class _Packable:
    """Placed in front of a Conv2d or Linear class by `pack`; `_plain_class` is the class it replaced.
    `_handle` is set while the layer holds a packed weight."""

    _plain_class: type
    _handle: Optional[int] = None

    def _is_packed(self) -> bool:
        return self._handle is not None

    def _plain_weight(self) -> torch.Tensor:
        return self.weight.to_dense() if self._is_packed() else self.weight

    def _use_packed(self, x: torch.Tensor) -> bool:
        """Pack on the first call that can use it; False for calls that need the plain weight."""
        if torch.compiler.is_compiling():  # traced: packed layers stay packed (compile_paths packs them all first)
            return self._is_packed()
        if (x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.dtype != torch.float32
                or torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, self.weight, self.bias))
                or _get_current_dispatch_mode() is not None):
            return False
        self._pack()
        return True

    def _pack(self):
        if not self._is_packed():
            self._weight_requires_grad = self.weight.requires_grad
            self._weight_format = memory_format(self.weight)
            plain = self.weight
            with torch.no_grad():
                self.weight = _PackedWeight(self._reorder(plain.detach()), requires_grad=False)
            self._handle = _register(self.weight)
            _release_file_pages(plain)

    def _to_plain_weight(self):
        if self._is_packed():
            self.weight = nn.Parameter(self._plain_weight(), requires_grad=self._weight_requires_grad)
            _WEIGHTS.pop(self._handle, None)
            del self._handle

    def _restore(self):
        """Back to the plain class, with a plain weight."""
        self._to_plain_weight()
        self.__dict__.pop("_weight_requires_grad", None)
        self.__dict__.pop("_weight_format", None)
        self.__class__ = self._plain_class

    def _apply(self, fn, recurse=True):
        self._restore()
        return self._apply(fn, recurse)

    def __deepcopy__(self, memo):
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        if self._is_packed():  # the copy's packed weight is its own
            clone._handle = _register(clone.weight)
        return clone

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._is_packed():
            destination[prefix + "weight"] = self._plain_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._to_plain_weight()  # load into a plain weight; the next inference call packs it again
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _PackableConv2d(_Packable):
    def _pointwise(self) -> bool:
        """A 1x1 convolution is a linear layer over channels, and is packed as one: oneDNN's blocked
        1x1 formats depend on the input size, and one packed for another size is reordered again
        on every call (25x slower than not packing)."""
        return (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
                and self.dilation == (1, 1) and self.groups == 1)

    def _reorder(self, weight):
        if self._pointwise():
            return torch.ops.mkldnn._reorder_linear_weight(weight.reshape(weight.shape[:2]).contiguous())
        return torch.ops.mkldnn._reorder_convolution_weight(weight.contiguous(), list(self.padding), list(self.stride),
                                                            list(self.dilation), self.groups)

    def _plain_weight(self) -> torch.Tensor:
        if not self._is_packed():
            return self.weight
        weight = self.weight.to_dense()
        weight = weight[:, :, None, None] if weight.ndim == 2 else weight
        return weight.contiguous(memory_format=self._weight_format)  # as it was: a U-Net's are channels-last

    def _conv_forward(self, x, weight, bias):
        if x.ndim != 4 or not self._use_packed(x):
            return super()._conv_forward(x, self._plain_weight(), bias)
        conv2d, linear = _kernels()
        if self._pointwise():  # (B, C, H, W) -> (B, H, W, C): a view when x is channels-last
            out = linear(x.permute(0, 2, 3, 1), bias, self._handle, self.out_channels).permute(0, 3, 1, 2)
            return _as_laid_out(out, x)
        return conv2d(x, bias, self._handle, self.out_channels, list(self.kernel_size), list(self.padding),
                      list(self.stride), list(self.dilation), self.groups)


class _PackableLinear(_Packable):
    def _reorder(self, weight):
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())

    def forward(self, x):
        if not self._use_packed(x):
            return F.linear(x, self._plain_weight(), self.bias)
        _, linear = _kernels()
        return linear(x, self.bias, self._handle, self.out_features)


_MADV_PAGEOUT = 21  # Linux 5.4+


@functools.lru_cache(maxsize=None)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _release_file_pages(tensor: torch.Tensor):
    """Ask the kernel to drop the pages of a weight memory-mapped from a model file (`minidiff.load`
    maps the file instead of copying it), which its packed copy replaces: otherwise both stay
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
                        return  # anonymous memory: freed with the tensor anyway
                    break
            else:
                return
        page = mmap.PAGESIZE
        first, last = -(-start // page) * page, min(end, high) // page * page  # whole pages of this tensor only
        if last > first:
            _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_PAGEOUT)
    except (OSError, ValueError, AttributeError):
        pass  # an older kernel or a restricted /proc: the pages stay, as without this


_CLASSES: dict = {}


def _packable_class(cls: type) -> Optional[type]:
    if cls not in _CLASSES:
        mixin = _PackableConv2d if issubclass(cls, nn.Conv2d) else _PackableLinear if issubclass(cls, nn.Linear) else None
        _CLASSES[cls] = mixin and type(f"Packable{cls.__name__}", (mixin, cls), {"_plain_class": cls})
    return _CLASSES[cls]


def _can_pack(layer: nn.Module) -> bool:
    if isinstance(layer, _Packable) or _packable_class(type(layer)) is None:
        return False
    if isinstance(layer, nn.Conv2d) and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
        return False
    weight = layer.weight
    return isinstance(weight, torch.Tensor) and not weight.is_meta and available(weight.device, weight.dtype)


def pack(model: nn.Module) -> int:
    """Mark every CPU float32 Conv2d and Linear of `model` for packing on first inference use;
    returns how many were marked. Nothing is read or reordered here. A no-op without oneDNN."""
    layers = [layer for layer in model.modules() if _can_pack(layer)]
    for layer in layers:
        layer.__class__ = _packable_class(type(layer))
    return len(layers)


def unpack(model: nn.Module) -> int:
    """Return every packable layer of `model` to its plain class and weight; returns how many."""
    layers = [layer for layer in model.modules() if isinstance(layer, _Packable)]
    for layer in layers:
        layer._restore()
    return len(layers)


def pack_now(model: nn.Module) -> int:
    """Mark as `pack` does, then reorder every marked layer's weight now (compile_paths does this:
    the compiled graph calls packed layers as such); returns how many layers are packed."""
    pack(model)
    for layer in model.modules():
        if isinstance(layer, _Packable) and available(layer.weight.device, layer.weight.dtype):
            layer._pack()
    return packed_layers(model)


def packed_layers(model: nn.Module) -> int:
    """How many layers of `model` hold a packed (blocked-layout) weight now."""
    return sum(isinstance(layer, _Packable) and layer._is_packed() for layer in model.modules())
