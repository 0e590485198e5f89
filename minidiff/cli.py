"""The `minidiff` command: sample, demo, train, analyze, bench.

`sample` lives here; the other subcommands belong to the modules that implement them and receive
the rest of the command line.
"""
from __future__ import annotations

import argparse
import sys

DELEGATED = {
    "demo": ("minidiff.demo", "main", "the main job: sample the shipped model with and without caching"),
    "train": ("minidiff.train", "main", "train a toy model (also under torchrun)"),
    "analyze": ("minidiff.analysis", "main", "feature similarity, depth profile, switch experiment, calibration"),
    "bench": ("minidiff.analysis", "bench_main", "quality-vs-speed frontier of cache schedules"),
}


def sample_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="minidiff sample", description="Sample a model, optionally with caching.")
    parser.add_argument("--model", required=True, help="minidiff model folder (see convert/ for public checkpoints)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm", "plms"])
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--cache-interval", type=int, default=1, help="N: one full U-Net step every N steps")
    parser.add_argument("--cache-branch", type=int, default=0, help="skip connection the shallow path keeps")
    parser.add_argument("--cache-schedule", default="uniform",
                        choices=["uniform", "nonuniform", "calibrated", "adaptive"])
    parser.add_argument("--cache-forecast", default=None, choices=[0, 1, 2, "auto"],
                        type=lambda v: v if v == "auto" else int(v) if v.isdigit() else v,
                        help="0: reuse the cached deep feature; 1, 2: extrapolate it through the last 2 or 3 full "
                             "steps; auto: 2 for deterministic samplers, 0 for noisy ones (default: 0; auto if "
                             "adaptive)")
    parser.add_argument("--cache-threshold", type=float, help="adaptive: relative L1 staleness that triggers a refresh")
    parser.add_argument("--cache-budget", type=float, help="adaptive: most MACs per sample, as a fraction of uncached")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--class", dest="class_labels", type=int, nargs="+", help="class label(s)")
    parser.add_argument("--prompt", nargs="+", help="text prompt(s) for text-conditioned models")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", default="out/sample.png")
    parser.add_argument("--allow-nan", action="store_true", help="load weights even if they contain NaN/Inf")
    args = parser.parse_args(argv)

    import torch

    from .checkpoint import CheckpointError
    from .pipeline import load
    from .unet import mac_bound

    try:
        pipe = load(args.model, device=args.device, dtype=getattr(torch, args.dtype), allow_nan=args.allow_nan)
        labels = args.class_labels
        batch = args.batch_size or (len(labels) if labels else len(args.prompt) if args.prompt else 4)
        if labels and len(labels) == 1:
            labels = labels * batch
        prompt = args.prompt[0] if args.prompt and len(args.prompt) == 1 else args.prompt
        images = pipe.generate(steps=args.steps, sampler=args.sampler, eta=args.eta,
                               cache_interval=args.cache_interval, cache_branch=args.cache_branch,
                               cache_schedule=args.cache_schedule, cache_forecast=args.cache_forecast,
                               cache_threshold=args.cache_threshold, cache_budget=args.cache_budget,
                               seed=args.seed, batch_size=batch,
                               class_labels=labels, prompt=prompt, negative_prompt=args.negative_prompt,
                               guidance_scale=args.guidance_scale, height=args.height, width=args.width)
    except (CheckpointError, ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import math

    from .data import save_grid

    save_grid(images, args.out, nrow=math.ceil(math.sqrt(images.shape[0])))
    run = pipe.last_run
    ratio = run.shallow_ratio
    print(f"wrote {args.out}: {run.model_calls} U-Net calls ({run.full_calls} full, {run.shallow_calls} shallow "
          f"at branch {args.cache_branch}), {run.seconds:.2f} s; shallow/full MACs {ratio:.3f}, "
          f"MAC bound on speedup {1 / run.mac_fraction:.2f}x (uniform N={args.cache_interval}: "
          f"{mac_bound(args.cache_interval, ratio):.2f}x)")
    print(f"MACs {run.mac_fraction:.3f} of the uncached run, forecast order {run.forecast}; full steps per sample: "
          + "; ".join(f"{i}: {steps}" for i, steps in enumerate(run.full_steps_per_sample)))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ["sample"] + list(DELEGATED)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: minidiff {" + ",".join(commands) + "} ...\n")
        print("  sample   sample a model folder, optionally with caching")
        for name, (_, _, text) in DELEGATED.items():
            print(f"  {name:<8} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    from .allocator import retain_freed_memory

    retain_freed_memory()  # an application may tune its own process: large activations stay mapped
    if command == "sample":
        return sample_main(rest)
    module_name, func, _ = DELEGATED[command]
    import importlib

    status = getattr(importlib.import_module(module_name), func)(rest)
    return status if isinstance(status, int) else 0  # some mains return their results for callers


if __name__ == "__main__":
    sys.exit(main())
