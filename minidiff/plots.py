"""Every figure minidiff draws, in one style: a matplotlib `Figure` (no pyplot state), saved
atomically as PNG. matplotlib is optional (the `plot` extra)."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from .writing import atomic_path


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'minidiff[plot]'") from None
    return Figure(figsize=(width, height), dpi=100)


def _save_figure(fig, path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_heatmaps(matrices: dict, path, layers=None, *, columns: int = 4, title: str = "") -> Path:
    """Step x step similarity heatmaps like DeepCache's Fig. 2(b), one panel per layer, one PNG."""
    names = list(matrices) if layers is None else list(layers)
    columns = min(columns, len(names))
    rows = math.ceil(len(names) / columns)
    fig = _figure(2.6 * columns + 0.8, 2.5 * rows + (0.4 if title else 0))
    axes = fig.subplots(rows, columns, squeeze=False)
    image = None
    for ax, name in zip(axes.flat, names):
        image = ax.imshow(matrices[name], vmin=0.0, vmax=1.0, cmap="viridis", origin="upper")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.colorbar(image, ax=axes, shrink=0.8, label="cosine similarity")
    return _save_figure(fig, path)


def plot_depth(rows: list, path, title: str = "") -> Path:
    """1 - adjacent-step similarity against depth, log scale (lower = more stable)."""
    fig = _figure(max(6.0, 0.35 * len(rows)), 3.6)
    ax = fig.subplots()
    x = np.arange(len(rows))
    ax.semilogy(x, [max(1 - r["adjacent_mean"], 1e-7) for r in rows], "o-", label="1 - mean adjacent cosine")
    ax.semilogy(x, [max(1 - r["adjacent_min"], 1e-7) for r in rows], "s--", alpha=0.7,
                label="1 - min adjacent cosine (worst step)")
    for i, r in enumerate(rows):
        if r["layer"] == "mid":
            ax.axvline(i, color="grey", lw=0.8, ls=":")
    ax.set_xticks(x)
    ax.set_xticklabels([r["layer"] for r in rows], rotation=70, fontsize=7)
    ax.set_ylabel("change between adjacent steps")
    ax.set_title(title or "feature change per step vs depth (encoder -> bottleneck -> decoder)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_switch(result, path, layers: Sequence[str], title: str = "", samples: int = 3) -> Path:
    """Final-image and deep-feature agreement with both unswitched runs against the switch step k,
    above the final images of every run (one column per k, one row per sample)."""
    rows = result.rows
    shown = min(samples, next(iter(result.images.values())).shape[0])
    height = 10 / len(rows) * shown + 0.3  # square image cells across the full width
    fig = _figure(10, 3.8 + height)
    top, bottom = fig.subfigures(2, 1, height_ratios=[3.8, height])
    left, right = top.subplots(1, 2)
    k = [r["switch_at"] for r in rows]
    left.plot(k, [r["psnr_vs_old"] for r in rows], "o-", label="PSNR vs old label throughout")
    left.plot(k, [r["psnr_vs_new"] for r in rows], "s-", label="PSNR vs new label throughout")
    left.set_xlabel("switch step k")
    left.set_ylabel("PSNR of the final images (dB)")
    legend_on = left
    share = next((c for c in ("reads_as_new", "all_new") if c in rows[0]), None)
    if share is not None:
        legend_on = left.twinx()
        said = "reads the new class" if share == "reads_as_new" else "finds every attribute of the new prompt"
        legend_on.plot(k, [r[share] for r in rows], "k^:", label=f"classifier {said}")
        if f"{share}_cached" in rows[0]:
            legend_on.plot(k, [r[f"{share}_cached"] for r in rows], "v:", color="grey", label="... with the cache on")
        legend_on.set_ylim(-0.05, 1.05)
        legend_on.set_ylabel("share following the new condition")
    handles = [h for ax in dict.fromkeys([left, legend_on]) for h in ax.get_legend_handles_labels()[0]]
    legend_on.legend(handles=handles, fontsize=7, loc="center")
    for name in layers:
        right.plot(k, [r[f"{name}_final_cos_new"] for r in rows], "o-", label=f"{name}: final features vs new run")
        right.plot(k, [r[f"{name}_final_cos_old"] for r in rows], "s--", label=f"{name}: vs old run")
    right.set_xlabel("switch step k")
    right.set_ylabel("cosine similarity at the last step")
    right.legend(fontsize=7)
    if title:
        top.suptitle(title, fontsize=10)
    top.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.9, wspace=0.42)
    cells = bottom.subplots(shown, len(rows), squeeze=False)
    bottom.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.93, wspace=0.04, hspace=0.04)
    for column, (k, images) in enumerate(sorted(result.images.items())):
        cells[0, column].set_title(f"k={k}", fontsize=8)
        for ax, image in zip(cells[:, column], images[:shown]):
            ax.imshow(image.float().permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
    return _save_figure(fig, path)


def plot_frontier(rows: list, path, title: str = "") -> Path:
    """Left: PSNR against the schedule's MAC bound; right: measured speedup against that bound.
    One colour per schedule, one marker per branch."""
    fig = _figure(11, 4.2)
    quality, timing = fig.subplots(1, 2)
    colours = {"uniform": "tab:blue", "nonuniform": "tab:orange", "calibrated": "tab:green"}
    markers = "osD^v<>p*h"
    branches = sorted({r["branch"] for r in rows if r["schedule"] != "none"})
    for kind, colour in colours.items():
        for i, b in enumerate(branches):
            sel = sorted((r for r in rows if r["schedule"] == kind and r["branch"] == b), key=lambda r: r["interval"])
            if sel:
                style = dict(marker=markers[i % len(markers)], color=colour, alpha=0.85)
                quality.plot([r["mac_speedup"] for r in sel], [r["psnr"] for r in sel], label=f"{kind}, branch {b}",
                             **style)
                timing.plot([r["mac_speedup"] for r in sel], [r["speedup"] for r in sel], ls="none", **style)
    top = max(r["mac_speedup"] for r in rows)
    timing.plot([1, top], [1, top], color="grey", lw=0.8, ls=":", label="measured = MAC bound")
    quality.set_xlabel("MAC bound of the schedule (full-step MACs / schedule MACs)")
    quality.set_ylabel("PSNR vs uncached images (dB)")
    quality.legend(fontsize=7, ncol=2)
    timing.set_xlabel("MAC bound of the schedule")
    timing.set_ylabel("measured speedup (wall time vs uncached)")
    timing.legend(fontsize=7)
    for ax in (quality, timing):
        ax.grid(alpha=0.3)
    fig.suptitle(title or "quality and speed of cache schedules", fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_psnr_vs_macs(rows: list, path, title: str = "") -> Path:
    """PSNR against the MAC fraction of the uncached run, one panel per sampler (and step count), one
    line per cache schedule and branch, and the fewer-steps baseline as a black line."""
    runs = list(dict.fromkeys((r["sampler"], r["reference_steps"]) for r in rows))
    fig = _figure(4.2 * len(runs) + 0.6, 4.4)
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    colours = {"uniform": "tab:blue", "nonuniform": "tab:orange", "calibrated": "tab:green"}
    styles = ["-", "--", ":", "-."]
    for ax, (sampler, steps) in zip(axes, runs):
        mine = [r for r in rows if (r["sampler"], r["reference_steps"]) == (sampler, steps) and r["schedule"] != "none"]
        branches = sorted({r["branch"] for r in mine})
        for kind, colour in colours.items():
            for i, b in enumerate(branches):
                sel = sorted((r for r in mine if r["schedule"] == kind and r["branch"] == b),
                             key=lambda r: r["mac_fraction"])
                if sel:
                    ax.plot([r["mac_fraction"] for r in sel], [r["psnr"] for r in sel], marker="o", ms=3,
                            ls=styles[i % len(styles)], color=colour, label=f"{kind}, branch {b}")
        fewer = {r["steps"]: r for r in mine if r["schedule"] == "fewer_steps"}
        if fewer:
            sel = sorted(fewer.values(), key=lambda r: r["mac_fraction"])
            ax.plot([r["mac_fraction"] for r in sel], [r["psnr"] for r in sel], "k^-", ms=5, lw=1.6,
                    label="fewer steps (uncached)")
            for r in sel:
                ax.annotate(str(r["steps"]), (r["mac_fraction"], r["psnr"]), fontsize=6, xytext=(3, -8),
                            textcoords="offset points")
        ax.set_title(f"{sampler}, {steps} steps", fontsize=9)
        ax.set_xlabel("MACs / uncached run's MACs")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PSNR vs the uncached full-step run (dB)")
    axes[-1].legend(fontsize=6, loc="lower right")
    fig.suptitle(title or "quality against compute: caching and fewer steps", fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_loss(losses, png_path, *, missing_ok: bool = False):
    """Draw the loss curve from rows (step, loss, ...) or a loss.csv path (needs matplotlib, the `plot` extra)."""
    try:
        fig = _figure(6, 3.5)
    except ImportError:
        if missing_ok:
            return
        raise ImportError("plotting the loss needs matplotlib: pip install 'minidiff[plot]'") from None
    if isinstance(losses, (str, Path)):
        losses = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(io.StringIO(Path(losses).read_text()))]
    if not losses:
        return
    ax = fig.subplots()
    ax.plot([row[0] for row in losses], [row[1] for row in losses])
    ax.set(xlabel="step", ylabel="MSE of predicted noise", yscale="log", title="training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, png_path)


def plot_probe(result, path, title: str = "", source: str = "real", xlabel: str = ""):
    """Layer x timestep heatmap of held-out probe accuracy (noisy on the left, clean on the right)."""
    rows = [r for r in result.rows if r["source"] == source]
    key = "step" if source == "trajectory" else "timestep"
    columns = sorted({r[key] for r in rows}, reverse=key == "timestep")
    grid = np.full((len(result.layers), len(columns)), np.nan)
    for r in rows:
        grid[result.layers.index(r["layer"]), columns.index(r[key])] = r["accuracy"]
    fig = _figure(max(5.0, 0.45 * len(columns) + 2), max(3.0, 0.26 * len(result.layers) + 1.2))
    ax = fig.subplots()
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not math.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}"[1:] if grid[i, j] < 1 else "1", ha="center", va="center",
                        fontsize=5.5, color="white" if grid[i, j] < 0.6 else "black")
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns, fontsize=7, rotation=60)
    ax.set_yticks(range(len(result.layers)))
    ax.set_yticklabels(result.layers, fontsize=7)
    ax.set_xlabel(xlabel or ("sampling step (DDIM 50)" if key == "step" else "timestep t (noisy -> clean)"))
    ax.set_title(title or f"held-out linear-probe accuracy of the class ({source}; chance {result.chance:.2f})",
                 fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8, label="accuracy")
    return _save_figure(fig, path)
