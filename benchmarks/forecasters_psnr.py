"""The literature's forecasters in real cached runs: PSNR against the uncached run, next to reuse and Lagrange.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/forecasters_psnr.py [--model weights/digits-cond] \
        [--seeds 1 2] [--batch 4] [--intervals 2 3 5] [--budgets 0.3] [--branch 0]

Where benchmarks/forecasters.py scores each rule teacher-forced (true features in, one forecast out),
this runs each as `cache_forecast`: its forecasts feed back through sampling, as in use. DDIM, the
same noise and labels (sample i has class i mod the number of classes) for every setting; per-image
PSNR (dB, capped at 100) of the decoded images against the uncached run of the same noise, mean over
all images. Higher is better. Adaptive columns give the MACs spent as well (capped by the budget).
"""
import argparse
import time

import torch

from minidiff.cache import FORECASTS
from minidiff.metrics import psnr
from minidiff.pipeline import load

METHODS = [f for f in FORECASTS if f != "auto"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="weights/digits-cond")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3])
    parser.add_argument("--branch", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = load(args.model)
    labels = [i % pipe.num_real_classes() for i in range(args.batch)] if pipe.num_real_classes() else None
    common = dict(steps=args.steps, sampler="ddim", class_labels=labels, batch_size=args.batch, progress=False)
    references = {s: pipe.generate(seed=s, **common) for s in args.seeds}

    settings = [(f"1:{n}", dict(cache_schedule="uniform", cache_interval=n)) for n in args.intervals]
    settings += [(f"adaptive {b:g}", dict(cache_schedule="adaptive", cache_budget=b)) for b in args.budgets]
    table = {}
    for method in METHODS:
        for label, options in settings:
            images, macs = [], []
            for seed in args.seeds:
                out = pipe.generate(seed=seed, cache_branch=args.branch, cache_forecast=method, **options, **common)
                images.append((out, references[seed]))
                macs.append(pipe.last_run.mac_fraction)
            cached, reference = (torch.cat(x) for x in zip(*images))
            table[method, label] = (psnr(cached, reference, per_image=True), sum(macs) / len(macs))

    print(f"{args.model}, DDIM {args.steps}, branch {args.branch}, seeds {args.seeds} x {args.batch} images; "
          f"per-image PSNR (dB) against the uncached run, higher is better")
    names = {0: "reuse (0)", 1: "lagrange 1", 2: "lagrange 2"}
    header = f"| {'forecast':<12} |" + "".join(f" {label:>13} |" for label, _ in settings)
    print(header)
    print("|" + "|".join("-" * (len(cell) - 1) + ":" for cell in header.split("|")[1:-1]) + "|")
    for method in METHODS:
        cells = []
        for label, _ in settings:
            value, mac = table[method, label]
            cells.append(f"{value:.2f} ({mac:.2f})" if label.startswith("adaptive") else f"{value:.2f}")
        print(f"| {names.get(method, method):<12} |" + "".join(f" {c:>13} |" for c in cells))
    print(f"(adaptive: PSNR (MACs spent over uncached); {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
