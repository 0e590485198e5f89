"""Reading untrusted weight files safely (writing them safely is minidiff.writing).

- `.safetensors` is read memory-mapped after its header is checked against the file size, so a
  truncated or hostile file is a clear error, never a huge allocation.
- `.ckpt` / `.pt` / `.pth` / `.bin` pickles go through `torch.load(weights_only=True)`, which refuses
  to build anything but tensors and plain containers, so no code in the file can run. PyTorch
  Lightning checkpoints (CompVis LDM, SD 1.x `.ckpt`) also name Lightning's ModelCheckpoint class and
  numpy scalars; those few names resolve to inert stand-ins here, never to Lightning or numpy code.
- State dicts are checked key by key (missing, unexpected, mis-shaped, wrong kind of dtype) before
  any weight is assigned. A float tensor of another precision is cast (fp16 files into fp32 models).
"""
from __future__ import annotations

import json
import math
import pickle
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

from .memory_format import memory_format

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A weight file or folder that cannot be used as it is; the message says why and what to do."""


def read_state_dict(path, *, allow_nan: bool = False) -> dict:
    """Tensors of a weight file, without executing anything it contains.

    Lightning-style nesting (`{"state_dict": {...}}`) is unwrapped; non-tensor entries are dropped.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weight file {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; expected a weight file (.safetensors, .ckpt, .pt, .bin)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted download or copy?")
    if path.suffix == ".safetensors":
        sd = _read_safetensors(path)
    elif path.suffix in PICKLE_SUFFIXES:
        sd = _read_pickle(path)
    else:
        raise CheckpointError(f"{path}: unknown weight file type {path.suffix!r}; expected .safetensors, "
                              f"{', '.join(PICKLE_SUFFIXES)}")
    if not allow_nan:
        check_finite(sd, str(path))
    return sd


# Bytes per element of the safetensors dtypes torch can hold.
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


def _read_safetensors(path: Path) -> dict:
    """Check the header, then map the file: `load_file` backs every tensor by one private mmap of it
    (pages are read on first touch and never copied into process memory)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _check_safetensors_header(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file (corrupt or truncated?): {e}") from None


def _check_safetensors_header(path: Path):
    """Every tensor has a known dtype, a shape matching its byte range, and bytes inside the file,
    not shared with another tensor. Raises CheckpointError naming the first tensor that does not."""
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path} is truncated ({size} bytes): a safetensors file starts with an 8-byte "
                              "header length")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{path} is corrupt or truncated: its header claims {header_len} bytes but the "
                                  f"file has {size}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt: its header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt: its header is a JSON {type(header).__name__}, not an object")
    data_len = size - 8 - header_len
    ranges = sorted(_byte_range(path, name, info, data_len) + (name,) for name, info in header.items()
                    if name != "__metadata__")
    for (_, end, first), (begin, _, second) in zip(ranges, ranges[1:]):
        if begin < end:
            raise CheckpointError(f"{path} is corrupt: tensors {first!r} and {second!r} claim overlapping bytes")


def _byte_range(path: Path, name: str, info, data_len: int) -> tuple:
    """(begin, end) of one header entry, checked against its dtype, its shape and the data size."""
    def bad(why):
        return CheckpointError(f"{path} is corrupt or truncated: tensor {name!r} {why}")

    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        raise bad(f"has no dtype entry: {str(info)[:80]}")
    itemsize = SAFETENSORS_DTYPES.get(info["dtype"])
    if itemsize is None:
        raise bad(f"has dtype {info['dtype']!r}; supported are {sorted(SAFETENSORS_DTYPES)}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"has shape {str(shape)[:80]}; expected a list of non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise bad(f"has data_offsets {str(offsets)[:80]}; expected [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if end > data_len:
        raise bad(f"claims bytes {begin}..{end} but only {data_len} bytes of data follow the header")
    if math.prod(shape) * itemsize != end - begin:
        raise bad(f"of shape {shape} and dtype {info['dtype']} needs {math.prod(shape) * itemsize} bytes, "
                  f"its data_offsets give {end - begin}")
    return begin, end


class _LightningClass:
    """Stands in for a class a Lightning checkpoint names (its callbacks dict is keyed by the class);
    it only remembers what the file gave it, so naming it runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


class _NumpyDtype:
    """Stands in for `numpy.dtype(code, align, copy)` and its pickled state; holds the type code only."""

    code = None

    def __init__(self, code=None, *args):
        if code is not None:
            self.code = code

    def __setstate__(self, state):  # numpy's state: (version, byte order, ...)
        self.byte_order = state[1] if isinstance(state, tuple) and len(state) > 1 else "|"


_NUMPY_SCALAR = re.compile(r"[biuf][1248]|b1|\?")


def _numpy_scalar(dtype, data=None):
    """Stands in for numpy's scalar reconstructor: the number as a Python int/float/bool.

    Only plain numeric codes are decoded; anything else comes back as the raw value (it is dropped
    with the other non-tensor entries anyway)."""
    import numpy

    code = getattr(dtype, "code", None)
    if not isinstance(code, str) or not _NUMPY_SCALAR.fullmatch(code) or not isinstance(data, bytes):
        return data
    order = getattr(dtype, "byte_order", "<")
    numpy_dtype = numpy.dtype((order if order in "<>" else "") + code)
    if len(data) != numpy_dtype.itemsize:
        return data
    return numpy.frombuffer(data, dtype=numpy_dtype, count=1)[0].item()


def _lightning_globals() -> list:
    """(stand-in, name) pairs for everything a Lightning checkpoint holds besides tensors and containers."""
    pairs = [(_LightningClass, f"{package}.callbacks.model_checkpoint.ModelCheckpoint")
             for package in ("pytorch_lightning", "lightning.pytorch")]
    pairs += [(_numpy_scalar, f"{module}.multiarray.scalar") for module in ("numpy.core", "numpy._core")]
    pairs.append((_NumpyDtype, "numpy.dtype"))
    for name, code in (("Float64", "f8"), ("Float32", "f4"), ("Float16", "f2"), ("Int64", "i8"), ("Int32", "i4"),
                       ("Int16", "i2"), ("Int8", "i1"), ("UInt8", "u1"), ("Bool", "b1")):
        pairs.append((type(f"{name}DType", (_NumpyDtype,), {"code": code}), f"numpy.dtypes.{name}DType"))
    return pairs


_LIGHTNING_GLOBALS = _lightning_globals()


def _read_pickle(path: Path) -> dict:
    try:
        with torch.serialization.safe_globals(_LIGHTNING_GLOBALS):
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        # keep the line of torch's long message that names what the file wanted, e.g. "GLOBAL posix.system"
        lines = [ln for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
        detail = lines[0].strip() if lines else str(e).splitlines()[0]
        if "GLOBAL" in detail:
            raise CheckpointError(
                f"{path} needs more than tensors to load (it asks to import and call code: {detail}), so it was "
                "refused; only plain weight pickles are read. Re-save it as safetensors where you trust it") from None
        raise CheckpointError(f"{path} is not a weight file the safe loader can read (corrupt, or a plain pickle "
                              f"rather than torch.save output): {detail}") from None
    except Exception as e:  # torch's unpickler fails on damaged bytes with IndexError, KeyError, struct.error...
        raise CheckpointError(f"{path} could not be read (corrupt or truncated?): "
                              f"{str(e)[:300] or type(e).__name__}") from None
    while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}


def _finite(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    try:  # one pass and no temporary as large as the tensor; NaN and Inf propagate to min or max
        low, high = torch.aminmax(tensor)
    except (RuntimeError, NotImplementedError):  # float8 has no aminmax
        return bool(torch.isfinite(tensor.float()).all())
    return bool(torch.isfinite(low) and torch.isfinite(high))


def check_finite(state_dict: dict, what: str = "state dict"):
    """Raise a CheckpointError naming the float tensors that hold NaN or Inf."""
    bad = [k for k, v in state_dict.items() if not _finite(v)]
    if bad:
        raise CheckpointError(f"{what}: {len(bad)} tensor(s) contain NaN or Inf, e.g. {bad[:5]}; the file is "
                              "damaged (pass allow_nan=True / --allow-nan to load it anyway)")


def _listing(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}{f', ... ({len(keys) - limit} more)' if len(keys) > limit else ''}"


def check_state_dict(module: nn.Module, state_dict: dict, what: str = "model"):
    """Raise a CheckpointError listing missing, unexpected and mis-shaped keys; assign nothing.

    Floats of another precision are accepted (loading casts them); an integer, bool or complex
    tensor where the model holds a float (or the reverse) is an error.
    """
    expected = module.state_dict()
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    dtypes = [k for k in set(expected) & set(state_dict)
              if expected[k].is_floating_point() != state_dict[k].is_floating_point()]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} mis-shaped key(s): {'; '.join(shapes[:8])}")
    if dtypes:
        problems.append(f"{len(dtypes)} key(s) of the wrong kind of dtype: {_listing(dtypes)}")
    if problems:
        raise CheckpointError(f"the weights do not fit the {what}: " + " | ".join(problems)
                              + ". Is this the right file and config?")


def load_weights(module: nn.Module, state_dict: dict, what: str = "model"):
    """Check every key and shape first, then copy all weights in (never a partial load)."""
    check_state_dict(module, state_dict, what)
    module.load_state_dict(state_dict, strict=True)
    return module


_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                 "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


@contextmanager
def _no_init():
    """Module constructors skip torch.nn.init while a model is built for loading: on the meta
    device it would do no work, yet some initialisers (normal_) first import torch's reference
    implementations, seconds of a cold start."""
    init = torch.nn.init
    saved = {name: getattr(init, name) for name in _INITIALISERS if hasattr(init, name)}
    try:
        for name in saved:
            setattr(init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


def build_loaded(build, state_dict: dict, what: str = "model", *, device="cpu",
                 dtype: Optional[torch.dtype] = torch.float32, allow_nan: bool = False, source: str = "",
                 check_on_first_use: bool = False):
    """`build()` on the meta device, then the file's tensors become its parameters.

    Nothing is initialised at random and nothing is copied when the file already holds `dtype` on
    `device`: memory-mapped safetensors stay mapped, and only the pages a computation touches are
    ever read. Float tensors of another precision, or for another device, are converted once,
    tensor by tensor, in the memory format the module asked for (channels-last convolutions).
    `dtype=None` keeps the file's float precision. Keys and shapes are checked first. Finiteness is
    checked now, or with `check_on_first_use` by each layer just before it first runs (see
    `check_finite_on_first_use`), so loading never reads weights that are not needed yet.
    """
    with torch.device("meta"), _no_init():
        module = build()
    check_state_dict(module, state_dict, what)
    expected = module.state_dict()
    device = torch.device(device)
    tensors = {}
    for key, value in state_dict.items():
        target = dtype if dtype is not None and value.is_floating_point() else value.dtype
        if value.device != device or value.dtype != target:
            channels_last = memory_format(expected[key]) == torch.channels_last
            value = value.to(device=device, dtype=target,
                             memory_format=torch.channels_last if channels_last else torch.preserve_format)
        tensors[key] = value
    what_file = f"{source} ({what})" if source else what
    if not allow_nan and not check_on_first_use:
        check_finite(tensors, what_file)
    module.load_state_dict(tensors, strict=True, assign=True)
    unset = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if unset:  # a buffer the file does not hold would need computing here; none of minidiff's modules has one
        raise CheckpointError(f"the {what} has tensors no weight file holds: {_listing(unset)}; it cannot be "
                              "loaded this way")
    if not allow_nan and check_on_first_use:
        check_finite_on_first_use(module, what_file)
    return module


def check_finite_on_first_use(module: nn.Module, what: str = "model"):
    """Each layer holding tensors checks them for NaN/Inf just before it first runs, then never
    again: the check reads what the computation is about to read anyway, and weights never used
    are never read. A damaged file still fails before any output, naming the tensors.
    `finish_finite_checks(module)` runs the checks still pending at once."""
    pending = {}

    def check(layer, args=()):
        name, handle = pending.pop(id(layer))
        handle.remove()
        own = [*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)]
        check_finite({f"{name}.{key}" if name else key: t for key, t in own}, what)

    for name, layer in module.named_modules():
        if next(layer.parameters(recurse=False), None) is not None or \
                next(layer.buffers(recurse=False), None) is not None:
            pending[id(layer)] = (name, layer.register_forward_pre_hook(check))
    module._finite_checks = (pending, check)  # a plain attribute: read by finish_finite_checks


def finish_finite_checks(module: nn.Module):
    """Run now every finiteness check `check_finite_on_first_use` left pending (e.g. before compiling)."""
    pending, check = module.__dict__.get("_finite_checks", ({}, None))
    layers = {id(layer): layer for layer in module.modules()}
    for key in list(pending):
        check(layers[key])
