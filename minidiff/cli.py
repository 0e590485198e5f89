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
    from .sample import add_generate_arguments

    parser = argparse.ArgumentParser(prog="minidiff sample", description="Sample a model, optionally with caching.")
    add_generate_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="out/sample.png")
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
    module_name, func, _ = DELEGATED[command]
    import importlib

    status = getattr(importlib.import_module(module_name), func)(rest)
    return status if isinstance(status, int) else 0  # some mains return their results for callers


if __name__ == "__main__":
    sys.exit(main())
