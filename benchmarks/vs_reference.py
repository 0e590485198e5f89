"""minidiff vs diffusers (+ DeepCache) on identical weights, measured side by side in one process.

    python benchmarks/vs_reference.py [--models sd15 church] [--latent 32] [--steps 20] [--repeats 3]
    python benchmarks/vs_reference.py --quick     # SD1.5 only, 10 steps, N=5, one repeat, no memory runs
    python benchmarks/vs_reference.py --models sd15 --forward-only --no-compile   # (a) alone, eager

For each model (random full-size weights: speed does not depend on them):
  (a) one U-Net forward, minidiff vs diffusers;
  (b) a DDIM run with caching at N = 3 and 5, minidiff vs diffusers + DeepCache.DeepCacheSDHelper;
  (c) the same run without caching.
Each case runs four ways: minidiff and diffusers, each eager and under torch.compile (default
inductor backend; minidiff compiles its full and shallow paths, diffusers its whole U-Net), and
four ratios are printed: minidiff eager and compiled, each over diffusers eager and compiled
(< 1 means minidiff is faster). Compilation happens in a warm-up run that is not timed.
minidiff eager runs as its Pipeline runs on CPU: float32 weights packed for oneDNN once
(minidiff/packing.py); --no-pack measures the plain layers.
Runs alternate so machine noise hits all alike; times are medians. Outputs are compared too.
Peak memory is the peak RSS of a child process that builds one implementation and runs one
configuration alone (--child), polled during the run.
SD1.5 runs with classifier-free guidance (batch 2, a 77-token context), as a pipeline would; the
text context's cross-attention keys and values are projected once per run, as `generate` does.
"""
import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
import types
import warnings
from typing import Optional

import torch

from minidiff import packing
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


def inputs(model: str, latent: int, device="cpu", dtype=torch.float32, context_dim=768):
    torch.manual_seed(1)
    if model == "church":
        return torch.randn(1, 3, 256, 256).to(device, dtype), None
    return torch.randn(2, 4, latent, latent).to(device, dtype), torch.randn(2, 77, context_dim).to(device, dtype)


def reference_unet(model: str, unet_kwargs: Optional[dict] = None):
    import diffusers

    torch.manual_seed(0)
    if model == "church":
        return diffusers.UNet2DModel(**CHURCH_UNET).eval()
    return diffusers.UNet2DConditionModel(**(unet_kwargs or SD15_UNET)).eval()


def build(model: str, latent: int, device="cpu", dtype=torch.float32, unet_kwargs: Optional[dict] = None,
          pack: bool = True):
    """(diffusers U-Net, minidiff U-Net with the same weights, x, cond) for one model."""
    from minidiff.checkpoint import load_weights
    from minidiff.unet import UNet
    from minidiff.formats.unet_keys import config_from_diffusers, diffusers_to_native

    ref = reference_unet(model, unet_kwargs)
    config = config_from_diffusers(dict(ref.config, _class_name=type(ref).__name__))
    ours = load_weights(UNet(config), diffusers_to_native(ref.state_dict(), config)).eval()
    ref, ours = ref.to(device, dtype), ours.to(device, dtype)
    if pack:
        packing.pack(ours)  # as a minidiff Pipeline does on CPU in float32 (a no-op elsewhere)
    context_dim = (unet_kwargs or SD15_UNET)["cross_attention_dim"]
    return ref, ours, *inputs(model, latent, device, dtype, context_dim)


def compiled(ref, ours, **kwargs):
    """Compiled twins: diffusers' whole U-Net (sharing its weights), minidiff's full and shallow paths
    (a copy: compile_paths replaces the model's own paths, and the eager run keeps them)."""
    ref_c = copy.copy(ref)  # a new attribute dict, the same parameters
    ref_c.compile(**kwargs)
    return ref_c, copy.deepcopy(ours).compile_paths(**kwargs)


def ref_call(ref, x, t, cond):
    if cond is None:
        return ref(x, t).sample
    return ref(x, t, encoder_hidden_states=cond).sample


REFERENCE_SCHEDULERS = {"ddim": "DDIMScheduler", "plms": "PNDMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


def reference_scheduler(sampler: str, schedule: dict):
    import inspect

    import diffusers

    cls = getattr(diffusers, REFERENCE_SCHEDULERS[sampler])
    accepted = inspect.signature(cls.__init__).parameters
    extra = {"ddim": dict(clip_sample=False), "plms": dict(skip_prk_steps=True), "dpmpp_2m": {}}[sampler]
    return cls(**{k: v for k, v in schedule.items() if k in accepted}, **extra)


def ref_sampling(ref, x, cond, steps, interval, branch=0, sampler="ddim", schedule=None, guidance=None):
    """diffusers' sampling loop, with DeepCache's helper wrapping the U-Net when interval > 1.

    With `guidance`, x and cond hold the unconditional and conditional halves (batch 2B)."""
    from DeepCache import DeepCacheSDHelper

    sched = reference_scheduler(sampler, schedule or {})
    sched.set_timesteps(steps)
    helper = None
    if interval > 1:
        helper = DeepCacheSDHelper(pipe=types.SimpleNamespace(unet=ref, scheduler=sched))
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
    if guidance is not None:
        x = x.chunk(2)[1]
    try:
        for t in sched.timesteps:
            if guidance is None:
                out = ref_call(ref, x, t, cond)
            else:
                uncond_out, cond_out = ref_call(ref, torch.cat([x, x]), t, cond).chunk(2)
                out = uncond_out + guidance * (cond_out - uncond_out)
            x = sched.step(out, t, x).prev_sample
    finally:
        if helper is not None:
            helper.disable()
    return x


def our_sampling(ours, x, cond, steps, interval, branch=0, sampler="ddim", schedule=None, guidance=None):
    """minidiff's loop: a sampler over the cached U-Net; the text context is prepared once per run."""
    from minidiff.cache import CachedUNet, uniform_schedule
    from minidiff.pipeline import Pipeline
    from minidiff.samplers import SAMPLERS, num_model_calls
    from minidiff.schedules import SchedulerConfig

    config = SchedulerConfig(**(schedule or {}))
    calls = num_model_calls(sampler, steps)
    cached = CachedUNet(ours, calls, uniform_schedule(calls, interval), branch)
    if guidance is None:
        prepared = ours.prepare_context(cond) if cond is not None else None
        denoiser = lambda z, t: cached(z, t, prepared)  # noqa: E731
    else:
        x, (uncond, cond) = x.chunk(2)[1], cond.chunk(2)
        denoiser = Pipeline(ours, config).make_denoiser(cached, cond, uncond, guidance)
    return SAMPLERS[sampler](denoiser, x, config, steps, progress=False)


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
    from minidiff.formats.unet_keys import config_from_diffusers

    model = args.models[0]
    x, cond = inputs(model, args.latent)
    if args.child == "ours":
        ref = reference_unet(model)
        config = config_from_diffusers(dict(ref.config, _class_name=type(ref).__name__))
        del ref
        ours = UNet(config).eval()
        if not args.no_pack:
            packing.pack(ours)
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
           "--steps", str(args.steps), "--interval", str(interval)] + (["--no-pack"] if args.no_pack else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)["peak_mib"]


IMPLEMENTATIONS = ("ours", "ours compiled", "ref", "ref compiled")
RATIOS = (("ours", "ref"), ("ours", "ref compiled"), ("ours compiled", "ref"), ("ours compiled", "ref compiled"))


def compare(model, args):
    ref, ours, x, cond = build(model, args.latent, pack=not args.no_pack)
    impls = {"ours": ours, "ref": ref}
    if not args.no_compile:
        impls["ref compiled"], impls["ours compiled"] = compiled(ref, ours)
    label = f"{model} (latent {args.latent}x{args.latent}, batch 2 with guidance)" if model == "sd15" else \
        f"{model} (256x256, batch 1)"
    print(f"\n== {label}")
    prepared = ours.prepare_context(cond) if cond is not None else None  # as every step of a run sees it
    cases = [("forward", None, lambda m: ours_or_ref(m, impls, x, cond, prepared))]
    for n in [] if args.forward_only else [1] + args.intervals:
        name = f"DDIM {args.steps} steps " + ("uncached" if n == 1 else f"cached N={n}")
        cases.append((name, n, lambda m, n=n: run_sampling(m, impls, x, cond, args.steps, n)))
    names = [m for m in IMPLEMENTATIONS if m in impls]
    ratios = [(a, b) for a, b in RATIOS if a in impls and b in impls]
    short = {"ours": "md", "ours compiled": "md-c", "ref": "df", "ref compiled": "df-c"}
    print("md = minidiff, df = diffusers (+ DeepCache when cached), -c = torch.compile; seconds, then ratios")
    header = f"{'case':<26}" + "".join(f"{short[m] + ' s':>9}" for m in names) \
        + "".join(f"{short[a] + '/' + short[b]:>11}" for a, b in ratios) + f" {'max|diff|':>9}"
    print(header + ("" if args.no_memory else f" {'peak MiB md':>11} {'peak MiB df':>11}"))
    for i, (name, n, run) in enumerate(cases):
        for m in names:  # warm-up: the first case for all, and every case compiles its graphs
            if i == 0 or "compiled" in m:
                timed(lambda: run(m))
        seconds = {m: [] for m in names}
        outs = {}
        for _ in range(args.repeats):
            for m in names:
                t, outs[m] = timed(lambda: run(m))
                seconds[m].append(t)
        med = {m: statistics.median(v) for m, v in seconds.items()}
        line = f"{name:<26}" + "".join(f"{med[m]:>9.2f}" for m in names) \
            + "".join(f"{med[a] / med[b]:>11.2f}" for a, b in ratios) \
            + f" {(outs['ours'] - outs['ref']).abs().max().item():>9.1e}"
        if not args.no_memory and n is not None:
            line += f" {peak_memory(model, 'ours', n, args):>11.0f} {peak_memory(model, 'ref', n, args):>11.0f}"
        print(line, flush=True)


def ours_or_ref(m, impls, x, cond, prepared):
    if m.startswith("ours"):
        return impls[m](x, 500, prepared)
    return ref_call(impls[m], x, 500, cond)


def run_sampling(m, impls, x, cond, steps, n):
    return (our_sampling if m.startswith("ours") else ref_sampling)(impls[m], x, cond, steps, n)


def main():
    retain_freed_memory()  # as minidiff's CLI does; in vs_reference.py both implementations share it
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sd15", "church"], choices=["sd15", "church"])
    parser.add_argument("--latent", type=int, default=32, help="SD1.5 latent size (64 = 512 px images)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--intervals", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child runs")
    parser.add_argument("--no-compile", action="store_true", help="eager only (compiling SD1.5 on CPU takes minutes)")
    parser.add_argument("--no-pack", action="store_true",
                        help="minidiff eager with plain CPU weights (no oneDNN packing, see minidiff/packing.py)")
    parser.add_argument("--quick", action="store_true", help="sd15, 10 steps, N=5, 1 repeat, no memory runs")
    parser.add_argument("--forward-only", action="store_true", help="only case (a), one U-Net forward")
    parser.add_argument("--child", choices=["ours", "ref"], help=argparse.SUPPRESS)
    parser.add_argument("--interval", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.models, args.steps, args.intervals, args.repeats, args.no_memory = ["sd15"], 10, [5], 1, True

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.repeats}; minidiff eager "
          + ("with plain weights" if args.no_pack or not packing.available() else "with oneDNN-packed weights"))
    for model in args.models:
        compare(model, args)


if __name__ == "__main__":
    main()
