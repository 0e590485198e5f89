"""Where a model's step-to-step change lives: per layer, per step, and per token (spatial position).

    python benchmarks/token_change.py --models weights/digits-cond weights/digits-dit --out docs/figures

For every recorded layer of an uncached DDIM-50 run (one sample per class): the relative change
||h_{s+1} - h_s|| / ||h_s|| at every position (a DiT token, or a U-Net feature-map pixel), then
per step the ratio of the largest position's change to the mean position's (ToCa reports up to 2.5x
on PixArt-alpha), and the share of the layer's change carried by its top 10% of positions. A model
whose redundancy lives on the token axis has a large ratio: a few positions move, the rest stay.
"""
import argparse
from pathlib import Path

import numpy as np
import torch

from minidiff import load
from minidiff.analysis import record_features, write_csv


def token_rows(model: str, steps: int, per_class: int) -> list:
    pipe = load(model)
    labels = list(range(10)) * per_class
    record = record_features(pipe, steps=steps, batch_size=len(labels), class_labels=labels, seed=0)
    rows = []
    for name, feats in record.features.items():
        c, h, w = record.shapes[name]
        x = feats.reshape(feats.shape[0], feats.shape[1], c, h * w)  # (S, B, C, positions)
        change = (x[1:] - x[:-1]).norm(dim=2) / x[:-1].norm(dim=2).clamp_min(1e-8)  # (S-1, B, positions)
        change = change[:-1]  # the last step (t -> 0) is an outlier in every layer; keep it out of the means
        ratio = (change.max(-1).values / change.mean(-1)).mean().item()
        top = max(1, round(0.1 * h * w))
        share = (change.sort(-1, descending=True).values[..., :top].sum(-1) / change.sum(-1)).mean().item()
        rows.append({"model": Path(model).name, "layer": name, "positions": h * w,
                     "mean_change": round(change.mean().item(), 5), "max_over_mean": round(ratio, 3),
                     "top10pct_share": round(share, 3),
                     "change_by_step": " ".join(f"{v:.4f}" for v in change.mean((1, 2)).tolist())})
        print(f"{rows[-1]['model']:12s} {name:8s} {h * w:3d} positions  mean change {rows[-1]['mean_change']:.4f}  "
              f"max/mean {ratio:.2f}  top-10% share {share:.2f}", flush=True)
    return rows


def plot(rows: list, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8), dpi=110, squeeze=False)
    for ax, m in zip(axes[0], models):
        sel = [r for r in rows if r["model"] == m and not r["layer"].startswith("cache.")]
        for r, colour in zip(sel, plt.cm.viridis(np.linspace(0, 1, len(sel)))):
            ax.semilogy([float(v) for v in r["change_by_step"].split()], color=colour, lw=1, label=r["layer"])
        ax.set(title=f"{m}: relative change per step, by layer", xlabel="DDIM step s (change s -> s+1)",
               ylabel="||h_{s+1} - h_s|| / ||h_s||")
        ax.legend(fontsize=5, ncol=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["weights/digits-cond", "weights/digits-dit"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--per-class", type=int, default=1)
    p.add_argument("--out", default="out/token-change")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = [r for m in args.models for r in token_rows(m, args.steps, args.per_class)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "token_change.csv")
    plot(rows, out / "change_by_step.png")
    print(f"wrote {out / 'token_change.csv'}, {out / 'change_by_step.png'}")


if __name__ == "__main__":
    main()
