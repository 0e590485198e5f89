"""DeepCache speedup of the full-size LDM-4-G (cin256-v2) U-Net, measured side by side in one run.

    python benchmarks/ldm_cache_speed.py [--steps 10] [--intervals 2,3,5,10] [--repeats 1] [--guidance]

Random weights (speed does not depend on them), 3x64x64 latents, DDIM through `Pipeline.generate`
with output="latent" (the VQ decoder is left out: it costs the same with or without caching). Runs
alternate between uncached and every interval N (branch 0), the order reversed on every repeat so
slow drift in machine load falls on all of them; the table shows medians. Each speedup is printed next
to the MAC bound N / (1 + (N - 1) * shallow/full) from `UNet.macs`, and the bound of the schedule
actually run (ceil(steps / N) full steps), which is lower when N does not divide the step count.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from convert.ldm import load_config  # noqa: E402  (cin256-v2's built-in config)
from minidiff.pipeline import Pipeline  # noqa: E402
from minidiff.unet import UNet, mac_bound  # noqa: E402


def time_generate(pipe, noise, steps, interval, guidance):
    start = time.perf_counter()
    pipe.generate(steps=steps, sampler="ddim", noise=noise, class_labels=[207] * noise.shape[0],
                  guidance_scale=guidance, cache_interval=interval, cache_branch=0, output="latent", progress=False)
    return time.perf_counter() - start, pipe.last_run.full_calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per image")
    parser.add_argument("--intervals", default="2,3,5,10", help="cache intervals N to compare with N=1")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each setting (median reported)")
    parser.add_argument("--guidance", action="store_true", help="also time classifier-free guidance (batch 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    intervals = [1] + [int(n) for n in args.intervals.split(",")]

    config = load_config(None)
    torch.manual_seed(0)
    unet = UNet(config.unet)
    pipe = Pipeline(unet, config.scheduler, null_class=config.null_class)
    noise = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    macs = unet.macs(noise, 500, torch.tensor([207]), branch=0)
    ratio = macs["shallow"] / macs["full"]
    params = sum(p.numel() for p in unet.parameters())
    print(f"cin256-v2 U-Net, {params:,} parameters (incl. class embedding), random weights, latents 3x64x64, "
          f"DDIM {args.steps} steps, branch 0, {torch.get_num_threads()} threads, device cpu")
    print(f"MACs per call: full {macs['full'] / 1e9:.2f} G, shallow {macs['shallow'] / 1e9:.2f} G "
          f"(shallow/full = {ratio:.4f})")

    settings = [(None, 1)] + ([(1.5, 2)] if args.guidance else [])
    for guidance, batch in settings:
        times = {n: [] for n in intervals}
        full_calls = {}
        with torch.inference_mode():
            time_generate(pipe, noise, 1, 1, guidance)  # warm-up: allocator, thread pool
            for repeat in range(args.repeats):
                for n in intervals if repeat % 2 == 0 else intervals[::-1]:
                    seconds, full_calls[n] = time_generate(pipe, noise, args.steps, n, guidance)
                    times[n].append(seconds)
                    print(f"  run: guidance {guidance}, N={n}: {seconds:.2f} s", flush=True)
        base = statistics.median(times[1])
        label = "batch 1" if guidance is None else f"guidance {guidance} (U-Net batch {batch})"
        print(f"\n{label}: median of {args.repeats} run(s)")
        print(f"{'N':>3} {'full/shallow calls':>18} {'seconds':>8} {'speedup':>8} {'MAC bound':>10} "
              f"{'bound of schedule':>18}")
        for n in intervals:
            full = full_calls[n]
            shallow = args.steps - full
            seconds = statistics.median(times[n])
            schedule_bound = args.steps / (full + shallow * ratio)
            print(f"{n:>3} {f'{full}/{shallow}':>18} {seconds:>8.2f} {base / seconds:>7.2f}x "
                  f"{mac_bound(n, ratio):>9.2f}x {schedule_bound:>17.2f}x")
        assert all(full_calls[n] == math.ceil(args.steps / n) for n in intervals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
