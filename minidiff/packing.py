"""oneDNN weight prepacking for CPU inference.

A float32 convolution or linear layer on CPU hands oneDNN a plain (OIHW) weight, which oneDNN
reorders into its blocked layout on every call. Where the arithmetic is small next to the weight
(the U-Net's deep levels: 1280 channels at 8x8 or 4x4 latents) that reorder costs as much as the
convolution itself. `pack(model)` marks every Conv2d and Linear to keep its weight in the blocked
layout: each layer reorders its weight once, on its first inference call (so a lazily loaded model
still reads each weight only when it is first needed), keeps only the blocked copy, and from then
on calls oneDNN directly.

What stays as before: `state_dict` reads and writes the plain layout; `load_state_dict` works;
`.to()` / `.half()` / `.cuda()` return layers to plain weights first; a call that needs gradients,
runs under a dispatch mode (FLOP counting, fake tensors) or is being traced by torch.compile uses
the plain weight. `unpack(model)` undoes it all. Outputs agree with the plain layers to float32
rounding (the convolutions are bit-identical on the shapes measured; linear layers differ in the
last bits, as two BLAS kernels do).
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["available", "pack", "unpack", "packed_layers"]


def available(device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32) -> bool:
    """Whether packing applies: float32 on a CPU whose torch has oneDNN."""
    return (torch.device(device).type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled)


class _PackedWeight(nn.Parameter):
    """A weight in oneDNN's blocked layout (deep-copyable: Parameter's own copy asks for a memory
    format that blocked tensors refuse)."""

    def __deepcopy__(self, memo):
        if id(self) not in memo:
            memo[id(self)] = _PackedWeight(self.data.clone(), requires_grad=False)
        return memo[id(self)]


class _Packable:
    """Placed in front of a Conv2d or Linear class by `pack`; `_plain_class` is the class it replaced."""

    _plain_class: type

    def _is_packed(self) -> bool:
        return self.weight.is_mkldnn

    def _plain_weight(self) -> torch.Tensor:
        return self.weight.to_dense() if self._is_packed() else self.weight

    def _use_packed(self, x: torch.Tensor) -> bool:
        """Pack on the first call that can use it; False for calls that need the plain weight."""
        if (x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.dtype != torch.float32
                or torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, self.weight, self.bias))
                or _get_current_dispatch_mode() is not None or torch.compiler.is_compiling()):
            return False
        if not self._is_packed():
            self._weight_requires_grad = self.weight.requires_grad
            self._weight_format = _layout(self.weight)
            with torch.no_grad():
                self.weight = _PackedWeight(self._reorder(self.weight.detach(), x), requires_grad=False)
        return True

    def _restore(self):
        """Back to the plain class, with a plain weight."""
        if self._is_packed():
            self.weight = nn.Parameter(self._plain_weight(), requires_grad=self.__dict__.get("_weight_requires_grad", True))
        self.__dict__.pop("_weight_requires_grad", None)
        self.__dict__.pop("_weight_format", None)
        self.__class__ = self._plain_class

    def _apply(self, fn, recurse=True):
        self._restore()
        return self._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._is_packed():
            destination[prefix + "weight"] = self._plain_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self._is_packed():  # load into a plain weight; the next inference call packs it again
            self.weight = nn.Parameter(self._plain_weight(), requires_grad=self._weight_requires_grad)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _PackableConv2d(_Packable):
    def _pointwise(self) -> bool:
        """A 1x1 convolution is a linear layer over channels, and is packed as one: oneDNN's blocked
        1x1 formats depend on the input size, and one packed for another size is reordered again
        on every call (25x slower than not packing)."""
        return (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
                and self.dilation == (1, 1) and self.groups == 1)

    def _reorder(self, weight, x):
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
        if self.weight.ndim == 2:  # (B, C, H, W) -> (B, H, W, C), a view of a channels-last tensor
            out = torch.ops.mkldnn._linear_pointwise(x.permute(0, 2, 3, 1), self.weight, bias, "none", [], "")
            out = out.permute(0, 3, 1, 2)
        else:
            out = torch.ops.mkldnn._convolution_pointwise(x, self.weight, bias, list(self.padding), list(self.stride),
                                                          list(self.dilation), self.groups, "none", [], "")
        # oneDNN answers channels-last; a caller passing the default layout gets it back
        return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


class _PackableLinear(_Packable):
    def _reorder(self, weight, x):
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())

    def forward(self, x):
        if not self._use_packed(x):
            return F.linear(x, self._plain_weight(), self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def _layout(weight: torch.Tensor) -> torch.memory_format:
    channels_last = weight.ndim == 4 and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


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


def packed_layers(model: nn.Module) -> int:
    """How many layers of `model` hold a packed (blocked-layout) weight now."""
    return sum(isinstance(layer, _Packable) and layer._is_packed() for layer in model.modules())
