"""Command lines that make images: `sample`, `sample-many` (also under torchrun), `demo` and `info`."""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from .common import (USER_ERRORS, check_device, check_fractions, check_ints, check_output, check_replaceable_image,
                   cli_message, _load, MAX_SCALE, Parser, require, resolve_classes, _scale_arg, _threads_arg)

MAX_BATCH = 4096  # generate's limit on one batch
MAX_SAMPLES = 1_000_000  # sample-many -n: 20x an FID-50k set


# -- options shared by sample and sample-many ---------------------------------------------------------

def add_cache_arguments(p: argparse.ArgumentParser):
    """The `cache_*` options of `Pipeline.generate`, defined once for every command that takes them."""
    from ..cache import FORECASTS

    p.add_argument("--cache-interval", type=int, default=1, help="N: one full network step every N steps "
                   "(default 1: no caching)")
    p.add_argument("--cache-branch", type=int, default=0, help="skip connection the shallow path keeps (default 0)")
    p.add_argument("--cache-schedule", default="uniform", choices=["uniform", "nonuniform", "calibrated", "adaptive"],
                   help="which steps run in full (default uniform; calibrated needs the model's calibration.json)")
    p.add_argument("--cache-forecast", default=None, choices=FORECASTS, metavar="{" + ",".join(map(str, FORECASTS)) + "}",
                   type=lambda v: int(v) if v.isdigit() else v,
                   help="0: reuse the cached deep feature; 1, 2: extrapolate it through the last 2 or 3 full "
                        "steps; auto: 2 for deterministic samplers, 0 for noisy ones; foca, hermite, chebyshev, "
                        "dicache: forecasters from the literature (docs/adaptive.md) (default: 0; auto if adaptive)")
    p.add_argument("--cache-threshold", type=float, help="adaptive: relative L1 staleness that triggers a refresh "
                   "(default 0.03)")
    p.add_argument("--cache-budget", type=float, help="adaptive: most MACs per sample, as a fraction of uncached "
                   "(default: none)")


def given_cache_options(args) -> dict:
    """The `cache_*` keywords of `generate` given other than at their defaults ({}: no caching)."""
    import dataclasses

    from ..cache import CacheOptions

    return {f"cache_{f.name}": getattr(args, f"cache_{f.name}") for f in dataclasses.fields(CacheOptions)
            if hasattr(args, f"cache_{f.name}") and getattr(args, f"cache_{f.name}") != f.default}


def add_generate_arguments(p: argparse.ArgumentParser, device_help: str = "cpu, cuda, cuda:N or mps (default cpu)"):
    """The `Pipeline.generate` options of `minidiff sample` and `minidiff sample-many`, defined once."""
    from ..samplers import SAMPLERS

    p.add_argument("--model", required=True, help="minidiff model folder (see convert/ for public checkpoints)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS), help="(default ddim)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise, ddim only (default 0: deterministic)")
    p.add_argument("--karras-sigmas", action="store_true", help="Karras et al. 2022 noise levels "
                   "(euler, heun, dpmpp_2m, unipc; default off)")
    add_cache_arguments(p)
    p.add_argument("--budget", type=float, help="at most this fraction of the MACs of --steps uncached steps; the "
                   "model's plan.json (`minidiff plan`) chooses steps and caching (default: none)")
    p.add_argument("--class", dest="class_labels", nargs="+", metavar="CLASS",
                   help="class number(s) or name(s) (`minidiff info` lists them); default: every class in turn")
    p.add_argument("--prompt", nargs="+", help="text prompt(s) for text-conditioned models (default: none)")
    p.add_argument("--negative-prompt", help="what guidance steers away from (default: none; needs guidance above 1)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale; 1 turns it off (default: the "
                   "model's, which `minidiff info` shows; off unless the model names one)")
    p.add_argument("--height", type=int, help="image height in px (default: the model's size)")
    p.add_argument("--width", type=int, help="image width in px (default: the model's size)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--device", help=device_help)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="precision of the network (default float32)")
    p.add_argument("--allow-nan", action="store_true", help="load weights even if they contain NaN/Inf")
    _threads_arg(p)


def check_generate_arguments(args):
    """What can be refused before the model is loaded; the rest (--steps against the model's noise
    levels, classes, sizes) right after it, before any sampling."""
    check_ints(args, {"--batch-size": ("batch_size", 1, MAX_BATCH), "--cache-interval": ("cache_interval", 1, 10_000),
                      "--cache-branch": ("cache_branch", 0, 10_000), "--height": ("height", 1, 16384),
                      "--width": ("width", 1, 16384), "--seed": ("seed", 0, 2 ** 64 - 1)})
    check_fractions(args, {"--cache-budget": ("cache_budget", 0, 1), "--budget": ("budget", 0, 1)})
    if args.budget is not None:
        given = [flag for flag, value, default in (
            ("--cache-interval", args.cache_interval, 1), ("--cache-branch", args.cache_branch, 0),
            ("--cache-schedule", args.cache_schedule, "uniform"), ("--cache-forecast", args.cache_forecast, None),
            ("--cache-threshold", args.cache_threshold, None), ("--cache-budget", args.cache_budget, None))
            if value != default]
        if given:
            raise ValueError(f"--budget lets the model's plan choose the caching; drop {', '.join(given)}")
    check_device(args.device)
    if args.negative_prompt is not None and args.guidance_scale is not None and not args.guidance_scale > 1:
        raise ValueError("--negative-prompt acts only through classifier-free guidance, which is off; add "
                         "--guidance-scale above 1 (e.g. 7.5) or drop --negative-prompt")


def _load_for(args, device):
    """The model, then the checks that need it: steps within its noise levels, a prompt it can take."""
    import torch

    from ..checks import check_steps

    pipe = _load(args, device=device, dtype=getattr(torch, args.dtype), allow_nan=args.allow_nan)
    check_steps(args.steps, pipe.scheduler.num_train_timesteps)
    if args.negative_prompt is not None and pipe.text_encoder is None:
        raise ValueError("this model takes no prompt, so --negative-prompt would be ignored; drop it")
    if args.negative_prompt is not None and args.guidance_scale is None and not (pipe.default_guidance or 0) > 1:
        raise ValueError("--negative-prompt acts only through classifier-free guidance, which is off for this model "
                         "by default; add --guidance-scale above 1 (e.g. 7.5) or drop --negative-prompt")
    if args.cache_schedule == "calibrated" and pipe.calibration_error:
        raise ValueError(pipe.calibration_error)
    return pipe


def generate_options(args) -> dict:
    """The `generate` keywords both commands pass as given."""
    return dict(steps=args.steps, sampler=args.sampler, eta=args.eta, karras_sigmas=args.karras_sigmas,
                cache_interval=args.cache_interval, cache_branch=args.cache_branch,
                cache_schedule=args.cache_schedule, cache_forecast=args.cache_forecast,
                cache_threshold=args.cache_threshold, cache_budget=args.cache_budget, budget=args.budget,
                negative_prompt=args.negative_prompt, guidance_scale=args.guidance_scale)


# -- sample ------------------------------------------------------------------------------------------

def _sample_parser() -> Parser:
    from ..images import IMAGE_FORMATS

    p = Parser(prog="minidiff sample", description="Sample a model, optionally with caching.")
    add_generate_arguments(p)
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"images, 1-{MAX_BATCH} (default: one per class on a class model, one per prompt, else 4)")
    p.add_argument("--out", default="out/sample.png", help=f"image file ({', '.join(IMAGE_FORMATS)}; default "
                   "out/sample.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out image")
    _scale_arg(p)
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA .safetensors (kohya or diffusers/PEFT) at SCALE (default 1); repeatable")
    p.add_argument("--controlnet", action="append", default=[], metavar="DIR",
                   help="ControlNet folder (convert/controlnet.py); repeatable, one --control-image each (default: none)")
    p.add_argument("--control-image", action="append", default=[], metavar="FILE",
                   help="control image (edges, depth, pose) for each --controlnet, center-cropped to the output size "
                   "(default: none)")
    p.add_argument("--controlnet-scale", type=float, default=1.0, help="weight of the ControlNet residuals (default 1)")
    p.add_argument("--init-image", metavar="FILE", help="img2img: start from this picture (center-cropped to the "
                   "output size), noised by --strength (default: none, start from noise)")
    p.add_argument("--strength", type=float, default=0.75, help="img2img: the share of the steps that run; 1 keeps "
                   "nothing of --init-image (default 0.75)")
    return p


def _sample(args) -> int:
    check_generate_arguments(args)
    check_ints(args, {"--scale": ("scale", 1, MAX_SCALE)})
    check_output(args.out, "image", overwrite=args.overwrite)
    require("PIL", "writing images")
    if args.init_image is None and args.strength != 0.75:
        raise ValueError("--strength applies only with --init-image; add one or drop --strength")
    check_fractions(args, {"--strength": ("strength", 0, 1)})
    if args.init_image is not None and not Path(args.init_image).is_file():
        raise ValueError(f"--init-image: no file {args.init_image}")
    import torch

    from ..data import save_grid
    from ..demo import network_name
    from ..images import auto_scale, check_grid, class_titles
    from ..lora import parse_lora_arg

    loras = [parse_lora_arg(text) for text in args.lora]  # a malformed --lora is refused before loading
    pipe = _load_for(args, args.device or "cpu")
    for path, scale in loras:
        pipe.load_lora(path, scale)
    control = _controls(pipe, args)
    init = _init_image(pipe, args)
    labels = resolve_classes(pipe, args.class_labels)
    per_class = labels is None and pipe.denoiser.config.num_classes is not None
    if per_class:  # one image per class, as the demo does
        labels = pipe.default_labels(args.batch_size or pipe.num_real_classes())
    batch = args.batch_size or (len(labels) if labels else len(args.prompt) if args.prompt else 4)
    if labels and len(labels) == 1:
        labels = labels * batch
    classes = pipe.num_real_classes() if per_class else 0
    nrow = classes if 0 < classes <= 16 else math.ceil(math.sqrt(batch))
    height, width = args.height or pipe.default_size, args.width or pipe.default_size
    check_grid(batch, height, width, nrow, args.scale or auto_scale(height, width))
    prompt = args.prompt[0] if args.prompt and len(args.prompt) == 1 else args.prompt
    images = pipe.generate(**generate_options(args), seed=args.seed, batch_size=batch, class_labels=labels,
                           prompt=prompt, height=args.height, width=args.width, **control, **init)
    save_grid(images, args.out, nrow=nrow, scale=args.scale,
              captions=class_titles(pipe.class_names, labels) if labels else None)
    run = pipe.last_run
    per_sample = run.full_steps_per_sample
    chosen = getattr(run, "plan", None) or {}  # --budget: what the model's plan chose
    if chosen:
        print(f"the plan for budget {args.budget:g}: " + ", ".join(f"{k.removeprefix('cache_')} {v}" for k, v in
                                                                  chosen.items() if k not in ("budget",)))
    schedule, branch = chosen.get("cache_schedule", args.cache_schedule), chosen.get("cache_branch", args.cache_branch)
    # with the adaptive schedule a call is full for some samples only: count full steps per sample instead
    split = "" if schedule == "adaptive" else f" ({run.full_calls} full, {run.shallow_calls} shallow at branch {branch})"
    print(f"wrote {args.out}: {images.shape[0]} images, {run.model_calls} {network_name(pipe)} calls{split}, "
          f"{run.seconds:.2f} s on {torch.get_num_threads()} thread(s)")
    if run.shallow_calls or run.forecast:  # say what caching did; an uncached run has nothing to add
        counts = sorted({len(steps) for steps in per_sample})
        full = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        print(f"full steps per sample: {full} of {run.model_calls}, the rest shallow at branch {branch}; "
              f"MACs spent {run.mac_fraction:.3f} of uncached (MAC bound on speedup {1 / run.mac_fraction:.2f}x, "
              f"shallow/full {run.shallow_ratio:.3f}), forecast "
              f"{'order ' if isinstance(run.forecast, int) else ''}{run.forecast}")
        print(f"full steps {per_sample[0]}" if all(steps == per_sample[0] for steps in per_sample) else
              "full steps of each sample: " + "; ".join(f"{i}: {steps}" for i, steps in enumerate(per_sample)))
    return 0


def _controls(pipe, args) -> dict:
    """generate's ControlNet arguments from --controlnet / --control-image (square, at the output size)."""
    if len(args.controlnet) != len(args.control_image):
        raise ValueError(f"--control-image: give one per --controlnet ({len(args.controlnet)} ControlNet(s), "
                         f"{len(args.control_image)} image(s))")
    if not args.controlnet:
        return {}
    from ..data import _read_image

    for path in args.controlnet:
        try:
            pipe.add_controlnet(path)
        except ValueError as e:
            raise ValueError(f"--controlnet: {e}") from None
    size = args.height or args.width or pipe.default_size
    if (args.height or size) != (args.width or size):
        raise ValueError("--control-image is center-cropped square: give --height equal to --width")
    images = []
    for path in args.control_image:
        try:
            images.append(_read_image(Path(path), size, 3)[None].float() / 255)
        except ValueError as e:
            raise ValueError(f"--control-image: {e}") from None
    args.height = args.width = size
    return dict(control_image=images, controlnet_scale=args.controlnet_scale)


def _init_image(pipe, args) -> dict:
    """generate's img2img arguments from --init-image / --strength (square, at the output size)."""
    if args.init_image is None:
        return {}
    if pipe.autoencoder is None:
        raise ValueError("--init-image: img2img needs a latent model (one with an autoencoder); this one samples "
                         "pixels directly")
    from ..data import _read_image

    size = args.height or args.width or pipe.default_size
    if (args.height or size) != (args.width or size):
        raise ValueError("--init-image is center-cropped square: give --height equal to --width")
    try:
        image = _read_image(Path(args.init_image), size, 3)[None].float() / 255
    except ValueError as e:
        raise ValueError(f"--init-image: {e}") from None
    args.height = args.width = size
    return dict(init_image=image, strength=args.strength)


def _example_cond(pipe):
    """A conditioning input of batch 1 shaped as the network expects, for counting MACs."""
    import torch

    cfg = pipe.denoiser.config
    if cfg.num_classes is not None:
        return torch.zeros(1, dtype=torch.long, device=pipe.device)
    if cfg.context_dim is not None:
        return torch.zeros(1, 77, cfg.context_dim, device=pipe.device, dtype=pipe.dtype)
    return None


# -- sample-many (also torchrun -m minidiff.sample) ------------------------------------------------

def _sample_many_parser() -> Parser:
    parser = Parser(prog="minidiff sample-many", description="Write NUM samples as PNGs, shared across "
                                     "torchrun processes; a restart skips finished samples.")
    add_generate_arguments(parser, device_help="default: this rank's GPU when there is one, else cpu")
    parser.add_argument("-n", "--num", type=int, required=True,
                        help=f"how many samples, at most {MAX_SAMPLES:,} (sample i uses seed + i); under torchrun "
                        "write -n N, as torchrun takes --num for an abbreviation of its own --numa-binding")
    parser.add_argument("--out", required=True, help="folder for 000000.png, 000001.png, ...")
    parser.add_argument("--batch-size", type=int, default=1, help="samples per network batch, per process "
                        "(default 1)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network's full and shallow paths")
    return parser


def _sample_many(args) -> int:
    """This torchrun rank's share of `args.num` samples in `args.out`; every rank writes its own files,
    rank 0 reports. Everything is checked before `run.json` is written."""
    check_generate_arguments(args)
    check_ints(args, {"-n": ("num", 1, MAX_SAMPLES)})
    check_output(args.out, "folder")
    require("PIL", "writing images")
    from pathlib import Path

    from .. import sample_many

    rank, world, device, made_group = sample_many.distributed(args.device)
    try:
        pipe = _load_for(args, device)
        labels = resolve_classes(pipe, args.class_labels)
        pipe.initial_noise(1, height=args.height, width=args.width)  # refuses a size the model cannot take
        if args.compile:
            pipe.denoiser.compile_paths()
        settings = {k: v for k, v in vars(args).items()
                    if k not in ("num", "out", "device", "compile", "allow_nan", "argv", "threads")}
        settings.update(model=str(Path(args.model).resolve()), class_labels=labels)
        sample_many.claim_folder(Path(args.out), settings, rank, world)
        computed = sample_many.sample_many(pipe, args.out, args.num, seed=args.seed, batch_size=args.batch_size,
                                       class_labels=labels, prompts=args.prompt, height=args.height, width=args.width,
                                       rank=rank, world=world, **generate_options(args))
        sample_many.finish(world, made_group)
    except USER_ERRORS as e:
        if world == 1:
            raise
        print(f"error (rank {rank}): {cli_message(e, _sample_many_parser())}", file=sys.stderr)
        return 1
    if rank == 0:
        print(f"{args.out}: {args.num} samples ({len(computed)} computed by rank 0 of {world})")
    return 0


# -- demo --------------------------------------------------------------------------------------------

def _demo_parser() -> Parser:
    from .. import demo

    p = Parser(prog="minidiff demo", description=demo.__doc__.splitlines()[0] + " A text-to-image model (e.g. "
               "--model weights/scenes) samples 16 fixed scenes prompts instead of classes.")
    p.add_argument("--model", help=f"native model folder (default: the shipped weights/{demo.DEFAULT_MODEL})")
    p.add_argument("--classifier", help=f"toy-metric classifier folder (default: weights/{demo.DEFAULT_CLASSIFIER}, "
                                        f"for a text model weights/{demo.DEFAULT_SCENES_CLASSIFIER}); "
                                        "'none' skips the metrics")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--interval", type=int, default=5, help="cache interval N: a full U-Net call every N steps")
    p.add_argument("--branch", type=int, default=0, help="cache branch (0: shallowest skip, the cheapest)")
    p.add_argument("--schedule", default="uniform", choices=("uniform", "nonuniform", "calibrated"),
                   help="which steps run in full (calibrated: from the model's calibration.json)")
    p.add_argument("--per-class", type=int, help="samples per class (default 4: a 40-image grid; class models only)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the "
                   "model's, which `minidiff info` shows; off unless the model names one)")
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
    from pathlib import Path

    from .. import demo

    check_ints(args, {"--per-class": ("per_class", 1, demo.MAX_SAMPLES), "--repeats": ("repeats", 1, 100),
                      "--interval": ("interval", 1, 10_000),
                      "--branch": ("branch", 0, 10_000), "--scale": ("scale", 1, MAX_SCALE),
                      "--seed": ("seed", 0, 2 ** 64 - 1)})
    check_output(args.out, "folder")
    for name in demo.OUTPUTS:  # the demo replaces its own pictures of an earlier run, nothing else
        if (Path(args.out) / name).exists():
            check_replaceable_image(Path(args.out) / name, "--out", None)
    require("PIL", "writing the demo's images")
    from ..data import find_weights

    settings = {k: v for k, v in vars(args).items() if k not in ("threads", "argv", "model")}
    folder = args.model or find_weights(demo.DEFAULT_MODEL)
    pipe = _load(argparse.Namespace(model=folder))  # a damaged calibration.json: said once, if it matters
    demo.demo(model=pipe, **settings, threads=0)  # `run` has set the threads
    return 0


# -- info --------------------------------------------------------------------------------------------

def _info_parser() -> Parser:
    p = Parser(prog="minidiff info", description="What a model folder holds and what it takes.")
    p.add_argument("--model", required=True, help="minidiff model folder")
    _threads_arg(p)
    return p


def _info(args) -> int:
    import torch

    from ..demo import network_name

    if sys.stderr.isatty():  # a person waiting at a terminal; logs and pipes get only the report or one error
        print(f"reading {args.model} (and counting each cache branch's MACs) ...", file=sys.stderr, flush=True)
    pipe = _load(args)
    cfg, sch = pipe.denoiser.config, pipe.scheduler

    def millions(module):
        return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f}M"

    kind = ("class-conditional" if cfg.num_classes is not None else
            "text-conditional" if pipe.text_encoder is not None else "unconditional")
    space = "latent" if pipe.autoencoder is not None else "pixel-space"
    print(f"{args.model}: {kind} {space} diffusion model")
    parts = [f"{network_name(pipe)} {millions(pipe.denoiser)}"] + [f"{name} {millions(m)}" for name, m in
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
    print(f"  text:        {'yes: --prompt, and --negative-prompt when guidance is above 1' if pipe.text_encoder else 'no'}")
    if pipe.default_guidance is not None:
        print(f"  guidance:    {pipe.default_guidance:g} by default (--guidance-scale 1 turns it off)")
    x = torch.zeros(1, cfg.in_channels, latent, latent)
    ratios = []
    for b in range(pipe.denoiser.num_branches):
        macs = pipe.denoiser.macs(x, 500, _example_cond(pipe), branch=b)
        ratios.append(f"{b}: {macs['shallow'] / macs['full']:.3f}")
        full = macs["full"]
    print(f"  branches:    0-{pipe.denoiser.num_branches - 1} (--cache-branch); full step {full / 1e9:.3f} GMACs at "
          f"{size}x{size}; shallow/full MACs per branch:")
    for start in range(0, len(ratios), 8):
        print("               " + "  ".join(ratios[start:start + 8]))
    cal = pipe.calibration
    if pipe.calibration_error:
        print(f"  calibration: damaged: {pipe.calibration_error}")
    elif cal is None:
        print("  calibration: none (minidiff analyze calibrate --model ... writes one; --cache-schedule calibrated "
              "needs it)")
    else:
        print(f"  calibration: {cal.get('sampler')} {cal.get('steps')} steps, cost '{cal.get('cost')}', branches "
              f"{' '.join(sorted(cal.get('segments', {}), key=int))}, default branch {cal.get('branch')}")
    training = pipe.meta.get("training")
    if isinstance(training, dict):
        config = training.get("config", {})
        print(f"  training:    {config.get('dataset')} at {config.get('image_size') or pipe.default_size} px, step {training.get('step')}, "
              f"{training.get('seconds')} s")
    return 0
