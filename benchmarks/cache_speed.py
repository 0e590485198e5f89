"""Measured speedup of cached sampling vs uncached, next to the MAC bound, side by side in one run.

    python benchmarks/cache_speed.py [--arch cifar10 church] [--steps 20] [--repeats 3]

Full-size DDPM architectures with random weights (speed does not depend on them). Each repeat runs
every configuration once, in turn, so machine noise hits all of them alike; medians are reported.
The bound for a run is calls / (full + shallow * shallow_macs / full_macs), i.e. N / (1 + (N-1) r)
for uniform 1:N when N divides the step count.
"""
import argparse
import statistics
import time

import torch

from minidiff.allocator import retain_freed_memory

from minidiff.pipeline import Pipeline
from minidiff.schedules import SchedulerConfig
from minidiff.cache import mac_bound
from minidiff.convert.architectures import architecture
from minidiff.unet import UNet

ARCHS = {  # google/ddpm-cifar10-32 and google/ddpm-ema-church-256 (bedroom has the church architecture)
    "cifar10": architecture("ddpm-cifar10"),
    "church": architecture("ddpm-church"),
}


def run(pipe, steps, interval, branch, noise):
    start = time.perf_counter()
    pipe.generate(steps=steps, sampler="ddim", noise=noise, cache_interval=interval, cache_branch=branch,
                  output="latent", progress=False)
    return time.perf_counter() - start, pipe.last_run


def main():
    retain_freed_memory()  # as minidiff's CLI does; in vs_reference.py both implementations share it
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["cifar10", "church"], choices=sorted(ARCHS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5, 10])
    parser.add_argument("--branch", type=int, default=0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, DDIM {args.steps} steps, "
          f"batch {args.batch}, branch {args.branch}, median of {args.repeats}")
    for arch in args.arch:
        cfg = ARCHS[arch]
        pipe = Pipeline(UNet(cfg), SchedulerConfig())
        noise = torch.randn(args.batch, 3, cfg.sample_size, cfg.sample_size)
        macs = pipe.denoiser.macs(noise[:1], 500, branch=args.branch)
        ratio = macs["shallow"] / macs["full"]
        configs = [1] + args.intervals
        run(pipe, 2, 1, args.branch, noise)  # warm-up
        times = {n: [] for n in configs}
        stats = {}
        for _ in range(args.repeats):
            for n in configs:
                seconds, stats[n] = run(pipe, args.steps, n, args.branch, noise)
                times[n].append(seconds)
        base = statistics.median(times[1])
        print(f"\n{arch}: full step {macs['full'] / 1e9:.2f} GMACs, shallow {macs['shallow'] / 1e9:.3f} GMACs "
              f"(ratio {ratio:.4f}); uncached {base:.2f} s")
        print(f"{'N':>4} {'full':>5} {'shallow':>8} {'seconds':>8} {'speedup':>8} {'MAC bound':>10} "
              f"{'of bound':>9} {'N/(1+(N-1)r)':>13}")
        for n in args.intervals:
            s = stats[n]
            t = statistics.median(times[n])
            bound = mac_bound(s.full_calls, s.shallow_calls, ratio)
            speedup = base / t
            print(f"{n:>4} {s.full_calls:>5} {s.shallow_calls:>8} {t:>8.2f} {speedup:>7.2f}x {bound:>9.2f}x "
                  f"{speedup / bound:>9.2f} {mac_bound(1, n - 1, ratio):>12.2f}x")


if __name__ == "__main__":
    main()
