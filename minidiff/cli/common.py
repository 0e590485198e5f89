"""What every command shares: one-line errors, flag names in messages, output and package checks, threads."""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Optional

# No torch at import time: `minidiff --version` and usage errors answer at once.


# -- what every command shares -----------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit 2), not a usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


# Errors a user's input can cause; anything else is a bug and keeps its traceback.
# (CheckpointError and json.JSONDecodeError are ValueErrors; FileNotFoundError etc. are OSErrors.)
USER_ERRORS = (ValueError, OSError, FloatingPointError, ImportError)

# Library messages name API parameters; the CLI names the flag that sets them. Each API name maps to
# the flag destinations that may carry it in some command (the first one a command has wins).
API_NAMES = {
    "class_labels": ("class_labels", "class_label"),
    "guidance_scale": ("guidance_scale", "guidance"),
    "cache_interval": ("cache_interval", "interval"),
    "cache_branch": ("cache_branch", "branch"),
    "cache_schedule": ("cache_schedule", "schedule"),
    "batch_size": ("batch_size", "batch"),
    "negative_prompt": ("negative_prompt",),
}
LITERALS = {"TrainConfig: ": "", "prompt='...'": '--prompt "..."'}  # API phrasing with a CLI form


def cli_message(error: BaseException, parser: Optional[argparse.ArgumentParser] = None) -> str:
    """One line for `error`, with the API parameter names it mentions replaced by this command's flags."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    text = " ".join(text.split())
    for old, new in LITERALS.items():
        text = text.replace(old, new)
    if parser is None:
        return text
    flags = _flags(parser)
    names = {dest: flag for dest, flag in flags.items() if "_" in dest}
    for api, dests in API_NAMES.items():
        flag = next((flags[d] for d in dests if d in flags), None)
        if flag:
            names[api] = flag
    plain = {dest: flag for dest, flag in flags.items() if "_" not in dest}
    text = re.sub(r"(?<![\w.-])([a-z]+(?:_[a-z]+)+)\b(?!\.\w)", lambda m: names.get(m[1], m[1]), text)
    # one-word parameters only where they are plainly named: a clause's subject ("steps must be ...") or "seed=3"
    text = re.sub(r"(^|[:;(]\s*)([a-z]+)\b(?=( and [\w-]+)? must\b)", lambda m: m[1] + plain.get(m[2], m[2]),
                  text)
    text = re.sub(r"(?<![\w.-])([a-z]+)(?==)", lambda m: plain.get(m[1], m[1]), text)
    return re.sub(r"(--[a-z][\w-]*)=True\b", r"\1", text)  # a switch is given by its name alone


def _flags(parser: argparse.ArgumentParser) -> dict:
    """dest -> its long option (`--class`), over the parser and its sub-commands."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.update({k: v for k, v in _flags(sub).items() if k not in found})
        longs = [s for s in action.option_strings if s.startswith("--")]
        if longs and action.dest not in ("help", "version"):
            found.setdefault(action.dest, longs[0])
    return found


def check_output(path, kind: str, flag: str = "--out", *, overwrite: Optional[bool] = None) -> Path:
    """Refuse, before any work, an output that cannot be written: `kind` is "folder", "image" (a suffix
    in IMAGE_FORMATS) or "json". The nearest existing folder above it must take new files (tried by
    creating one). An existing image is replaced only with `overwrite` (None: a command's own fixed
    names, replaced freely), and never a file that is not an image."""
    from ..writing import unwritable
    from ..images import IMAGE_FORMATS

    path = Path(path)
    if kind == "folder":
        if path.exists() and not path.is_dir():
            raise ValueError(f"{flag} {path} is a file; it must name a folder (the command writes several files "
                             "into it)")
    else:
        suffixes = list(IMAGE_FORMATS) if kind == "image" else [".json"]
        if path.is_dir():
            raise ValueError(f"{flag} {path} is a folder; give a file name in it, e.g. {path / ('out' + suffixes[0])}")
        if path.suffix.lower() not in suffixes:
            raise ValueError(f"{flag} {path}: minidiff writes {'images' if kind == 'image' else 'this file'} as "
                             f"{' or '.join(suffixes)}, not {path.suffix or 'a name without suffix'}; change the name")
        if path.exists() and not os.access(path, os.W_OK):
            raise ValueError(f"{flag} {path} exists and is not writable")
        if kind == "image" and path.exists():
            check_replaceable_image(path, flag, overwrite)
    above = path if kind == "folder" else path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise ValueError(f"{flag} {path} cannot be created: {above} is a file, not a folder")
    why = unwritable(above)
    if why:
        raise ValueError(f"{flag} {path} cannot be written: {why}")
    return path


IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # PNG, JPEG


def check_replaceable_image(path: Path, flag: str, overwrite: Optional[bool]):
    """An existing output image may be replaced with --overwrite (or, `overwrite` None, always); a file
    that is not a PNG or JPEG whatever its name never is."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ValueError(f"{flag} {path} exists and cannot be read ({e.strerror})") from None
    if not head.startswith(IMAGE_SIGNATURES):
        raise FileExistsError(f"{flag} {path} exists and is not an image (PNG or JPEG); it was left as it is. "
                              "Choose another name")
    if overwrite is False:
        raise FileExistsError(f"{flag} {path} exists; pass --overwrite to replace it, or choose another name")


def check_ints(args, limits: dict):
    """Each option in `limits` ({flag: (dest, low, high)}) that was given lies in [low, high]
    (every value of a list option): one line naming the flag, before any work."""
    for flag, (dest, low, high) in limits.items():
        value = getattr(args, dest, None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and not low <= v <= high:
                raise ValueError(f"{flag} must be an int in [{low}, {high}], got {v}")


def check_fractions(args, limits: dict):
    """As `check_ints` for numbers in a half-open range (low, high]: {flag: (dest, low, high)}."""
    import math

    for flag, (dest, low, high) in limits.items():
        value = getattr(args, dest, None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and not (math.isfinite(v) and low < v <= high):
                raise ValueError(f"{flag} must be a number in ({low}, {high}], got {v}")


def check_device(text: Optional[str], flag: str = "--device"):
    """A device this torch can use, refused in one line before the model is loaded."""
    if text is None:
        return
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} {text!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = "" if torch.version.cuda else " (this torch is built without CUDA)"
            raise ValueError(f"{flag} {text}: no CUDA GPU is available{built}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {text}: there are {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{flag} {text}: MPS (Apple GPU) is not available here; use --device cpu")
    elif device.type != "cpu":
        raise ValueError(f"{flag} {text}: minidiff runs on cpu, cuda or mps")


# Optional packages: import name -> (what pip calls it, the minidiff extra that brings it)
EXTRAS = {"PIL": ("pillow", "image"), "matplotlib": ("matplotlib", "plot"), "sklearn": ("scikit-learn", "data")}


def require(module: str, why: str):
    """Refuse up front when an optional package a command will need is missing."""
    if importlib.util.find_spec(module) is None:
        package, extra = EXTRAS[module]
        raise ImportError(f"{why} needs {package}, which is not installed: pip install 'minidiff[{extra}]' "
                          f"(or pip install {package})")


def default_threads() -> int:
    """Threads for torch when --threads is not given: the CPUs this process may use, at most the
    physical cores and 4 (small models gain little beyond), fewer when the load average says others
    are busy on them: OpenMP threads that wait for a busy core stall the whole step."""
    usable = usable_cpus()
    physical = _physical_cores() or usable
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    idle = int(usable - load)
    return max(1, min(usable, physical, 4, idle))


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _physical_cores() -> Optional[int]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores = set(re.findall(r"physical id\s*:\s*(\d+)[\s\S]*?core id\s*:\s*(\d+)", text))
    return len(cores) or None


def set_threads(threads: Optional[int]) -> int:
    """Apply --threads (None: `default_threads`, 0: torch's own choice); returns the count in use."""
    import torch

    if threads is None:
        threads = default_threads()
    if threads < 0:
        raise ValueError(f"--threads must be 0 (torch's choice) or more, got {threads}")
    usable = usable_cpus()
    if threads > usable:  # more threads than CPUs only wait for each other, and load the whole machine
        print(f"warning: --threads {threads} is more than the {usable} CPU(s) this process may use; using {usable}",
              file=sys.stderr)
        threads = usable
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _threads_arg(p: argparse.ArgumentParser, default=None):
    p.add_argument("--threads", type=int, default=default,
                   help="torch CPU threads (default: free cores, at most 4; 1 on a busy machine; 0: torch's choice)")


MAX_SCALE = 64


def _scale_arg(p: argparse.ArgumentParser):
    p.add_argument("--scale", type=int, help=f"enlarge each image this many times (1-{MAX_SCALE}), nearest neighbour "
                   "(default: tiles of at least 128 px; 1: the model's own size)")


def resolve_classes(pipe, tokens, flag: str = "--class") -> Optional[list]:
    """Class labels from numbers or the names stored in the model; the null class is refused."""
    if tokens is None:
        return None
    if pipe.denoiser.config.num_classes is None:
        raise ValueError(f"this model is not class-conditional; drop {flag}")
    count = pipe.num_real_classes()
    names = [str(n) for n in (pipe.class_names or [])][:count]
    known = ", ".join(f"{i}: {n}" if n != str(i) else str(i) for i, n in enumerate(names)) or f"0-{count - 1}"
    labels = []
    for token in map(str, tokens):
        if token in names:
            label = names.index(token)
        else:
            try:
                label = int(token)
            except ValueError:
                raise ValueError(f"{flag} {token!r} is neither a class number nor a class name of this model "
                                 f"({known})") from None
        if label == pipe.null_class:
            raise ValueError(f"{flag} {label} is the null class, the 'no class' input of classifier-free guidance; "
                             f"choose a class in 0-{count - 1}")
        if not 0 <= label < count:
            raise ValueError(f"{flag} {label} is out of range: this model's classes are {known}")
        labels.append(label)
    return labels


def _load(args, **kwargs):
    """The model of --model. A damaged calibration.json is not announced here: `info` reports it, and
    the calibrated schedule refuses with the same sentence (said once, as an error)."""
    from ..pipeline import load

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load(args.model, **kwargs)
    for w in caught:
        if not (pipe.calibration_error and str(w.message).startswith(pipe.calibration_error)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return pipe


def one_line_warnings():
    """Warnings as one line `warning: ...` on stderr, not Python's file, line number and source line."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {' '.join(str(message).split())}", file=file or sys.stderr)

    warnings.showwarning = show
