"""The `minidiff` command line: every front end (sample, demo, info, train, analyze, bench, toy-metric, convert).

Library modules do not parse arguments; each command here is a parser function and a run function
in `COMMANDS`. `run` gives every command the same edge: usage errors and user errors as one line
(`error: ...`, exit 2 and 1), flags named as the user typed them, the thread count set, and output
paths and optional packages checked before any work starts.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .grid import IMAGE_FORMATS
from .samplers import SAMPLERS


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
    text = re.sub(r"(^|[:;(]\s*)([a-z]+)\b(?= must\b)", lambda m: m[1] + plain.get(m[2], m[2]), text)
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


def check_output(path, kind: str, flag: str = "--out") -> Path:
    """Refuse, before any work, an output that cannot be written: `kind` is "folder", "image" (a suffix
    in IMAGE_FORMATS) or "json". The nearest existing folder above it must be one we may write in."""
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
    above = path if kind == "folder" else path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise ValueError(f"{flag} {path} cannot be created: {above} is a file, not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path} cannot be written: no permission to write in {above}")
    return path


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
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    physical = _physical_cores() or usable
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    idle = int(usable - load)
    return max(1, min(usable, physical, 4, idle))


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
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _threads_arg(p: argparse.ArgumentParser, default=None):
    p.add_argument("--threads", type=int, default=default,
                   help="torch CPU threads (default: free cores, at most 4; 1 on a busy machine; 0: torch's choice)")


def _scale_arg(p: argparse.ArgumentParser):
    p.add_argument("--scale", type=int, help="enlarge each image this many times, nearest neighbour (default: tiles "
                   "of at least 128 px; 1: the model's own size)")


def resolve_classes(pipe, tokens, flag: str = "--class") -> Optional[list]:
    """Class labels from numbers or the names stored in the model; the null class is refused."""
    if tokens is None:
        return None
    if pipe.unet.config.num_classes is None:
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
    from .pipeline import load

    return load(args.model, **kwargs)


# -- sample ------------------------------------------------------------------------------------------

def _sample_parser() -> Parser:
    p = Parser(prog="minidiff sample", description="Sample a model, optionally with caching.")
    p.add_argument("--model", required=True, help="minidiff model folder (see convert/ for public checkpoints)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (ddim only)")
    p.add_argument("--karras-sigmas", action="store_true", help="Karras et al. 2022 noise levels "
                   "(euler, heun, dpmpp_2m, unipc)")
    p.add_argument("--cache-interval", type=int, default=1, help="N: one full U-Net step every N steps")
    p.add_argument("--cache-branch", type=int, default=0, help="skip connection the shallow path keeps")
    p.add_argument("--cache-schedule", default="uniform", choices=["uniform", "nonuniform", "calibrated", "adaptive"])
    p.add_argument("--cache-forecast", default=None, choices=[0, 1, 2, "auto"],
                   type=lambda v: v if v == "auto" else int(v) if v.isdigit() else v,
                   help="0: reuse the cached deep feature; 1, 2: extrapolate it through the last 2 or 3 full "
                        "steps; auto: 2 for deterministic samplers, 0 for noisy ones (default: 0; auto if adaptive)")
    p.add_argument("--cache-threshold", type=float, help="adaptive: relative L1 staleness that triggers a refresh")
    p.add_argument("--cache-budget", type=float, help="adaptive: most MACs per sample, as a fraction of uncached")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images (default: one per class on a class model, one per prompt, else 4)")
    p.add_argument("--class", dest="class_labels", nargs="+", metavar="CLASS",
                   help="class number(s) or name(s) (`minidiff info` lists them); default: one image per class")
    p.add_argument("--prompt", nargs="+", help="text prompt(s) for text-conditioned models")
    p.add_argument("--negative-prompt", help="what guidance steers away from (needs --guidance-scale above 1)")
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--out", default="out/sample.png", help=f"image file ({', '.join(IMAGE_FORMATS)})")
    _scale_arg(p)
    p.add_argument("--allow-nan", action="store_true", help="load weights even if they contain NaN/Inf")
    _threads_arg(p)
    return p


def _sample(args) -> int:
    check_output(args.out, "image")
    require("PIL", "writing images")
    if args.negative_prompt is not None and not (args.guidance_scale or 0) > 1:
        raise ValueError("--negative-prompt acts only through classifier-free guidance, which is off; add "
                         "--guidance-scale above 1 (e.g. 7.5) or drop --negative-prompt")
    import torch

    from .cache import mac_bound
    from .data import save_grid
    from .grid import class_titles

    pipe = _load(args, device=args.device, dtype=getattr(torch, args.dtype), allow_nan=args.allow_nan)
    if args.negative_prompt is not None and pipe.text_encoder is None:
        raise ValueError("this model takes no prompt, so --negative-prompt would be ignored; drop it")
    labels = resolve_classes(pipe, args.class_labels)
    per_class = labels is None and pipe.unet.config.num_classes is not None
    if per_class:  # one image per class, as the demo does
        labels = pipe.default_labels(args.batch_size or pipe.num_real_classes())
    batch = args.batch_size or (len(labels) if labels else len(args.prompt) if args.prompt else 4)
    if labels and len(labels) == 1:
        labels = labels * batch
    prompt = args.prompt[0] if args.prompt and len(args.prompt) == 1 else args.prompt
    images = pipe.generate(steps=args.steps, sampler=args.sampler, eta=args.eta, karras_sigmas=args.karras_sigmas,
                           cache_interval=args.cache_interval, cache_branch=args.cache_branch,
                           cache_schedule=args.cache_schedule, cache_forecast=args.cache_forecast,
                           cache_threshold=args.cache_threshold, cache_budget=args.cache_budget,
                           seed=args.seed, batch_size=batch,
                           class_labels=labels, prompt=prompt, negative_prompt=args.negative_prompt,
                           guidance_scale=args.guidance_scale, height=args.height, width=args.width)
    classes = pipe.num_real_classes() if per_class else 0
    nrow = classes if 0 < classes <= 16 else math.ceil(math.sqrt(images.shape[0]))
    save_grid(images, args.out, nrow=nrow, scale=args.scale, captions=class_titles(pipe.class_names, labels) if labels else None)
    run = pipe.last_run
    ratio = run.shallow_ratio
    print(f"wrote {args.out}: {images.shape[0]} images, {run.model_calls} U-Net calls ({run.full_calls} full, "
          f"{run.shallow_calls} shallow at branch {args.cache_branch}), {run.seconds:.2f} s on "
          f"{torch.get_num_threads()} thread(s); shallow/full MACs {ratio:.3f}, MAC bound on speedup "
          f"{1 / run.mac_fraction:.2f}x (uniform N={args.cache_interval}: "
          f"{mac_bound(1, args.cache_interval - 1, ratio):.2f}x)")
    print(f"MACs {run.mac_fraction:.3f} of the uncached run, forecast order {run.forecast}; full steps per sample: "
          + "; ".join(f"{i}: {steps}" for i, steps in enumerate(run.full_steps_per_sample)))
    return 0


def _example_cond(pipe):
    """A conditioning input of batch 1 shaped as the U-Net expects, for counting MACs."""
    import torch

    cfg = pipe.unet.config
    if cfg.num_classes is not None:
        return torch.zeros(1, dtype=torch.long, device=pipe.device)
    if cfg.context_dim is not None:
        return torch.zeros(1, 77, cfg.context_dim, device=pipe.device, dtype=pipe.dtype)
    return None


# -- demo --------------------------------------------------------------------------------------------

def _demo_parser() -> Parser:
    from . import demo

    p = Parser(prog="minidiff demo", description=demo.__doc__.splitlines()[0])
    p.add_argument("--model", help=f"native model folder (default: the shipped weights/{demo.DEFAULT_MODEL})")
    p.add_argument("--classifier", help=f"toy-metric classifier folder (default: weights/{demo.DEFAULT_CLASSIFIER}); "
                                        "'none' skips the metrics")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--interval", type=int, default=5, help="cache interval N: a full U-Net call every N steps")
    p.add_argument("--branch", type=int, default=0, help="cache branch (0: shallowest skip, the cheapest)")
    p.add_argument("--schedule", default="uniform", choices=("uniform", "nonuniform", "calibrated"),
                   help="which steps run in full (calibrated: from the model's calibration.json)")
    p.add_argument("--per-class", type=int, default=4, help="samples per class (default 4: a 40-image grid)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="time each setting this many times (interleaved), keep the "
                                                            "fastest (default 3: a shared machine is noisy)")
    p.add_argument("--sweep", action="store_true", help="also run N = 2, 3, 5, 10, uniform and non-uniform "
                                                         "(N = 1 is the uncached run)")
    p.add_argument("--out", default="out", help="folder for the PNG grids (default out/)")
    _scale_arg(p)
    _threads_arg(p)
    return p


def _demo(args) -> int:
    from . import demo

    for name in ("per_class", "repeats", "interval", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    check_output(args.out, "folder")
    require("PIL", "writing the demo's images")
    settings = {k: v for k, v in vars(args).items() if k not in ("threads", "argv")}
    demo.demo(**settings, threads=0)  # `run` has set the threads
    return 0


# -- info --------------------------------------------------------------------------------------------

def _info_parser() -> Parser:
    p = Parser(prog="minidiff info", description="What a model folder holds and what it takes.")
    p.add_argument("--model", required=True, help="minidiff model folder")
    _threads_arg(p)
    return p


def _info(args) -> int:
    import torch

    pipe = _load(args)
    cfg, sch = pipe.unet.config, pipe.scheduler

    def millions(module):
        return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f}M"

    kind = ("class-conditional" if cfg.num_classes is not None else
            "text-conditional" if pipe.text_encoder is not None else "unconditional")
    space = "latent" if pipe.autoencoder is not None else "pixel-space"
    print(f"{args.model}: {kind} {space} diffusion model")
    parts = [f"U-Net {millions(pipe.unet)}"] + [f"{name} {millions(m)}" for name, m in
                                                (("autoencoder", pipe.autoencoder), ("text encoder", pipe.text_encoder))
                                                if m is not None]
    print(f"  parameters:  {', '.join(parts)}")
    size, latent = pipe.default_size, cfg.sample_size or 32
    channels = pipe.autoencoder.config.out_channels if pipe.autoencoder is not None else cfg.out_channels
    extra = f" from {latent}x{latent}x{cfg.in_channels} latents" if pipe.autoencoder is not None else ""
    print(f"  samples:     {size}x{size} px, {channels} channel(s){extra}; --height/--width in multiples of "
          f"{pipe.latent_scale * cfg.downsample_factor}")
    print(f"  schedule:    {sch.num_train_timesteps} training steps, {sch.beta_schedule} betas, predicts "
          f"{sch.prediction_type}")
    if cfg.num_classes is not None:
        names = [str(n) for n in (pipe.class_names or [])]
        count = pipe.num_real_classes()
        listed = ", ".join(f"{i}: {names[i]}" if i < len(names) and names[i] != str(i) else str(i)
                           for i in range(min(count, 20))) + (" ..." if count > 20 else "")
        guidance = (f"null class {pipe.null_class} (for --guidance-scale)" if pipe.null_class is not None
                    else "no null class, so no guidance")
        print(f"  classes:     {count} ({listed}); --class takes a number{' or a name' if names else ''}; {guidance}")
    else:
        print("  classes:     none")
    print(f"  text:        {'yes: --prompt, and --negative-prompt with --guidance-scale' if pipe.text_encoder else 'no'}")
    x = torch.zeros(1, cfg.in_channels, latent, latent)
    ratios = []
    for b in range(pipe.unet.num_branches):
        macs = pipe.unet.macs(x, 500, _example_cond(pipe), branch=b)
        ratios.append(f"{b}: {macs['shallow'] / macs['full']:.3f}")
        full = macs["full"]
    print(f"  branches:    0-{pipe.unet.num_branches - 1} (--cache-branch); full step {full / 1e9:.3f} GMACs at "
          f"{size}x{size}; shallow/full MACs per branch:")
    for start in range(0, len(ratios), 8):
        print("               " + "  ".join(ratios[start:start + 8]))
    cal = pipe.calibration
    if cal is None:
        print("  calibration: none (minidiff analyze calibrate --model ... writes one; --cache-schedule calibrated "
              "needs it)")
    else:
        print(f"  calibration: {cal.get('sampler')} {cal.get('steps')} steps, cost '{cal.get('cost')}', branches "
              f"{' '.join(sorted(cal.get('segments', {}), key=int))}, default branch {cal.get('branch')}")
    training = pipe.meta.get("training")
    if isinstance(training, dict):
        config = training.get("config", {})
        print(f"  training:    {config.get('dataset')} at {config.get('image_size')} px, step {training.get('step')}, "
              f"{training.get('seconds')} s")
    return 0


# -- train -------------------------------------------------------------------------------------------

TRAIN_FLAG_HELP = {
    "dataset": "'digits', 'shapes' or a folder of images with one sub-folder per class (default digits)",
    "image_size": "training resolution in pixels (default 32)",
    "channels": "1 or 3 (default: the dataset's own)",
    "batch_size": "global batch, split across torchrun processes (default 64)",
    "label_dropout": "probability a label becomes the null class, for classifier-free guidance (default 0.1)",
    "steps": "train until this step; may grow on --resume (default 4000)",
    "sample_every": "write a sample grid and the loss plot every N steps, 0 for never (default 500)",
    "grid_scale": "enlarge the sample grids' images this many times (default 0: tiles of at least 128 px)",
    "out_dir": "run folder: checkpoint/, samples/, loss.csv, loss.png (default runs/digits)",
}


def _train_parser() -> Parser:
    from dataclasses import fields

    from .train import PRESETS, TrainConfig

    p = Parser(prog="minidiff train", description="Train a small diffusion U-Net (DDPM epsilon loss).",
               argument_default=argparse.SUPPRESS)
    p.add_argument("--preset", choices=sorted(PRESETS), help="model size; explicit model flags override it")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR (a run's out_dir or its checkpoint/)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an out_dir holding a run, deleting "
                   "its checkpoint, sample grids and loss log")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        text = TRAIN_FLAG_HELP.get(f.name, f"default {f.default}")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        elif isinstance(f.default, tuple):
            p.add_argument(flag, type=_int_tuple, metavar="N,N,...", help=f"default {','.join(map(str, f.default))}")
        elif f.name == "channels":
            p.add_argument(flag, type=int, choices=(1, 3), help=text)
        else:
            p.add_argument(flag, type=type(f.default), help=text)
    _threads_arg(p, default=argparse.SUPPRESS)
    return p


def _int_tuple(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,2, got {text!r}") from None


def _train(args):
    """Flags mirror TrainConfig; with --resume, unspecified flags come from the checkpoint."""
    from .config import config_from_dict
    from .train import PRESETS, TrainConfig, TrainingInterrupted, checkpoint_dir, train

    args = {k: v for k, v in vars(args).items() if k not in ("threads", "argv")}
    resume = args.pop("resume", None)
    overwrite = args.pop("overwrite", False)
    settings: dict = {}
    if resume is not None:
        settings = json.loads((checkpoint_dir(resume) / "train_state.json").read_text())["config"]
    settings.update(PRESETS.get(args.pop("preset", None), {}))
    settings.update(args)
    config = config_from_dict(TrainConfig, settings)
    if resume is not None:
        check_output(resume, "folder", "--resume")  # a resumed run writes where it was resumed from
    else:
        check_output(config.out_dir, "folder", "--out-dir")
    if config.sample_every:
        require("PIL", "writing sample grids (pass --sample-every 0 to skip them)")
    if config.dataset == "digits":
        require("sklearn", "the digits dataset")
    try:
        return train(config, resume=resume, overwrite=overwrite)
    except TrainingInterrupted as stopped:  # already said where the checkpoint is and how to resume
        raise SystemExit(stopped.exit_code) from None


# -- toy metric --------------------------------------------------------------------------------------

def _toy_metric_parser() -> Parser:
    p = Parser(prog="minidiff toy-metric",
               description="Train the toy-metric classifier (not Inception FID) for a dataset.")
    p.add_argument("--dataset", default="digits", help="'digits', 'shapes' or a folder (default digits)")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--channels", type=int, choices=(1, 3), default=None)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors, "
                                                "reference.safetensors)")
    p.add_argument("--overwrite", action="store_true")
    _threads_arg(p)
    return p


def _toy_metric(args):
    """Train the toy classifier for a dataset and save it (weights, config, reference statistics)."""
    out = check_output(args.out, "folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    if args.dataset == "digits":
        require("sklearn", "the digits dataset")
    from .data import load_dataset
    from .metrics import train_metric

    data = load_dataset(args.dataset, args.image_size, args.channels)
    metric, info = train_metric(data, epochs=args.epochs, seed=args.seed)
    command = "minidiff toy-metric " + " ".join(args.argv)
    metric.save(args.out, overwrite=args.overwrite, meta={"dataset": data.source, "trained_by": command, **info})
    print(f"test accuracy {info['test_accuracy']:.4f}; real-vs-real toy FID (class-balanced sets of n) "
          f"{info['reference_fd_balanced']}; saved {args.out}")
    return metric


# -- analyze -----------------------------------------------------------------------------------------

def _model_args(p: argparse.ArgumentParser, batch: int = 8):
    p.add_argument("--model", required=True, help="minidiff model folder")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--batch", type=int, default=batch, help="images per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class", dest="class_label", help="class number or name (default: one of each class)")
    p.add_argument("--prompt", help="prompt for text-conditioned models")
    p.add_argument("--guidance-scale", type=float)
    _threads_arg(p)


def _sampler_option_args(p: argparse.ArgumentParser):
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (ddim only; > 0 draws noise every step)")
    p.add_argument("--karras-sigmas", action="store_true", help="Karras et al. 2022 noise levels "
                   "(euler, heun, dpmpp_2m, unipc)")


def _classifier_arg(p: argparse.ArgumentParser):
    p.add_argument("--classifier", help="toy-metric classifier folder (default: DATASET-classifier beside the model)")


def _add_recording(sub, name: str, text: str):
    q = sub.add_parser(name, help=text, description=text)
    _model_args(q)
    q.add_argument("--layers", nargs="+", help="layer names (enc.i, mid, dec.i); default all")
    q.add_argument("--pool", type=int, help="average-pool each map to POOL x POOL first")
    q.add_argument("--project", type=int, default=4096, help="hash features to at most this many dims "
                   "(bounds memory; 0 keeps them whole)")
    q.add_argument("--out", default=f"out/{name}", help="folder for the outputs")


def _add_switch(sub):
    q = sub.add_parser("switch", help="change the class/prompt at step k and measure what follows")
    _model_args(q)
    _classifier_arg(q)
    q.add_argument("--from", dest="old", required=True, help="class (number or name) or prompt before the switch")
    q.add_argument("--to", dest="new", required=True, help="class (number or name) or prompt after the switch")
    q.add_argument("--at", type=int, nargs="+", help="switch steps (default 0, S/10, 2S/10, ...)")
    q.add_argument("--layers", nargs="+", help="deep layers to follow (default mid and a middle cached feature)")
    q.add_argument("--out", default="out/switch", help="folder for the outputs")


def _add_calibrate(sub):
    from .calibration import COSTS

    q = sub.add_parser("calibrate", help="measure cache reuse costs; write calibration.json into the model folder")
    _model_args(q)
    q.add_argument("--branch", type=int, default=0, help="the branch --cache-schedule calibrated uses by default")
    q.add_argument("--branches", type=int, nargs="+", help="all branches to measure (default 0 1 2 3)")
    _sampler_option_args(q)
    q.add_argument("--cost", default="output", choices=sorted(COSTS),
                   help="output: how far the final sample moves when a segment reuses the cache, measured by "
                        "rolling the sampler out (default); feature: the cached feature's own drift")
    q.add_argument("--out", help="where to write (default: MODEL/calibration.json, which the model then uses)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing calibration")


def _analyze_parser() -> Parser:
    p = Parser(prog="minidiff analyze", description="Measure how a model's features change "
               "between denoising steps (DeepCache's premise) and calibrate cache schedules.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_recording(sub, "similarity", "step x step cosine similarity of layer outputs (heatmaps, .npz, summary)")
    _add_recording(sub, "depth", "adjacent-step similarity against depth: skip 0 .. bottleneck .. back up")
    _add_switch(sub)
    _add_calibrate(sub)
    _add_probe(sub)
    return p


def _add_probe(sub):
    q = sub.add_parser("probe", help="linear probes of the class label at every layer and timestep",
                       description="Linear probes of the class label from every recorded layer at every timestep, "
                                   "on real digits noised to x_t and along sampling runs, with the model "
                                   "conditioned on the null class.")
    q.add_argument("--model", required=True, help="class-conditional minidiff model folder with a null class")
    q.add_argument("--out", default="out/probe", help="folder for probe.csv, heatmaps and summary.txt")
    q.add_argument("--timesteps", type=int, nargs="+", default=[999, 900, 800, 700, 600, 500, 400, 300, 200, 100,
                                                                  50, 0])
    q.add_argument("--count", type=int, help="real digits to use, class-balanced (default all 1,797)")
    q.add_argument("--per-class", type=int, default=20, help="sampling runs per class for trajectory probes")
    q.add_argument("--steps", type=int, default=50, help="DDIM steps of the trajectories")
    q.add_argument("--every", type=int, default=5, help="probe every N-th trajectory step")
    q.add_argument("--no-trajectories", action="store_true")
    q.add_argument("--seed", type=int, default=0)
    _threads_arg(q)


def _probe_checks(args):
    check_output(args.out, "folder")
    require("matplotlib", "the probe heatmaps")
    require("sklearn", "the real digits")


def _probe_cmd(pipe, args) -> int:
    from .probe import run

    run(pipe, args.out, timesteps=args.timesteps, count=args.count, per_class=args.per_class, steps=args.steps,
        every=args.every, seed=args.seed, trajectories=not args.no_trajectories)
    return 0


def _analyze(args) -> int:
    """`minidiff analyze similarity|depth|switch|calibrate|probe ...`"""
    checks = {"similarity": _plot_folder_checks, "depth": _plot_folder_checks, "switch": _plot_folder_checks,
              "calibrate": _calibrate_checks, "probe": _probe_checks}
    commands = {"similarity": _similarity_cmd, "depth": _depth_cmd, "switch": _switch_cmd,
                "calibrate": _calibrate_cmd, "probe": _probe_cmd}
    checks[args.command](args)
    return commands[args.command](_load(args), args)


def _plot_folder_checks(args):
    check_output(args.out, "folder")
    require("matplotlib", "the analysis plots")


def _calibrate_checks(args):
    target = check_output(_calibration_target(args), "json")
    if target.exists() and not args.overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it, or --out FILE.json to write "
                              "elsewhere")


def _calibration_target(args) -> Path:
    return Path(args.out) if args.out else Path(args.model) / "calibration.json"


def _labels_from(args, pipe, batch=None):
    batch = batch or args.batch
    if args.class_label is None:
        return None if pipe.unet.config.num_classes is None else pipe.default_labels(batch)
    return resolve_classes(pipe, [args.class_label]) * batch


def _record_from(args, pipe):
    from . import analysis

    start = time.perf_counter()
    record = analysis.record_features(pipe, steps=args.steps, sampler=args.sampler, layers=args.layers, pool=args.pool,
                                      project=args.project or None, seed=args.seed, batch_size=args.batch,
                                      class_labels=_labels_from(args, pipe), prompt=args.prompt,
                                      guidance_scale=args.guidance_scale)
    print(f"recorded {len(record.features)} layers x {record.num_steps} steps x {args.batch} images "
          f"({record.nbytes / 2 ** 20:.0f} MiB) in {time.perf_counter() - start:.1f}s")
    return record


def _similarity_cmd(pipe, args) -> int:
    from . import analysis, plots

    out = Path(args.out)
    record = _record_from(args, pipe)
    matrices = analysis.similarity_matrices(record)
    summary = analysis.summarize(matrices)
    roles = {name: analysis.layer_role(pipe.unet, name) for name in matrices}
    print(analysis.format_summary(summary, roles=roles))
    analysis.save_matrices(matrices, out / "similarity.npz")
    analysis.write_csv([{"layer": k, **v, "role": roles[k]} for k, v in summary.items()], out / "summary.csv")
    plots.plot_heatmaps(matrices, out / "heatmaps.png", title=f"{args.model}: {args.sampler}, {args.steps} steps")
    print(f"wrote {out / 'similarity.npz'}, {out / 'summary.csv'}, {out / 'heatmaps.png'}")
    return 0


def _depth_cmd(pipe, args) -> int:
    from . import analysis, plots

    out = Path(args.out)
    record = _record_from(args, pipe)
    rows = analysis.depth_profile(analysis.similarity_matrices(record), pipe.unet, record.shapes)
    print(analysis.format_depth(rows))
    analysis.write_csv(rows, out / "depth.csv")
    plots.plot_depth(rows, out / "depth.png", title=f"{args.model}: feature change per step vs depth "
                     f"({args.sampler}, {args.steps} steps)")
    print(f"wrote {out / 'depth.csv'}, {out / 'depth.png'}")
    return 0


def _switch_cmd(pipe, args) -> int:
    from . import analysis, metrics, plots
    from .frontier import format_rows

    out = Path(args.out)
    text = pipe.unet.config.num_classes is None
    old, new = (args.old, args.new) if text else (*resolve_classes(pipe, [args.old], "--from"),
                                                  *resolve_classes(pipe, [args.new], "--to"))
    classifier = None if text else metrics.toy_classifier(pipe, args.model, args.classifier)
    start = time.perf_counter()
    layers = args.layers or ["mid", analysis.cached_layer(pipe.unet, pipe.unet.num_branches // 2)]
    result = analysis.switch_experiment(pipe, old=old, new=new, steps=args.steps, sampler=args.sampler,
                                        at_steps=args.at, batch_size=args.batch, seed=args.seed, layers=layers,
                                        guidance_scale=args.guidance_scale, classifier=classifier)
    rows = result.rows
    columns = sorted({c for r in rows for c in r}, key=_column_order)
    print(format_rows(rows, [c for c in columns if not c.endswith("_final_cos_old")]))
    print(f"{len(rows)} runs in {time.perf_counter() - start:.1f}s")
    analysis.write_csv([{c: r.get(c) for c in columns} for r in rows], out / "switch.csv")
    plots.plot_switch(result, out / "switch.png", layers, title=f"{args.model}: switch {old} -> {new} at step k")
    print(f"wrote {out / 'switch.csv'}, {out / 'switch.png'}")
    return 0


def _column_order(column: str):
    first = ["switch_at", "psnr_vs_old", "psnr_vs_new", "reads_as_old", "reads_as_new"]
    return (first.index(column), "") if column in first else (len(first), column)


def _calibrate_cmd(pipe, args) -> int:
    from . import cache
    from .calibration import calibrate

    target = _calibration_target(args)
    branches = args.branches or [b for b in (0, 1, 2, 3) if b < pipe.unet.num_branches]
    calibration = calibrate(pipe, steps=args.steps, sampler=args.sampler, branch=args.branch, branches=branches,
                            cost=args.cost, batch_size=args.batch, seed=args.seed,
                            class_labels=_labels_from(args, pipe), prompt=args.prompt,
                            guidance_scale=args.guidance_scale, eta=args.eta, karras_sigmas=args.karras_sigmas,
                            progress=True)
    cache.save_calibrated(target, calibration)
    calls = calibration["model_calls"]
    print(f"measured the {args.cost} cost of branches {branches} over {calls} model calls ({args.sampler}, "
          f"{args.steps} steps{', noise drawn from seed ' + str(args.seed) if calibration['draws_noise'] else ''}) "
          f"in {calibration['seconds']:.1f}s; wrote {target}")
    for n in (2, 3, 5, 10):
        if n < calls:
            print(f"  1:{n:<2} ({math.ceil(calls / n)} full steps): "
                  f"{cache.calibrated_full_steps(calibration, calls, n)}")
    return 0


# -- bench -------------------------------------------------------------------------------------------

def _add_frontier(sub):
    from .frontier import SCHEDULES

    q = sub.add_parser("frontier", help="speedup, MAC bound and quality of cache schedules at several budgets, "
                       "against fewer uncached steps at the same MACs")
    _model_args(q)
    _classifier_arg(q)
    _sampler_option_args(q)
    q.set_defaults(seed=1)
    q.add_argument("--samplers", help="several samplers, each NAME or NAME:STEPS (default steps: --steps), e.g. "
                   "ddim:50,dpmpp_2m:20,euler_a:30,plms:50; replaces --sampler. --eta/--karras-sigmas apply to "
                   "those that take them")
    q.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5, 10], help="N: ceil(steps/N) full steps")
    q.add_argument("--branches", type=int, nargs="+", default=[0, 1, 3])
    q.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    q.add_argument("--no-fewer-steps", dest="fewer_steps", action="store_false",
                   help="leave out the baseline rows (fewer uncached steps at each schedule's MACs)")
    q.add_argument("--repeats", type=int, default=2,
                   help="time every run this many times, alternating with the uncached run; keep the best "
                        "(0: no timing, quality only)")
    q.add_argument("--calibration-seed", type=int, default=0,
                   help="noise for calibrating when the model has no calibration.json for a branch")
    q.add_argument("--calibration-batch", type=int, help="images in that calibration run (default: --batch)")
    q.add_argument("--out", default="out/frontier", help="folder for frontier.csv, budgets.md and the plots")


def _add_adaptive(sub):
    q = sub.add_parser("adaptive", help="cached sampling at equal MACs: DeepCache reuse, forecast orders, fixed "
                       "and adaptive schedules, and fewer steps (PSNR vs uncached)")
    q.add_argument("--model", required=True)
    q.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    q.add_argument("--steps", type=int, default=50)
    q.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    q.add_argument("--batch", type=int, default=8)
    q.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    q.add_argument("--branch", type=int, default=0)
    q.add_argument("--plot", help="also draw where the adaptive schedule refreshes (PNG path)")
    _threads_arg(q)


def _bench_parser() -> Parser:
    p = Parser(prog="minidiff bench", description="Benchmarks of cached sampling.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_frontier(sub)
    _add_adaptive(sub)
    return p


FRONTIER_COLUMNS = ["schedule", "branch", "interval", "full_steps", "seconds", "uncached_seconds", "speedup",
                    "mac_speedup", "psnr", "accuracy", "steps"]


def _bench(args) -> int:
    """`minidiff bench frontier|adaptive --model DIR ...`"""
    return {"frontier": _frontier_cmd, "adaptive": _adaptive_cmd}[args.command](args)


def _frontier_cmd(args) -> int:
    """One frontier per sampler, each with its own calibration; rows are printed as they finish."""
    from . import analysis, metrics, plots
    from .checkpoint import atomic_path
    from .frontier import format_budgets, format_rows, frontier, parse_samplers
    from .samplers import SAMPLER_OPTIONS, num_model_calls, sampler_options

    check_output(args.out, "folder")
    require("matplotlib", "the frontier plots")
    if args.repeats < 0:
        raise ValueError(f"--repeats must be 0 (no timing) or more, got {args.repeats}")
    runs = parse_samplers(args.samplers, args.steps) if args.samplers else [(args.sampler, args.steps)]
    pipe = _load(args)
    labels = _labels_from(args, pipe)
    classifier = metrics.toy_classifier(pipe, args.model, args.classifier)
    branches = [b for b in args.branches if 0 <= b < pipe.unet.num_branches]
    if not branches:
        raise ValueError(f"none of the branches {args.branches} exists; this U-Net has branches "
                         f"0-{pipe.unet.num_branches - 1}")
    rows = []
    for sampler, steps in runs:
        given = dict(eta=args.eta, karras_sigmas=args.karras_sigmas)
        if args.samplers:  # several samplers: each takes the options that apply to it
            given = {k: v for k, v in given.items() if k in SAMPLER_OPTIONS[sampler]}
        options = sampler_options(sampler, **given)
        calibration = _frontier_calibration(pipe, args, sampler, steps, options, branches,
                                            num_model_calls(sampler, steps))
        print(f"{sampler}, {steps} steps ({num_model_calls(sampler, steps)} model calls): measuring", flush=True)
        rows += frontier(pipe, steps=steps, sampler=sampler, intervals=args.intervals, branches=args.branches,
                         schedules=args.schedules, batch_size=args.batch, seed=args.seed, class_labels=labels,
                         prompt=args.prompt, guidance_scale=args.guidance_scale, classifier=classifier,
                         calibration=calibration, repeats=args.repeats, baseline=args.fewer_steps,
                         on_row=_progress, **options)
    out = Path(args.out)
    columns = (["sampler"] if args.samplers else []) + FRONTIER_COLUMNS
    print(format_rows(rows, columns))
    analysis.write_csv(rows, out / "frontier.csv")
    written = [out / "frontier.csv"]
    if args.fewer_steps:
        budgets = format_budgets(rows)
        print("\nPSNR (dB) against the uncached run at each budget:\n" + budgets)
        with atomic_path(out / "budgets.md") as tmp:
            tmp.write_text(budgets)
        written.append(out / "budgets.md")
    if not args.samplers:
        written.append(plots.plot_frontier(rows, out / "frontier.png", title=f"{args.model}: {args.sampler}, "
                                           f"{args.steps} steps, batch {args.batch}"))
    written.append(plots.plot_psnr_vs_macs(rows, out / "psnr_vs_macs.png",
                                           title=f"{args.model}: batch {args.batch}, seed {args.seed}"))
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _frontier_calibration(pipe, args, sampler, steps, options, branches, calls):
    """The model's calibration where it was measured for this sampler, options and step count at these
    branches; otherwise a fresh one on --calibration-seed (None when no calibrated schedule is asked)."""
    from .calibration import calibrate
    from .samplers import changed_options

    if "calibrated" not in args.schedules:
        return None
    calibration = pipe.calibration
    if calibration is not None and calibration.get("sampler", sampler) == sampler \
            and calibration.get("sampler_options", {}) == changed_options(options) \
            and calibration.get("model_calls") == calls \
            and all(str(b) in calibration.get("segments", {}) for b in branches):
        if calibration.get("seed") == args.seed:
            print(f"note: the calibration was measured on seed {args.seed}, the noise this bench uses; pass another "
                  "--seed for an honest comparison")
        return calibration
    batch = args.calibration_batch or args.batch
    print(f"the model's calibration does not cover {sampler} at {steps} steps on branches {branches}: calibrating "
          f"them on seed {args.calibration_seed}, {batch} images (the bench uses seed {args.seed})")
    start = time.perf_counter()
    calibration = calibrate(pipe, steps=steps, sampler=sampler, branch=branches[0], branches=branches,
                            batch_size=batch, seed=args.calibration_seed, class_labels=_labels_from(args, pipe, batch),
                            prompt=args.prompt, guidance_scale=args.guidance_scale, **options)
    print(f"  calibrated in {time.perf_counter() - start:.1f}s")
    return calibration


def _progress(row):
    """One line per measured frontier row, as it finishes."""
    where = "uncached" if row["schedule"] == "none" else f"{row['schedule']}, branch {row['branch']}, 1:{row['interval']}"
    quality = "" if row["psnr"] == float("inf") else f", PSNR {row['psnr']:.2f} dB"
    accuracy = "" if row["accuracy"] is None else f", toy accuracy {row['accuracy']:.3f}"
    speed = "" if row["speedup"] is None or row["schedule"] == "none" else f", measured {row['speedup']:.2f}x"
    print(f"  {row['sampler']}-{row['steps']} {where}: {row['full_steps']} full calls, MACs "
          f"{row['mac_fraction']:.1%}{quality}{accuracy}{speed}", flush=True)


def _adaptive_cmd(args) -> int:
    """Reuse vs forecast, fixed vs adaptive, against fewer steps (minidiff.forecast_bench)."""
    import torch

    from . import forecast_bench
    from .frontier import format_rows

    if args.plot:
        check_output(args.plot, "image")
        require("matplotlib", "the refresh plot")
    pipe = _load(args)
    rows = forecast_bench.compare(pipe, sampler=args.sampler, steps=args.steps, seeds=args.seeds,
                                  batch=args.batch, budgets=args.budgets, branch=args.branch)
    print(format_rows(rows, ["budget", "method", "mac_fraction", "psnr", "psnr_min", "seconds",
                             "distinct_schedules"]))
    if args.plot:
        budget = args.budgets[math.ceil(len(args.budgets) / 2) - 1]
        labels = (torch.arange(args.batch) % pipe.num_real_classes()).tolist()
        pipe.generate(steps=args.steps, sampler=args.sampler, seed=args.seeds[0], class_labels=labels,
                      cache_schedule="adaptive", cache_budget=budget, cache_branch=args.branch, progress=False)
        chosen = pipe.last_run.full_steps_per_sample  # before the uncached recording run replaces last_run
        similarity = forecast_bench.adjacent_similarity(pipe, sampler=args.sampler, steps=args.steps,
                                                        branch=args.branch, seed=args.seeds[0], batch=args.batch)
        path = forecast_bench.plot_refreshes(chosen, similarity, args.plot, f"{args.sampler} {args.steps}, "
                                             f"budget {budget}: adaptive full steps per sample")
        print(f"wrote {path}")
    return 0


# -- convert -----------------------------------------------------------------------------------------

CONVERT_FORMATS = ("ddpm", "ldm", "sd15")


def convert_main(argv=None) -> int:
    """`minidiff convert ddpm|ldm|sd15 SRC DST ...`: the converters' own command lines, behind the same
    error edge as every command (and --threads)."""
    import importlib

    argv = list(argv or [])
    if not argv or argv[0] not in CONVERT_FORMATS:
        print(f"error: name the format first: minidiff convert {{{','.join(CONVERT_FORMATS)}}} SRC DST ... "
              "(see --help of each)", file=sys.stderr)
        return 2
    threads = None
    if "--threads" in argv[1:]:
        at = argv.index("--threads", 1)
        try:
            threads = int(argv[at + 1])
        except (IndexError, ValueError):
            print("error: --threads takes a whole number", file=sys.stderr)
            return 2
        del argv[at:at + 2]
    converter = importlib.import_module(f"minidiff.convert.{argv[0]}").main
    return guarded(lambda: (set_threads(threads), converter(argv[1:]))[1] or 0)


# -- the entry point ---------------------------------------------------------------------------------

@dataclass
class Command:
    parser: Optional[Callable[[], Parser]]  # None: the command parses its own arguments (convert)
    run: Callable
    help: str


def guarded(work: Callable, parser: Optional[argparse.ArgumentParser] = None):
    """`work()`, with a user error printed as one line `error: ...` (exit status 1) and Ctrl-C as
    exit status 130, never a traceback."""
    try:
        return work()
    except USER_ERRORS as e:
        print(f"error: {cli_message(e, parser)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        code = getattr(e, "exit_code", 130)  # training sets its own after saving a checkpoint
        if not str(e):
            print("interrupted", file=sys.stderr)
        return code


def run(name: str, argv=None):
    """Run command `name` on `argv`: parse (usage errors exit 2), set threads, then its work."""
    command = COMMANDS[name]
    argv = list(sys.argv[1:] if argv is None else argv)  # as argparse: a module's own command line
    if command.parser is None:
        return command.run(argv)
    parser = command.parser()
    args = parser.parse_args(argv)
    args.argv = argv

    def work():
        set_threads(getattr(args, "threads", None))
        return command.run(args)

    return guarded(work, parser)


def sample_main(argv=None):
    return run("sample", argv)


def demo_main(argv=None):
    return run("demo", argv)


def info_main(argv=None):
    return run("info", argv)


def train_main(argv=None):
    """`minidiff train`; returns the training result (or an exit status when it failed)."""
    return run("train", argv)


def toy_metric_main(argv=None):
    return run("toy-metric", argv)


def analyze_main(argv=None):
    return run("analyze", argv)


def bench_main(argv=None):
    return run("bench", argv)


COMMANDS = {
    "demo": Command(_demo_parser, _demo, "the main job: sample the shipped model with and without caching"),
    "sample": Command(_sample_parser, _sample, "sample a model folder, optionally with caching"),
    "info": Command(_info_parser, _info, "what a model folder is and what it takes"),
    "train": Command(_train_parser, _train, "train a toy model (also under torchrun -m minidiff.train)"),
    "analyze": Command(_analyze_parser, _analyze, "feature similarity, depth profile, switch experiment, calibration, "
                       "linear probes"),
    "bench": Command(_bench_parser, _bench, "quality-vs-speed frontier of cache schedules; adaptive caching"),
    "toy-metric": Command(_toy_metric_parser, _toy_metric, "train the toy-metric classifier for a dataset"),
    "convert": Command(None, convert_main, "convert a public checkpoint (ddpm, ldm, sd15) to a minidiff folder"),
}


def version() -> str:
    """The installed package's version, or the source tree's when it is not installed."""
    try:
        from importlib.metadata import PackageNotFoundError, version as installed
        return installed("minidiff")
    except (ImportError, PackageNotFoundError):
        from . import __version__
        return __version__


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(f"minidiff {version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        stream = sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        print(f"usage: minidiff {{{','.join(COMMANDS)}}} ...   (minidiff COMMAND --help; minidiff --version)\n",
              file=stream)
        for name, command in COMMANDS.items():
            print(f"  {name:<10} {command.help}", file=stream)
        return 0 if argv else 2
    from .allocator import retain_freed_memory

    retain_freed_memory()  # an application may tune its own process: large activations stay mapped
    status = run(argv[0], argv[1:])
    return status if isinstance(status, int) else 0  # some commands return their results for callers


if __name__ == "__main__":
    sys.exit(main())
