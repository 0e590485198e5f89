"""Depth profiles of several models on one axis: 1 - mean adjacent-step cosine against relative depth.

    python benchmarks/depth_side_by_side.py out/depth-unet/depth.csv out/depth-dit/depth.csv --out docs/figures/depth_unet_dit.png

Reads the depth.csv files `minidiff analyze depth` writes. Depth runs from 0 (first layer) to 1
(last layer before the output); a DiT's cached residuals (`cache.b`) are left out of the curve.
"""
import argparse
import csv
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("csvs", nargs="+")
    p.add_argument("--out", default="out/depth_side_by_side.png")
    args = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for path in args.csvs:
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if not r["layer"].startswith("cache.")]
        x = [i / (len(rows) - 1) for i in range(len(rows))]
        line, = ax.semilogy(x, [1 - float(r["adjacent_mean"]) for r in rows], "o-", ms=3, label=Path(path).parent.name)
        for xi, r in zip(x, rows):
            ax.annotate(r["layer"], (xi, 1 - float(r["adjacent_mean"])), fontsize=5, color=line.get_color(),
                        xytext=(0, 3), textcoords="offset points", ha="center")
    ax.set(xlabel="relative depth (input -> output)", ylabel="1 - mean adjacent-step cosine",
           title="feature change per step against depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
