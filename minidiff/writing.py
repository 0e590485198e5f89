"""Writing files so that a crash never leaves half of one, and which folders a write may replace.

Writes go to a temporary sibling `.NAME.PID.RANDOM.tmp`, are fsynced, then renamed into place; a
folder replaces the old one in a single atomic exchange where the OS has one (Linux). A killed
writer leaves at most such a temporary, which the next write to NAME removes; loading ignores it.
`--overwrite` replaces only an empty folder or a previous output of the same kind, and keeps a
user's own files in it; nothing is written over or around the folder a model is read from.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from .checkpoint import CheckpointError, _listing


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
