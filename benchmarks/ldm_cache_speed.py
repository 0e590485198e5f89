"""DeepCache speedup of the full-size LDM-4-G (cin256-v2) U-Net, measured side by side in one run.

    python benchmarks/ldm_cache_speed.py [--steps 10] [--intervals 2,3,5,10] [--repeats 2] [--guidance]

Random weights (speed does not depend on them), 3x64x64 latents, DDIM through `Pipeline.generate`
with output="latent" (the VQ decoder is left out: it costs the same with or without caching).
Two measurements, both side by side so a change in machine load falls on every setting alike:
- whole sampling runs, alternating uncached and every interval N (branch 0), the order reversed on
  every repeat; medians of wall time and of CPU time (process_time, all threads). On a shared
  machine the wall time swings with other people's jobs; the CPU seconds the run itself used do not;
- single full and shallow U-Net calls, interleaved; the speedup a schedule of F full and S shallow
  calls gets from their median CPU times, (F + S) t_full / (F t_full + S t_shallow).
Each is printed next to the MAC bound N / (1 + (N - 1) * shallow/full) from `UNet.macs`, and the MAC
bound of the schedule actually run (ceil(steps / N) full calls), lower when N does not divide the steps.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

from minidiff.convert.ldm import load_config  # cin256-v2's built-in config
from minidiff.pipeline import Pipeline
from minidiff.cache import mac_bound
from minidiff.unet import UNet


def time_generate(pipe, noise, steps, interval, guidance):
    """(wall seconds, CPU seconds, full U-Net calls) of one sampling run."""
    wall, cpu = time.perf_counter(), time.process_time()
    pipe.generate(steps=steps, sampler="ddim", noise=noise, class_labels=[207] * noise.shape[0],
                  guidance_scale=guidance, cache_interval=interval, cache_branch=0, output="latent", progress=False)
    return time.perf_counter() - wall, time.process_time() - cpu, pipe.last_run.full_calls


def time_calls(unet, x, labels, repeats):
    """Median CPU seconds of one full and one shallow call (branch 0), timed alternately."""
    full, shallow = [], []
    for _ in range(repeats):
        start = time.process_time()
        _, cache = unet.forward_full(x, 500, labels, branch=0)
        full.append(time.process_time() - start)
        start = time.process_time()
        unet.forward_shallow(x, 500, labels, cache=cache)
        shallow.append(time.process_time() - start)
    return statistics.median(full), statistics.median(shallow)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per image")
    parser.add_argument("--intervals", default="2,3,5,10", help="cache intervals N to compare with N=1")
    parser.add_argument("--repeats", type=int, default=2, help="sampling runs of each setting (median reported)")
    parser.add_argument("--call-repeats", type=int, default=5, help="timed pairs of single full/shallow calls")
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
        wall, cpu = {n: [] for n in intervals}, {n: [] for n in intervals}
        full_calls = {}
        labels = torch.tensor([207] * batch)
        with torch.inference_mode():
            time_generate(pipe, noise, 1, 1, guidance)  # warm-up: allocator, thread pool
            for repeat in range(args.repeats):
                for n in intervals if repeat % 2 == 0 else intervals[::-1]:
                    seconds, cpu_seconds, full_calls[n] = time_generate(pipe, noise, args.steps, n, guidance)
                    wall[n].append(seconds)
                    cpu[n].append(cpu_seconds)
                    print(f"  run: guidance {guidance}, N={n}: {seconds:.2f} s wall, {cpu_seconds:.2f} s CPU",
                          flush=True)
            t_full, t_shallow = time_calls(unet, noise.expand(batch, -1, -1, -1), labels, args.call_repeats)
        label = "batch 1" if guidance is None else f"guidance {guidance} (U-Net batch {batch})"
        print(f"\n{label}: medians of {args.repeats} run(s); one call: full {t_full:.2f} s, shallow {t_shallow:.3f} s "
              f"CPU (ratio {t_shallow / t_full:.4f}; MACs {ratio:.4f})")
        print(f"{'N':>3} {'full/shallow':>12} {'wall s':>7} {'speedup':>8} {'CPU s':>7} {'speedup':>8} "
              f"{'from calls':>10} {'MAC bound':>10} {'schedule bound':>15}")
        wall_base, cpu_base = statistics.median(wall[1]), statistics.median(cpu[1])
        for n in intervals:
            full = full_calls[n]
            shallow = args.steps - full
            wall_n, cpu_n = statistics.median(wall[n]), statistics.median(cpu[n])
            from_calls = args.steps * t_full / (full * t_full + shallow * t_shallow)
            schedule_bound = mac_bound(full, shallow, ratio)
            print(f"{n:>3} {f'{full}/{shallow}':>12} {wall_n:>7.1f} {wall_base / wall_n:>7.2f}x {cpu_n:>7.1f} "
                  f"{cpu_base / cpu_n:>7.2f}x {from_calls:>9.2f}x {mac_bound(1, n - 1, ratio):>9.2f}x "
                  f"{schedule_bound:>14.2f}x")
        assert all(full_calls[n] == math.ceil(args.steps / n) for n in intervals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
