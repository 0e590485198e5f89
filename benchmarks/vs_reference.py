"""minidiff vs diffusers (+ DeepCache) on identical weights, measured side by side in one process.

    python benchmarks/vs_reference.py [--models sd15 church] [--latent 32] [--steps 20] [--repeats 3]

For each model (random full-size weights: speed does not depend on them):
  (a) one U-Net forward, minidiff vs diffusers;
  (b) a DDIM run with caching at N = 3 and 5, minidiff vs diffusers + DeepCache.DeepCacheSDHelper;
  (c) the same run without caching.
Runs alternate (minidiff, reference, minidiff, ...) so machine noise hits both alike; medians and
ratios (minidiff / reference, < 1 means minidiff is faster) are printed. Outputs are compared too.
Peak memory is the peak RSS of a child process that builds one implementation and runs one
configuration alone (--child), polled during the run.
SD1.5 runs with classifier-free guidance (batch 2, a 77-token context), as a pipeline would.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import types
import warnings

import torch

from minidiff.allocator import retain_freed_memory

warnings.filterwarnings("ignore")

SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, in_channels=4, out_channels=4, sample_size=64,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
CHURCH_UNET = dict(block_out_channels=(128, 128, 256, 256, 512, 512), layers_per_block=2, attention_head_dim=None,
                   down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4, downsample_padding=0,
                   flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, sample_size=256)


def inputs(model: str, latent: int):
    torch.manual_seed(1)
    if model == "sd15":
        return torch.randn(2, 4, latent, latent), torch.randn(2, 77, 768)
    return torch.randn(1, 3, 256, 256), None


def reference_unet(model: str):
    import diffusers

    torch.manual_seed(0)
    if model == "sd15":
        return diffusers.UNet2DConditionModel(**SD15_UNET).eval()
    return diffusers.UNet2DModel(**CHURCH_UNET).eval()


def build(model: str, latent: int):
    """(diffusers U-Net, minidiff U-Net with the same weights, x, cond) for one model."""
    from minidiff.checkpoint import load_weights
    from minidiff.unet import UNet
    from minidiff.convert.unet_keys import config_from_diffusers, diffusers_to_native

    ref = reference_unet(model)
    config = config_from_diffusers(dict(ref.config, _class_name=type(ref).__name__))
    ours = load_weights(UNet(config), diffusers_to_native(ref.state_dict(), config)).eval()
    return ref, ours, *inputs(model, latent)


def ref_call(ref, x, t, cond):
    if cond is None:
        return ref(x, t).sample
    return ref(x, t, encoder_hidden_states=cond).sample


def ref_sampling(ref, x, cond, steps, interval, branch=0):
    """diffusers' DDIM loop, with DeepCache's helper wrapping the U-Net when interval > 1."""
    from diffusers import DDIMScheduler
    from DeepCache import DeepCacheSDHelper

    sched = DDIMScheduler(clip_sample=False)  # = minidiff's SchedulerConfig() below
    sched.set_timesteps(steps)
    helper = None
    if interval > 1:
        helper = DeepCacheSDHelper(pipe=types.SimpleNamespace(unet=ref, scheduler=sched))
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
    try:
        for t in sched.timesteps:
            out = ref(x, t, encoder_hidden_states=cond).sample if cond is not None else ref(x, t).sample
            x = sched.step(out, t, x).prev_sample
    finally:
        if helper is not None:
            helper.disable()
    return x


def our_sampling(ours, x, cond, steps, interval, branch=0):
    from minidiff.cache import CachedUNet, uniform_schedule
    from minidiff.samplers import sample_ddim
    from minidiff.schedules import SchedulerConfig

    cached = CachedUNet(ours, steps, uniform_schedule(steps, interval), branch)
    return sample_ddim(lambda z, t: cached(z, t, cond), x, SchedulerConfig(), steps, progress=False)


def timed(fn):
    start = time.perf_counter()
    with torch.inference_mode():
        out = fn()
    return time.perf_counter() - start, out


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(args):
    """Build one implementation alone, run one configuration, report its peak RSS (MiB) during the run.

    Weights are random and not shared: memory does not depend on their values."""
    import threading

    from minidiff.unet import UNet
    from minidiff.convert.unet_keys import config_from_diffusers

    model = args.models[0]
    x, cond = inputs(model, args.latent)
    if args.child == "ours":
        ref = reference_unet(model)
        config = config_from_diffusers(dict(ref.config, _class_name=type(ref).__name__))
        del ref
        ours = UNet(config).eval()
        fn = lambda: our_sampling(ours, x, cond, args.steps, args.interval)
    else:
        ref = reference_unet(model)
        fn = lambda: ref_sampling(ref, x, cond, args.steps, args.interval)
    peak, done = [_rss_mib()], threading.Event()

    def poll():
        while not done.wait(0.005):
            peak.append(_rss_mib())

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    timed(fn)
    done.set()
    watcher.join()
    print(json.dumps({"peak_mib": max(peak), "before_mib": peak[0]}))


def peak_memory(model, impl, interval, args):
    cmd = [sys.executable, __file__, "--child", impl, "--models", model, "--latent", str(args.latent),
           "--steps", str(args.steps), "--interval", str(interval)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)["peak_mib"]


def main():
    retain_freed_memory()  # as minidiff's CLI does; in vs_reference.py both implementations share it
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sd15", "church"], choices=["sd15", "church"])
    parser.add_argument("--latent", type=int, default=32, help="SD1.5 latent size (64 = 512 px images)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--intervals", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child runs")
    parser.add_argument("--child", choices=["ours", "ref"], help=argparse.SUPPRESS)
    parser.add_argument("--interval", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.repeats}; "
          "ratio = minidiff / reference")
    for model in args.models:
        ref, ours, x, cond = build(model, args.latent)
        label = f"{model} (latent {args.latent}x{args.latent}, batch 2 with guidance)" if model == "sd15" else \
            f"{model} (256x256, batch 1)"
        print(f"\n== {label}")
        cases = [("forward", None, lambda: ours(x, 500, cond), lambda: ref_call(ref, x, 500, cond))]
        for n in [1] + args.intervals:
            name = f"DDIM {args.steps} steps " + ("uncached" if n == 1 else f"cached N={n}")
            cases.append((name, n, lambda n=n: our_sampling(ours, x, cond, args.steps, n),
                          lambda n=n: ref_sampling(ref, x, cond, args.steps, n)))
        timed(cases[0][2]), timed(cases[0][3])  # warm-up
        print(f"{'case':<28} {'minidiff s':>10} {'reference s':>11} {'ratio':>6} {'max |diff|':>11}"
              + ("" if args.no_memory else f" {'peak MiB ours':>13} {'peak MiB ref':>12}"))
        for name, n, fn_ours, fn_ref in cases:
            t_ours, t_ref = [], []
            for _ in range(args.repeats):
                seconds, out_ours = timed(fn_ours)
                t_ours.append(seconds)
                seconds, out_ref = timed(fn_ref)
                t_ref.append(seconds)
            a, b = statistics.median(t_ours), statistics.median(t_ref)
            line = f"{name:<28} {a:>10.2f} {b:>11.2f} {a / b:>6.2f} {(out_ours - out_ref).abs().max().item():>11.2e}"
            if not args.no_memory and n is not None:
                line += f" {peak_memory(model, 'ours', n, args):>13.0f} {peak_memory(model, 'ref', n, args):>12.0f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
