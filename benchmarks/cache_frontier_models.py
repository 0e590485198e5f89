"""Caching against fewer steps, on the U-Net and the DiT, at equal fractions of the uncached MACs.

    python benchmarks/cache_frontier_models.py --models weights/digits-cond weights/digits-dit \
        --per-class 4 --out docs/figures

For each model: the uncached DDIM-50 run is the reference. Every cache schedule (uniform and, where
the model folder has calibration.json, calibrated; at each branch given) costs a fraction
(full + shallow * r) / 50 of the reference's MACs, r = shallow/full MACs of that branch. The
"fewer steps" baseline at the same fraction is uncached DDIM with round(50 * fraction) steps. Each
row gives PSNR against the reference images (same noise) and the toy metric (confident, class
accuracy). Adaptive caching (another schedule) gets a column once it exists: pass --schedules.
"""
import argparse
import csv
from pathlib import Path

import torch

from minidiff import load
from minidiff.analysis import write_csv
from minidiff.cache import make_schedule
from minidiff.metrics import load_metric, psnr


def rows_for(model: str, *, per_class: int, intervals, branches, schedules, seed: int, metric) -> list:
    pipe = load(model)
    labels = torch.arange(10).repeat(per_class)
    size = pipe.default_size
    noise = torch.randn(len(labels), 1, size, size, generator=torch.Generator().manual_seed(seed))
    common = dict(class_labels=labels, noise=noise, progress=False)
    reference = pipe.generate(steps=50, **common)
    name = Path(model).name
    rows = []

    def add(kind, branch, interval, fraction, images, steps=50):
        scores = metric.score(images, labels)
        rows.append({"model": name, "schedule": kind, "branch": branch, "interval": interval, "steps": steps,
                     "mac_fraction": round(fraction, 4), "psnr": round(psnr(images, reference, per_image=True), 2),
                     "confident": round(scores.confident, 3), "accuracy": round(scores.accuracy, 3)})
        print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)

    add("none", "-", 1, 1.0, reference)
    fractions = set()
    for b in branches:
        if b >= pipe.denoiser.num_branches:
            continue
        macs = pipe.denoiser.macs(noise[:1], 500, labels[:1], branch=b)
        ratio = macs["shallow"] / macs["full"]
        for kind in schedules:
            if kind == "calibrated" and (pipe.calibration is None or str(b) not in pipe.calibration["segments"]):
                print(f"{name}: no calibration for branch {b}; skipping calibrated")
                continue
            for n in intervals:
                full = make_schedule(kind, 50, n, calibrated=pipe.calibration, branch=b)
                fraction = (len(full) + (50 - len(full)) * ratio) / 50
                images = pipe.generate(steps=50, cache_interval=n, cache_branch=b, cache_schedule=full, **common)
                add(kind, b, n, fraction, images)
                fractions.add(round(50 * fraction))
    for steps in sorted(fractions, reverse=True):
        add("fewer steps", "-", 1, steps / 50, pipe.generate(steps=steps, **common), steps=steps)
    return rows


def plot(rows: list, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    markers = {"uniform": "o", "calibrated": "s", "fewer steps": "^", "nonuniform": "D", "adaptive": "v"}
    lines = {"-": "--", "0": "-", "1": "-.", "2": ":", "3": (0, (1, 3))}
    for ax, metric, label in ((axes[0], "psnr", "PSNR vs uncached DDIM-50 (dB)"),
                              (axes[1], "accuracy", "toy class accuracy")):
        for m, colour in zip(models, ("tab:blue", "tab:red", "tab:green")):
            for kind, marker in markers.items():
                for branch in sorted({r["branch"] for r in rows if r["model"] == m and r["schedule"] == kind}, key=str):
                    sel = sorted((r for r in rows if r["model"] == m and r["schedule"] == kind
                                  and r["branch"] == branch), key=lambda r: r["mac_fraction"])
                    if sel:
                        ax.plot([r["mac_fraction"] for r in sel], [r[metric] for r in sel], marker=marker,
                                ls=lines.get(str(branch), "-"), color=colour,
                                alpha=0.5 if kind == "fewer steps" else 0.9, ms=4,
                                label=f"{m}: {kind}" + ("" if branch == "-" else f", branch {branch}"))
        ax.set_xlabel("fraction of the uncached run's MACs")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["weights/digits-cond", "weights/digits-dit"])
    p.add_argument("--classifier", default="weights/digits-classifier")
    p.add_argument("--per-class", type=int, default=4)
    p.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5, 10])
    p.add_argument("--branches", type=int, nargs="+", default=[0, 1])
    p.add_argument("--schedules", nargs="+", default=["uniform", "calibrated"])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="out/frontier-models")
    p.add_argument("--from-csv", nargs="+", help="only merge these frontier_models.csv files and plot them")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = [] if args.from_csv else None
    for path in args.from_csv or []:
        with open(path) as f:
            rows += [{**r, **{k: float(r[k]) for k in ("mac_fraction", "psnr", "confident", "accuracy")}}
                     for r in csv.DictReader(f)]
    models = [] if args.from_csv else args.models
    metric = None if args.from_csv else load_metric(args.classifier)
    rows = rows or []
    for model in models:
        rows += rows_for(model, per_class=args.per_class, intervals=args.intervals, branches=args.branches,
                         schedules=args.schedules, seed=args.seed, metric=metric)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "frontier_models.csv")
    plot(rows, out / "frontier_models.png")
    print(f"wrote {out / 'frontier_models.csv'}, {out / 'frontier_models.png'}")


if __name__ == "__main__":
    main()
