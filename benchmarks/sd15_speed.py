"""Stable Diffusion 1.5's U-Net with random weights: seconds per full and shallow step, and what
DeepCache saves on a 50-step PLMS run.

    python benchmarks/sd15_speed.py [--size 64] [--branch 0] [--repeats 2] [--real-size 32 --real-steps 10]

Full size: 859.5M parameters, 64x64 latents (512x512 images), batch 2 (the unconditional and the
conditional half of classifier-free guidance in one call). The 50-step estimates are built from
the measured per-step times: PLMS makes 51 U-Net calls, of which ceil(51 / N) run in full at
interval N. With --real-steps a real PLMS run at a reduced latent size checks the estimate.
The weights are random: speed does not depend on them.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from minidiff.convert.sd15 import config_from_yaml
from minidiff.cache import CachedUNet, uniform_schedule
from minidiff.samplers import num_model_calls, sample_plms
from minidiff.unet import UNet

BATCH = 2  # guidance: [uncond, cond]


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def step_times(unet: UNet, size: int, branch: int, repeats: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 4, size, size, generator=g)
    context = torch.randn(BATCH, 77, unet.config.context_dim, generator=g)
    _, cache = unet.forward_full(x, 500, context, branch=branch)
    full = timed(lambda: unet.forward_full(x, 500, context, branch=branch), repeats)
    shallow = timed(lambda: unet.forward_shallow(x, 500, context, cache=cache), repeats)
    return full, shallow


def macs(config, size: int, branch: int) -> dict:
    """Multiply-accumulates of a full and a shallow step, counted on the meta device (no compute)."""
    with torch.device("meta"):
        unet = UNet(config)
        x = torch.empty(BATCH, 4, size, size)
        context = torch.empty(BATCH, 77, config.context_dim)
    return unet.macs(x, torch.tensor(500, device="meta"), context, branch=branch)


def plms_seconds(full: float, shallow: float, steps: int, interval: int) -> float:
    calls = num_model_calls("plms", steps)
    full_calls = math.ceil(calls / interval)
    return full_calls * full + (calls - full_calls) * shallow


def real_run(unet: UNet, size: int, steps: int, interval: int, branch: int, scheduler) -> float:
    """Seconds of a guided PLMS run (U-Net calls and sampler only) at latent size `size`."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, size, size, generator=g)
    both = torch.randn(BATCH, 77, unet.config.context_dim, generator=g)
    calls = num_model_calls("plms", steps)
    cached = CachedUNet(unet, calls, uniform_schedule(calls, interval), branch)

    def guided(x, t):
        uncond, cond = cached(torch.cat([x, x]), t, both).chunk(2)
        return uncond + 7.5 * (cond - uncond)

    start = time.perf_counter()
    sample_plms(guided, x, scheduler, steps, progress=False)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="latent size (64 = 512x512 images)")
    parser.add_argument("--branch", type=int, default=0, help="cache branch of the shallow step")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats per step kind (after a warm-up)")
    parser.add_argument("--steps", type=int, default=50, help="PLMS steps of the estimate")
    parser.add_argument("--real-size", type=int, default=32, help="latent size of the real check run")
    parser.add_argument("--real-steps", type=int, default=0, help="PLMS steps of a real run (0: skip it)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    sd = config_from_yaml()
    counted = macs(sd.unet, args.size, args.branch)
    print(f"SD1.5 U-Net, batch {BATCH}, {args.size}x{args.size} latents, branch {args.branch}, {args.threads} threads")
    print(f"MACs per step: full {counted['full'] / 1e9:.1f} G, shallow {counted['shallow'] / 1e9:.1f} G "
          f"({counted['full'] / counted['shallow']:.1f}x fewer)", flush=True)

    start = time.perf_counter()
    torch.manual_seed(0)
    unet = UNet(sd.unet).eval()
    params = sum(p.numel() for p in unet.parameters())
    print(f"built {params:,} parameters in {time.perf_counter() - start:.0f} s", flush=True)

    full, shallow = step_times(unet, args.size, args.branch, args.repeats)
    print(f"seconds per step: full {full:.2f}, shallow {shallow:.3f} ({full / shallow:.1f}x faster)", flush=True)
    base = plms_seconds(full, shallow, args.steps, 1)
    print(f"{args.steps}-step PLMS estimate ({num_model_calls('plms', args.steps)} U-Net calls):")
    for interval in (1, 3, 5):
        estimate = plms_seconds(full, shallow, args.steps, interval)
        print(f"  N={interval}: {estimate:7.1f} s  speedup {base / estimate:.2f}x", flush=True)

    if args.real_steps:
        print(f"real guided PLMS, {args.real_steps} steps, {args.real_size}x{args.real_size} latents:", flush=True)
        rows = {}
        for interval in (1, 3, 5):
            rows[interval] = real_run(unet, args.real_size, args.real_steps, interval, args.branch, sd.scheduler)
            print(f"  N={interval}: {rows[interval]:7.1f} s  speedup {rows[1] / rows[interval]:.2f}x", flush=True)
        small = step_times(unet, args.real_size, args.branch, 1)
        estimated = {n: plms_seconds(*small, args.real_steps, n) for n in (1, 3, 5)}
        print("  against the estimate from per-step times at this size: " + ", ".join(
            f"N={n}: {rows[1] / rows[n]:.2f}x measured, {estimated[1] / estimated[n]:.2f}x estimated" for n in (3, 5)))


if __name__ == "__main__":
    main()
