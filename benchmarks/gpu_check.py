"""The prepared GPU check: one script, under 8 minutes on one GPU, printing one table.

    python benchmarks/gpu_check.py          # CUDA, float16, SD1.5 U-Net at 512x512 (64x64 latents)
    python benchmarks/gpu_check.py --dry    # the same code paths on CPU at tiny sizes, in seconds

1. Parity: minidiff's U-Net against diffusers' on identical random weights, one forward in float32
   and in half precision (float16 on CUDA, bfloat16 in the dry run), plus a prepared text context.
2. Speed: 50-step PLMS and 25-step DPM++ 2M with classifier-free guidance (batch 1 image, U-Net
   batch 2), uncached and cached at N = 3 and 5 (branch 0), minidiff against diffusers (+
   DeepCache's helper when cached), each eager and under torch.compile, times medians of two.
   A sampler missing from minidiff.samplers.SAMPLERS is skipped with a message.
Compilation happens in untimed warm-up runs; past --budget seconds, compiled cases are skipped
(with a message) so the script finishes in time. The dry run compiles with the 'eager' backend:
dynamo traces the same graphs, without code generation.
"""
import argparse
import statistics
import sys
import time
import warnings

import torch

from vs_reference import SD15_UNET, build, compiled, ref_call, ref_sampling, our_sampling

warnings.filterwarnings("ignore")

SD15_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                     steps_offset=1)
TINY_SD = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
               in_channels=4, out_channels=4, sample_size=8, norm_num_groups=8,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
RUNS = {
    "gpu": dict(device="cuda", half=torch.float16, unet=SD15_UNET, latent=64, steps={"plms": 50, "dpmpp_2m": 25},
                backend="inductor", repeats=2, intervals=(1, 3, 5)),
    "dry": dict(device="cpu", half=torch.bfloat16, unet=TINY_SD, latent=8, steps={"plms": 4, "dpmpp_2m": 3},
                backend="eager", repeats=1, intervals=(1, 3)),  # N=5 runs N=3's code
}
GUIDANCE = 7.5


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = fn()
    sync(device)
    return time.perf_counter() - start, out


def relative_error(got, expected) -> float:
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max().clamp(min=1e-6)).item()


def parity(run) -> list:
    """Rows (what, relative max error) of one forward, float32 and half, plain and prepared context."""
    rows = []
    for dtype in (torch.float32, run["half"]):
        name = str(dtype).removeprefix("torch.")
        ref, ours, x, cond = build("sd15", run["latent"], run["device"], dtype, run["unet"])
        try:
            with torch.inference_mode():
                expected = ref_call(ref, x, 500, cond)
                rows.append((f"forward {name}", relative_error(ours(x, 500, cond), expected)))
                rows.append((f"forward {name}, prepared context",
                             relative_error(ours(x, 500, ours.prepare_context(cond)), expected)))
        except RuntimeError as e:  # report and go on: one failing row must not cost the whole check
            rows.append((f"forward {name}", f"FAILED: {str(e).splitlines()[0]}"))
        del ref, ours
    return rows


def speed(run, budget: float, started: float) -> list:
    """Rows (sampler, steps, N, {implementation: seconds}, max |diff| of final latents md vs df)."""
    from minidiff.samplers import SAMPLERS

    ref, ours, x, cond = build("sd15", run["latent"], run["device"], run["half"] if run["device"] == "cuda"
                               else torch.float32, run["unet"])
    x = torch.cat([x[:1], x[:1]])  # one image: the unconditional and the conditional half share it
    impls = {"md": ours, "df": ref}
    impls["df-c"], impls["md-c"] = compiled(ref, ours, backend=run["backend"])
    rows = []
    for sampler, steps in run["steps"].items():
        if sampler not in SAMPLERS:
            print(f"skipped {sampler}: not in minidiff.samplers.SAMPLERS on this branch", flush=True)
            continue
        for n in run["intervals"]:
            times, outs = {}, {}
            for name, model in impls.items():
                fn = our_sampling if name.startswith("md") else ref_sampling

                def go():
                    return fn(model, x, cond, steps, n, sampler=sampler, schedule=SD15_SCHEDULE, guidance=GUIDANCE)

                if name.endswith("-c"):
                    if time.perf_counter() - started > budget:
                        print(f"skipped {name} {sampler} N={n}: past the {budget:.0f} s budget", flush=True)
                        continue
                try:
                    if name.endswith("-c"):
                        timed(go, run["device"])  # warm-up: compiles
                    seconds = []
                    for _ in range(run["repeats"]):
                        t, outs[name] = timed(go, run["device"])
                        seconds.append(t)
                except RuntimeError as e:
                    print(f"FAILED {name} {sampler} N={n}: {str(e).splitlines()[0]}", flush=True)
                    continue
                times[name] = statistics.median(seconds)
            diff = (outs["md"].float() - outs["df"].float()).abs().max().item() if "md" in outs and "df" in outs \
                else float("nan")
            rows.append((sampler, steps, n, times, diff))
            print(f"  done {sampler} N={n} ({time.perf_counter() - started:.0f} s)", flush=True)
    return rows


def table(rows) -> str:
    names = ("md", "md-c", "df", "df-c")
    ratios = (("md", "df"), ("md-c", "df"), ("md-c", "df-c"))
    lines = [f"{'sampler':<9}{'steps':>6}{'N':>3}" + "".join(f"{n + ' s':>9}" for n in names)
             + "".join(f"{a + '/' + b:>11}" for a, b in ratios) + f"{'max|diff|':>11}"]
    for sampler, steps, n, times, diff in rows:
        cells = "".join(f"{times[m]:>9.3f}" if m in times else f"{'-':>9}" for m in names)
        cells += "".join(f"{times[a] / times[b]:>11.2f}" if a in times and b in times else f"{'-':>11}"
                         for a, b in ratios)
        lines.append(f"{sampler:<9}{steps:>6}{n:>3}{cells}{diff:>11.1e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="CPU, tiny U-Net, few steps: checks the code paths")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which compiled cases are skipped")
    args = parser.parse_args(argv)
    run = RUNS["dry" if args.dry else "gpu"]
    if run["device"] == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry on CPU", file=sys.stderr)
        return 1
    started = time.perf_counter()
    machine = torch.cuda.get_device_name() if run["device"] == "cuda" else "CPU (dry run)"
    print(f"{machine}, torch {torch.__version__}")
    print("\nparity with diffusers on identical random weights (max |diff| / max |reference|)")
    for what, err in parity(run):
        print(f"  {what:<34} {err if isinstance(err, str) else f'{err:.1e}'}")
    print(f"\nsampling, guidance {GUIDANCE}, latents {run['latent']}x{run['latent']}; md = minidiff, df = diffusers "
          "(+ DeepCache's helper when N > 1), -c = torch.compile; seconds (median of "
          f"{run['repeats']}) and ratios", flush=True)
    print(table(speed(run, args.budget, started)))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
