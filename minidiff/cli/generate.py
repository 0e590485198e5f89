"""Command lines that make images: `sample`, `sample-many` (also under torchrun), `demo` and `info`."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..grid import IMAGE_FORMATS
from ..samplers import SAMPLERS

from .edge import check_output, _load, Parser, require, resolve_classes, _scale_arg, _threads_arg


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
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA .safetensors (kohya or diffusers/PEFT) at SCALE (default 1); repeatable")
    p.add_argument("--controlnet", action="append", default=[], metavar="DIR",
                   help="ControlNet folder (convert/controlnet.py); repeatable, one --control-image each")
    p.add_argument("--control-image", action="append", default=[], metavar="FILE",
                   help="control image (edges, depth, pose) for each --controlnet, center-cropped to the output size")
    p.add_argument("--controlnet-scale", type=float, default=1.0, help="weight of the ControlNet residuals")
    _threads_arg(p)
    return p


def _sample(args) -> int:
    check_output(args.out, "image")
    require("PIL", "writing images")
    if args.negative_prompt is not None and not (args.guidance_scale or 0) > 1:
        raise ValueError("--negative-prompt acts only through classifier-free guidance, which is off; add "
                         "--guidance-scale above 1 (e.g. 7.5) or drop --negative-prompt")
    import torch

    from ..cache import mac_bound
    from ..data import save_grid
    from ..grid import class_titles

    from ..lora import parse_lora_arg

    loras = [parse_lora_arg(text) for text in args.lora]
    pipe = _load(args, device=args.device, dtype=getattr(torch, args.dtype), allow_nan=args.allow_nan)
    for path, scale in loras:
        pipe.load_lora(path, scale)
    control = _controls(pipe, args)
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
                           guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                           **control)
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
    per_sample = run.full_steps_per_sample
    if run.shallow_calls or run.forecast:  # say what caching did; an uncached run has nothing to add
        chosen = (f"full steps {per_sample[0]}" if all(steps == per_sample[0] for steps in per_sample) else
                  "full steps per sample: " + "; ".join(f"{i}: {steps}" for i, steps in enumerate(per_sample)))
        print(f"MACs {run.mac_fraction:.3f} of the uncached run, forecast order {run.forecast}; {chosen}")
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


def _example_cond(pipe):
    """A conditioning input of batch 1 shaped as the U-Net expects, for counting MACs."""
    import torch

    cfg = pipe.unet.config
    if cfg.num_classes is not None:
        return torch.zeros(1, dtype=torch.long, device=pipe.device)
    if cfg.context_dim is not None:
        return torch.zeros(1, 77, cfg.context_dim, device=pipe.device, dtype=pipe.dtype)
    return None


# -- sample-many (also torchrun -m minidiff.sample) ------------------------------------------------

def add_generate_arguments(parser: argparse.ArgumentParser):
    """The `Pipeline.generate` options shared by `minidiff sample` and this module."""
    parser.add_argument("--model", required=True, help="minidiff model folder (see convert/ for public checkpoints)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--cache-interval", type=int, default=1, help="N: one full U-Net step every N steps")
    parser.add_argument("--cache-branch", type=int, default=0, help="skip connection the shallow path keeps")
    parser.add_argument("--cache-schedule", default="uniform", choices=["uniform", "nonuniform", "calibrated"])
    parser.add_argument("--class", dest="class_labels", type=int, nargs="+", help="class label(s)")
    parser.add_argument("--prompt", nargs="+", help="text prompt(s) for text-conditioned models")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--allow-nan", action="store_true", help="load weights even if they contain NaN/Inf")


def _sample_many_parser() -> Parser:
    parser = Parser(prog="minidiff sample-many", description="Write NUM samples as PNGs, shared across "
                                     "torchrun processes; a restart skips finished samples.")
    add_generate_arguments(parser)
    parser.add_argument("-n", "--num", type=int, required=True,
                        help="how many samples (sample i uses seed + i); under torchrun write -n N, as torchrun takes "
                        "--num for an abbreviation of its own --numa-binding")
    parser.add_argument("--out", required=True, help="folder for 000000.png, 000001.png, ...")
    parser.add_argument("--batch-size", type=int, default=1, help="samples per U-Net batch (per process)")
    parser.add_argument("--device", help="default: this rank's GPU when there is one, else cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net's full and shallow paths")
    _threads_arg(parser)
    return parser


def _sample_many(args) -> int:
    from ..sharded import run

    return run(args)


# -- demo --------------------------------------------------------------------------------------------

def _demo_parser() -> Parser:
    from .. import demo

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
    from .. import demo

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
