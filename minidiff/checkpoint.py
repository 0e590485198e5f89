"""Reading untrusted weight files safely and writing files so that a crash never leaves half of one.

- `.safetensors` is read memory-mapped; a truncated or corrupt file is a clear error.
- `.ckpt` / `.pt` / `.pth` / `.bin` pickles go through `torch.load(weights_only=True)`, which refuses
  to build anything but tensors and plain containers, so no code in the file can run.
- State dicts are checked key by key (missing, unexpected, mis-shaped) before any weight is assigned.
- Writes go to a temporary file in the destination folder, are fsynced, then renamed into place.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

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


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path} is truncated ({size} bytes): a safetensors file starts with an 8-byte "
                              "header length")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    if header_len > min(size - 8, 100_000_000):
        raise CheckpointError(f"{path} is corrupt or truncated: its header claims {header_len} bytes but the file "
                              f"has {size}")
    try:
        return load_file(str(path))  # memory-mapped by safetensors; tensors are copied lazily by the OS
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file (corrupt or truncated?): {e}") from None


def _read_pickle(path: Path) -> dict:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} needs more than tensors to load (it would run code from the file), so it was refused. "
            f"Only plain weight pickles are read. Details: {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path} could not be read (corrupt or truncated?): {e}") from None
    while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}


def check_finite(state_dict: dict, what: str = "state dict"):
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{what}: {len(bad)} tensor(s) contain NaN or Inf, e.g. {bad[:5]}; the file is "
                              "damaged (pass allow_nan=True / --allow-nan to load it anyway)")


def _listing(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}{f', ... ({len(keys) - limit} more)' if len(keys) > limit else ''}"


def check_state_dict(module: nn.Module, state_dict: dict, what: str = "model"):
    """Raise a CheckpointError listing missing, unexpected and mis-shaped keys; assign nothing."""
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


# -- writing ----------------------------------------------------------------------------------------

def _fsync_dir(path: Path):
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


@contextmanager
def atomic_path(path, *, overwrite: bool = True):
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_safetensors(state_dict: dict, path, metadata: Optional[dict] = None, *, overwrite: bool = True):
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def save_json(obj, path, *, overwrite: bool = True):
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_folder(dst, *, overwrite: bool = False):
    """Yield a temporary folder beside `dst`; on success it replaces `dst` in one rename.

    A crash or error leaves `dst` as it was (absent, or the previous version).
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
