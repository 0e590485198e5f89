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
    parser.add_argument("--cache-schedule", default="uniform", choices=["uniform", "nonuniform", "calibrated"])
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
                               cache_schedule=args.cache_schedule, seed=args.seed, batch_size=batch,
                               class_labels=labels, prompt=prompt, negative_prompt=args.negative_prompt,
                               guidance_scale=args.guidance_scale, height=args.height, width=args.width)
    except (CheckpointError, ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import math

    from .data import save_grid

    save_grid(images, args.out, nrow=math.ceil(math.sqrt(images.shape[0])))
    run = pipe.last_run
    x = torch.zeros(1, pipe.unet.config.in_channels, images.shape[2] // pipe.latent_scale,
                    images.shape[3] // pipe.latent_scale, device=pipe.device, dtype=pipe.dtype)
    macs = pipe.unet.macs(x, 500, _example_cond(pipe), branch=args.cache_branch)
    ratio = macs["shallow"] / macs["full"]
    bound = run.model_calls / (run.full_calls + run.shallow_calls * ratio)
    print(f"wrote {args.out}: {run.model_calls} U-Net calls ({run.full_calls} full, {run.shallow_calls} shallow "
          f"at branch {args.cache_branch}), {run.seconds:.2f} s; shallow/full MACs {ratio:.3f}, "
          f"MAC bound on speedup {bound:.2f}x (uniform N={args.cache_interval}: "
          f"{mac_bound(args.cache_interval, ratio):.2f}x)")
    return 0


def probe_main(argv=None) -> int:
    """`minidiff analyze probe`: linear probes of the class at every layer and timestep (minidiff.probe)."""
    parser = argparse.ArgumentParser(prog="minidiff analyze probe", description="Linear probes of the class label "
                                     "from every recorded layer at every timestep, on real digits noised to x_t and "
                                     "along sampling runs, with the model conditioned on the null class.")
    parser.add_argument("--model", required=True, help="class-conditional minidiff model folder with a null class")
    parser.add_argument("--out", default="out/probe", help="folder for probe.csv, heatmaps and summary.txt")
    parser.add_argument("--timesteps", type=int, nargs="+",
                        default=[999, 900, 800, 700, 600, 500, 400, 300, 200, 100, 50, 0])
    parser.add_argument("--count", type=int, help="real digits to use, class-balanced (default all 1,797)")
    parser.add_argument("--per-class", type=int, default=20, help="sampling runs per class for trajectory probes")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the trajectories")
    parser.add_argument("--every", type=int, default=5, help="probe every N-th trajectory step")
    parser.add_argument("--no-trajectories", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)

    import torch

    from .checkpoint import CheckpointError
    from .pipeline import load
    from .probe import run

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run(load(args.model), args.out, timesteps=args.timesteps, count=args.count, per_class=args.per_class,
            steps=args.steps, every=args.every, seed=args.seed, trajectories=not args.no_trajectories)
    except (CheckpointError, ValueError, ImportError) as e:
        print(f"minidiff analyze probe: {e}", file=sys.stderr)
        return 2
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
    if command == "analyze" and rest[:1] == ["probe"]:
        return probe_main(rest[1:])
    module_name, func, _ = DELEGATED[command]
    import importlib

    status = getattr(importlib.import_module(module_name), func)(rest)
    return status if isinstance(status, int) else 0  # some mains return their results for callers


if __name__ == "__main__":
    sys.exit(main())
