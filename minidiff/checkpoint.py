"""Reading untrusted weight files safely and writing files so that a crash never leaves half of one.

- `.safetensors` is read memory-mapped after its header is checked against the file size, so a
  truncated or hostile file is a clear error, never a huge allocation.
- `.ckpt` / `.pt` / `.pth` / `.bin` pickles go through `torch.load(weights_only=True)`, which refuses
  to build anything but tensors and plain containers, so no code in the file can run. PyTorch
  Lightning checkpoints (CompVis LDM, SD 1.x `.ckpt`) also name Lightning's ModelCheckpoint class and
  numpy scalars; those few names resolve to inert stand-ins here, never to Lightning or numpy code.
- State dicts are checked key by key (missing, unexpected, mis-shaped, wrong kind of dtype) before
  any weight is assigned. A float tensor of another precision is cast (fp16 files into fp32 models).
- Writes go to a temporary sibling `.NAME.PID.RANDOM.tmp`, are fsynced, then renamed into place;
  a folder replaces the old one in a single atomic exchange where the OS has one (Linux). A killed
  writer leaves at most such a temporary, which the next write to NAME removes; loading ignores it.
"""
from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import pickle
import re
import secrets
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

from .layout import memory_format

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


def check_conversion_paths(src, dst, overwrite: bool):
    """A converter's preconditions, checked before any work: SRC exists, DST is free or may go."""
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise CheckpointError(f"{src} does not exist")
    check_apart(src, dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
    check_replaceable(dst, MODEL_KIND)
    above = dst
    while not above.exists() and above != above.parent:
        above = above.parent
    why = unwritable(above) if above.is_dir() else f"{above} is a file"
    if why:
        raise CheckpointError(f"{dst} cannot be written: {why}")
    return src, dst


def unwritable(folder) -> Optional[str]:
    """Why no file can be created in the existing `folder`, or None when one can. Creating and
    removing a file is the only test that holds for root, read-only mounts and /proc alike."""
    try:
        fd, name = tempfile.mkstemp(prefix=".minidiff-probe-", dir=folder)
    except OSError as e:
        return f"cannot create files in {folder} ({e.strerror or e})"
    os.close(fd)
    os.unlink(name)
    return None


def check_apart(src, dst):
    """Refuse a destination that is the source, lies inside it or contains it: writing it would destroy the source."""
    source, target = Path(src).resolve(), Path(dst).resolve()
    if source == target:
        raise ValueError(f"the destination {dst} is the source itself; writing it would replace the source. "
                         "Choose a new folder for the output")
    if target.is_relative_to(source):
        raise ValueError(f"the destination {dst} lies inside the source {src}; the output must not be written into "
                         "the source. Choose a folder outside it")
    if source.is_relative_to(target):
        raise ValueError(f"the source {src} lies inside the destination {dst}; replacing {dst} would delete the "
                         "source. Choose a new folder for the output")


# What a folder minidiff wrote is: config.json's "format" ("minidiff" for a model), or for folders
# without one the kind named in this marker file.
MODEL_KIND = "minidiff"
OUTPUT_MARKER = ".minidiff-output"
# What a model folder's own files are: `--overwrite` replaces these (a new model without a
# calibration drops the old one's); anything else in the folder is the user's and is kept.
MODEL_FILES = ("config.json", "scheduler.json", "model.safetensors", "tokenizer", "calibration.json")


def folder_kind(path) -> Optional[str]:
    """The kind of minidiff output folder `path` is ("minidiff" for a model), or None if it is none of ours."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
        if isinstance(config, dict) and isinstance(config.get("format"), str):
            return config["format"]
    except (OSError, ValueError):
        pass
    try:
        return (path / OUTPUT_MARKER).read_text().strip() or None
    except (OSError, ValueError):
        pass
    if (path / "train_state.json").is_file() and (path / "model").is_dir():
        return TRAINING_KIND  # written before markers existed
    return None


TRAINING_KIND = "training checkpoint"


def check_replaceable(dst, kind: str = MODEL_KIND):
    """`--overwrite` may replace only an empty folder or a previous output of the same kind; refuse anything else."""
    dst = Path(dst)
    if not dst.exists():
        return
    if not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a folder; it was left as it is")
    entries = sorted(entry.name for entry in dst.iterdir())
    if not entries:
        return
    found = folder_kind(dst)
    if found != kind:
        what = "a minidiff model" if kind == MODEL_KIND else f"a minidiff {kind}"
        seen = f"a {found} folder" if found else f"{len(entries)} other entries ({_listing(entries, 5)})"
        raise FileExistsError(f"{dst} is not {what} but holds {seen}; --overwrite replaces only an empty folder "
                              f"or {what}, so nothing was touched. Choose a new folder name")


# -- writing ----------------------------------------------------------------------------------------

def _fsync(path: Path):
    """Flush a file's or folder's contents to disk (folders: their entries, so a rename survives a crash)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_sibling(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(target) -> list:
    """Delete temporaries of writes to `target` whose process died (a crash or kill mid-write).

    Returns what was removed. Assumes one machine writes the folder: a pid from another host
    sharing it over the network could be taken for dead.
    """
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.[0-9a-f]+\.(tmp|old)")
    removed = []
    if not target.parent.is_dir():
        return removed
    for entry in sorted(target.parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if match.group(2) == "old" and not target.exists():
            os.replace(entry, target)  # killed between the two renames of _swap_in_slowly: put it back
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def remove_folder(path):
    """Delete a folder by renaming it aside first: a kill midway leaves a temporary that the next
    write to `path` removes, never half a folder under its name."""
    path = Path(path)
    aside = _temp_sibling(path)
    os.replace(path, aside)
    shutil.rmtree(aside)


@contextmanager
def atomic_path(path, *, overwrite: bool = True):
    """Yield a temporary path (same name, in a private folder beside `path`); on success fsync it
    and rename it over `path`. Writers that make temporaries of their own (safetensors does) make
    them in that folder too, so a kill leaves nothing that the next write cannot identify and remove.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    workdir = _temp_sibling(path)
    workdir.mkdir()
    tmp = workdir / path.name
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        mode = tmp.stat().st_mode  # 0o666 & ~umask, as open() gives
        yield tmp
        os.chmod(tmp, mode)  # some writers (safetensors) recreate the file as 0o600
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def save_safetensors(state_dict: dict, path, metadata: Optional[dict] = None, *, overwrite: bool = True):
    """Write tensors atomically; tensors sharing memory (tied weights) are stored once each."""
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for key, value in state_dict.items():
        value = value.detach().contiguous().cpu()
        storage = value.untyped_storage().data_ptr()
        tensors[key] = value.clone() if storage in seen else value  # safetensors refuses shared memory
        seen.add(storage)
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def save_json(obj, path, *, overwrite: bool = True):
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2); False where that is not supported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if os.name == "posix" else None
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in_slowly(tmp: Path, dst: Path):
    """Two renames where no atomic swap exists: a kill between them leaves dst absent for a moment,
    and remove_stale_temps(dst) puts the old folder back."""
    old = dst.with_name(tmp.name[: -len(".tmp")] + ".old")
    os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def _keep_others(old: Path, new: Path, own: tuple):
    """Put into `new` every entry of `old` that the writer did not write and that is not one of the
    output's `own` names: a user's notes or images in a model folder survive `--overwrite`. Files are
    hard-linked where the filesystem allows (no copy, and the originals stay in `old` until the swap)."""
    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for entry in old.iterdir():
        target = new / entry.name
        if entry.name in own or target.exists() or target.is_symlink():
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=link)
        else:
            link(entry, target)


@contextmanager
def atomic_folder(dst, *, overwrite: bool = False, kind: str = MODEL_KIND, marker: bool = False):
    """Yield a temporary folder beside `dst`; on success it replaces `dst` in one rename.

    With `overwrite`, only an empty folder or one of the same `kind` (see `folder_kind`) is
    replaced, and only its own files: entries the writer did not write (and, for a model, that
    are not MODEL_FILES) are kept. `marker` writes the kind into the new folder for outputs
    without a config.json.
    A crash or error leaves `dst` as it was (absent, or the previous version); the temporary
    folder a kill leaves behind is removed by the next write to `dst`.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it")
    check_replaceable(dst, kind)
    tmp = _temp_sibling(dst)
    tmp.mkdir()
    try:
        if marker:
            (tmp / OUTPUT_MARKER).write_text(kind + "\n")
        yield tmp
        if dst.is_dir():
            _keep_others(dst, tmp, MODEL_FILES if kind == MODEL_KIND else ())
        for entry in sorted(tmp.rglob("*"), reverse=True):  # files before the folders holding them
            _fsync(entry)
        _fsync(tmp)
        if not dst.exists():
            os.rename(tmp, dst)
        elif not _exchange(tmp, dst):
            _swap_in_slowly(tmp, dst)
        _fsync(dst.parent)
    finally:
        if tmp.exists():  # the unfinished folder, or after the swap the previous version
            shutil.rmtree(tmp, ignore_errors=True)
