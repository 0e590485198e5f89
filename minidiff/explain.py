"""`minidiff explain`: an offline page that teaches caching on a real model, from precomputed runs.

The page (minidiff/assets/explain.*) is hand-written HTML, CSS and JavaScript with no outside
resources; this module runs the model over a modest grid of cache settings and writes what the page
shows into `data.js` beside it (a plain script, so the page opens from disk with no server). Images
travel as PNG sprite sheets (one row per step, one column per sample) inside that script.

Everything that touches minidiff's caching API sits in the "adapter" section below (generate's
keywords, `last_run`, `make_schedule`, `mac_bound`, `unet.macs`), so a change there is one place to adjust.
"""
from __future__ import annotations

import base64
import json
import math
import shutil
import struct
import sys
import warnings
import zlib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from . import analysis
from .cache import mac_bound, make_schedule
from .writing import atomic_folder
from .metrics import psnr, toy_classifier
from .schedules import NoiseSchedule

PAGE_KIND = "explain page"  # what atomic_folder's marker names, so --overwrite replaces only such a folder
ASSETS = ("explain.html", "explain.css", "explain.js")
SAMPLER = "ddim"  # deterministic: the predicted clean image can be read back from consecutive samples
SEED = 0


@dataclass(frozen=True)
class Grid:
    """The settings the page precomputes. Uniform schedules get every forecast order; the others reuse."""

    steps: int = 50
    batch: int = 8
    intervals: tuple = (2, 3, 5, 10)
    forecasts: tuple = (0, 2)
    budgets: tuple = (0.3, 0.5, 0.7)
    schedules: tuple = ("uniform", "nonuniform", "calibrated")
    branch_count: int = 3  # branches spread from the shallowest to the deepest
    switches: int = 10  # switch-experiment steps
    timeline_intervals: tuple = tuple(range(1, 11))
    probe_count: int = 0  # real digits for the linear probes (half fit, half scored); 0: no probes
    probe_timesteps: tuple = (999, 800, 600, 400, 200, 0)
    probe_layers: int = 7  # spread over the depth


FULL = Grid()
QUICK = Grid(steps=10, batch=2, intervals=(2, 5), forecasts=(0, 2), budgets=(0.5,), schedules=("uniform", "nonuniform"),
             branch_count=2, switches=2, timeline_intervals=(1, 2, 3, 5), probe_timesteps=(900, 100), probe_layers=2)


# -- the adapter to minidiff's caching API -------------------------------------------------------

def conditioning_kwargs(pipe, batch: int) -> dict:
    """generate's conditioning keywords: one of each class in turn, or nothing for an unconditional model."""
    if pipe.denoiser.config.num_classes is not None:
        return {"class_labels": pipe.default_labels(batch)}
    if getattr(pipe.denoiser.config, "context_dim", None) is not None:
        return {"prompt": [""] * batch}
    return {}


def run_cached(pipe, grid: Grid, **cache) -> dict:
    """One seeded run at these cache settings: final images, the predicted clean image at every step,
    and what the run did (pipe.last_run)."""
    schedule = NoiseSchedule.from_config(pipe.scheduler, "cpu")
    stride = pipe.scheduler.num_train_timesteps // grid.steps
    noise = pipe.initial_noise(grid.batch, generator=torch.Generator().manual_seed(SEED))
    previous, predicted = [noise.float().cpu()], []

    def callback(i, t, x):  # DDIM at eta 0: x_prev = sqrt(a') x0 + sqrt(1 - a') eps, solved for x0
        a = float(schedule.alphas_cumprod[int(t)])
        a_prev = float(schedule.alphas_cumprod[int(t) - stride]) if int(t) - stride >= 0 \
            else float(schedule.final_alpha_cumprod)
        c = math.sqrt(1 - a_prev) / math.sqrt(1 - a)
        x = x.float().cpu()
        predicted.append((x - c * previous[-1]) / (math.sqrt(a_prev) - c * math.sqrt(a)))
        previous[-1] = x

    images = pipe.generate(steps=grid.steps, sampler=SAMPLER, noise=noise, progress=False, callback=callback,
                           **conditioning_kwargs(pipe, grid.batch), **cache).float().cpu()
    stats = pipe.last_run
    trajectory = torch.stack([pipe.decode(x0.to(pipe.device, pipe.dtype)).float().cpu() for x0 in predicted])
    return {"images": images, "trajectory": trajectory, "full_per_sample": [list(s) for s in stats.full_steps_per_sample],
            "mac_fraction": float(stats.mac_fraction), "model_calls": int(stats.model_calls)}


def cache_keywords(schedule: str, interval, branch: int, forecast: int, budget) -> dict:
    if schedule == "adaptive":
        return {"cache_schedule": "adaptive", "cache_branch": branch, "cache_budget": budget}
    return {"cache_schedule": schedule, "cache_interval": interval, "cache_branch": branch, "cache_forecast": forecast}


def shallow_macs(pipe) -> list:
    """Per branch: MACs of one full and one shallow step for one sample (unet.macs)."""
    x = pipe.initial_noise(1, generator=torch.Generator().manual_seed(SEED))
    cond, _ = pipe.conditioning(1, **conditioning_kwargs(pipe, 1))
    out = []
    with torch.inference_mode():
        for b in range(pipe.denoiser.num_branches):
            macs = pipe.denoiser.macs(x, 500, cond, branch=b)
            out.append({"branch": b, "full": int(macs["full"]), "shallow": int(macs["shallow"]),
                        "ratio": macs["shallow"] / macs["full"]})
    return out


def full_steps(pipe, kind: str, calls: int, interval: int, branch: int) -> list:
    return make_schedule(kind, calls, interval, calibrated=pipe.calibration if kind == "calibrated" else None,
                         branch=branch)


def least_budget(calls: int, ratio: float) -> float:
    """The smallest cache_budget an adaptive run can keep: one full step, then shallow ones."""
    return 1 / mac_bound(1, calls - 1, ratio)


def calibrated_branches(pipe) -> list:
    segments = (pipe.calibration or {}).get("segments", {})
    return sorted(int(b) for b in segments) if isinstance(segments, dict) else []


# -- the network as a drawing ------------------------------------------------------------------------

def network(pipe, shapes: dict, macs: list, grid: Grid) -> dict:
    """Blocks in depth order, the skip arrows, and per branch which blocks a shallow step runs."""
    unet = pipe.denoiser
    names = analysis.layer_names(unet)
    if pipe.denoiser_kind == "dit":  # a residual stream through `depth` blocks
        depth = unet.config.depth
        blocks = [{"name": f"block.{i}", "group": "block", "label": "attn + MLP", "shape": shapes.get(f"block.{i}")}
                  for i in range(depth)]
        live = [[f"block.{i}" for i in range(depth) if i <= b or i >= depth - 1 - b] for b in range(unet.num_branches)]
        skips, kind = [], "dit"
    else:
        n = len(unet.output_blocks)
        blocks = []
        for name in names:
            group = name.split(".")[0]
            layer = unet.middle_block if name == "mid" else getattr(unet, "input_blocks" if group == "enc"
                                                                  else "output_blocks")[int(name.split(".")[1])]
            blocks.append({"name": name, "group": group, "label": _layer_label(layer), "shape": shapes.get(name)})
        live = [[f"enc.{i}" for i in range(b + 1)] + [f"dec.{i}" for i in range(n - 1 - b, n)]
                for b in range(unet.num_branches)]
        skips, kind = [[f"enc.{i}", f"dec.{n - 1 - i}"] for i in range(n)], "unet"
    bounds = {str(m["branch"]): {str(k): mac_bound(1, k - 1, m["ratio"]) for k in grid.timeline_intervals}
              for m in macs}
    branches = [{**m, "live": live[m["branch"]], "cached": analysis.cached_layer(unet, m["branch"]),
                 "role": analysis.layer_role(unet, analysis.cached_layer(unet, m["branch"]))} for m in macs]
    return {"kind": kind, "blocks": blocks, "skips": skips, "branches": branches, "mac_bound": bounds}


def _layer_label(layer) -> str:
    """A block's parts in a few words ("res + attn", "res + up")."""
    words = {"inputconv": "conv in", "resblock": "res", "attention": "attn", "transformer": "attn",
             "downsample": "down", "upsample": "up"}  # by substring: packing may wrap a class in its own
    kinds = [type(m).__name__.lower() for m in layer]
    return " + ".join(next((w for key, w in words.items() if key in k), k) for k in kinds)


# -- images as PNG sprite sheets -----------------------------------------------------------------------

def png_data_uri(images: torch.Tensor) -> str:
    """(rows, cols, C, H, W) in [0, 1] -> a data: URI of one PNG sheet, interleaved by pixel row.

    Sheet row y * rows + r holds pixel row y of every image in row r (a step of a trajectory), side by
    side; consecutive steps of one pixel row then sit on adjacent scanlines, where the PNG "up" filter
    makes them compress about a third better than images stacked whole. explain.js reads it back.
    """
    rows, cols, channels, h, w = images.shape
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    if channels not in (1, 3):
        pixels, channels = pixels[:, :, :1].expand(-1, -1, 3, -1, -1), 3
    sheet = pixels.permute(3, 0, 1, 4, 2).reshape(h * rows, cols * w * channels).numpy().astype(np.int16)
    up = np.diff(sheet, axis=0, prepend=np.zeros((1, sheet.shape[1]), np.int16)) % 256  # filter 2: minus the row above
    raw = b"".join(b"\x02" + line.astype(np.uint8).tobytes() for line in up)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", cols * w, rows * h, 8, 0 if channels == 1 else 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _sprite(run: dict) -> str:
    return png_data_uri(run["trajectory"])  # (steps, batch, C, H, W)


# -- gathering everything ------------------------------------------------------------------------------

def grid_settings(pipe, grid: Grid, ratios: dict) -> list:
    """(schedule, interval, branch, forecast, budget) of every cached run the page can show; adaptive
    budgets a branch cannot keep (`least_budget`, with `ratios` its shallow/full MACs) are left out."""
    n = pipe.denoiser.num_branches
    count = min(grid.branch_count, n)
    branches = sorted({round(i * (n - 1) / max(1, count - 1)) for i in range(count)})
    calibrated = calibrated_branches(pipe)
    out = []
    for schedule in grid.schedules:
        for branch in branches:
            if schedule == "calibrated" and branch not in calibrated:
                continue
            for interval in grid.intervals:
                for forecast in grid.forecasts if schedule == "uniform" else (0,):
                    out.append((schedule, interval, branch, forecast, None))
    out += [("adaptive", None, branch, 2, budget) for branch in branches for budget in grid.budgets
            if budget >= least_budget(grid.steps, ratios[branch]) + 0.02]
    return out


def run_key(schedule, interval, branch, forecast, budget) -> str:
    """The page looks runs up by this string (explain.js builds the same one)."""
    return f"{schedule}|{interval if interval is not None else '-'}|{branch}|{forecast}|{budget if budget is not None else '-'}"


def gather(pipe, grid: Grid = FULL, *, model_dir=None, name: str = "", progress: bool = True) -> dict:
    """Run the grid and the measurements; returns the page's data (plain JSON types)."""
    macs = shallow_macs(pipe)
    settings = grid_settings(pipe, grid, {m["branch"]: m["ratio"] for m in macs})
    switches = grid.switches if pipe.denoiser.config.num_classes is not None else 0
    probes = grid.probe_count if can_probe(pipe) else 0
    bar = tqdm(total=len(settings) + 3 + switches + (1 if probes else 0), desc="explain", disable=not progress,
               file=sys.stderr)

    record = analysis.record_features(pipe, steps=grid.steps, sampler=SAMPLER, batch_size=grid.batch, seed=SEED,
                                      **conditioning_kwargs(pipe, grid.batch))
    matrices = analysis.similarity_matrices(record)
    depth = analysis.depth_profile(matrices, pipe.denoiser, record.shapes)
    shapes = {k: list(v) for k, v in record.shapes.items()}
    bar.update()
    base = run_cached(pipe, grid)
    calls = base["model_calls"]
    bar.update(2)

    runs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a calibration resampled to another step count
        for schedule, interval, branch, forecast, budget in settings:
            run = run_cached(pipe, grid, **cache_keywords(schedule, interval, branch, forecast, budget))
            runs[run_key(schedule, interval, branch, forecast, budget)] = {
                "schedule": schedule, "interval": interval, "branch": branch, "forecast": forecast, "budget": budget,
                "psnr": _finite(psnr(run["images"], base["images"])), "mac_fraction": round(run["mac_fraction"], 4),
                "full_per_sample": run["full_per_sample"], "sprite": _sprite(run)}
            bar.update()
    switch = switch_data(pipe, grid, model_dir, calls, bar) if switches else None
    probes = probe_data(pipe, grid, probes) if probes else None
    bar.update(1 if probes else 0)
    bar.close()
    cfg = pipe.denoiser.config
    return {
        "model": {"name": name, "kind": pipe.denoiser_kind,
                  "parameters": sum(p.numel() for p in pipe.denoiser.parameters()), "size": pipe.default_size,
                  "channels": cfg.in_channels, "classes": pipe.class_names,
                  "labels": conditioning_kwargs(pipe, grid.batch).get("class_labels")},
        "settings": {"steps": grid.steps, "sampler": SAMPLER, "batch": grid.batch, "seed": SEED, "calls": calls,
                     "intervals": list(grid.intervals), "forecasts": list(grid.forecasts), "budgets": list(grid.budgets),
                     "schedules": list(grid.schedules) + ["adaptive"]},
        "network": network(pipe, shapes, macs, grid),
        "timeline": timeline(pipe, grid, calls),
        "baseline": {"sprite": _sprite(base)},
        "runs": runs,
        "heatmaps": {"layers": list(matrices), "timesteps": record.timesteps,
                     "matrices": {k: [[round(float(v), 4) for v in row] for row in m] for k, m in matrices.items()}},
        "depth": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()} for row in depth],
        "switch": switch,
        "probes": probes,
    }


def timeline(pipe, grid: Grid, calls: int) -> dict:
    """Full steps of every fixed schedule at every interval (no sampling needed)."""
    branches = calibrated_branches(pipe)
    out = {"uniform": {}, "nonuniform": {}, "calibrated": {str(b): {} for b in branches}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for k in grid.timeline_intervals:
            out["uniform"][str(k)] = full_steps(pipe, "uniform", calls, k, 0)
            out["nonuniform"][str(k)] = full_steps(pipe, "nonuniform", calls, k, 0)
            for b in branches:
                out["calibrated"][str(b)][str(k)] = full_steps(pipe, "calibrated", calls, k, b)
    return out


def switch_data(pipe, grid: Grid, model_dir, calls: int, bar) -> dict:
    """The switch experiment (class `old` to `new` at step k) and its final images, one row per k."""
    n = pipe.num_real_classes()
    old, new = (3, 8) if n > 8 else (0, n - 1)
    at = sorted({round(i * calls / grid.switches) for i in range(1, grid.switches)} | {1})
    result = analysis.switch_experiment(pipe, old=old, new=new, steps=grid.steps, sampler=SAMPLER, at_steps=at,
                                        batch_size=grid.batch, seed=SEED, layers=[analysis.cached_layer(pipe.denoiser, 0)],
                                        classifier=toy_classifier(pipe, model_dir) if model_dir else None)
    bar.update(grid.switches)
    keys = sorted(result.images)
    sheet = torch.stack([result.images[k].float().cpu() for k in keys])
    rows = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
             if k in ("switch_at", "psnr_vs_old", "psnr_vs_new", "reads_as_old", "reads_as_new")} for row in result.rows]
    names = pipe.class_names or [str(i) for i in range(n)]
    return {"old": names[old], "new": names[new], "rows": rows, "at": keys, "sprite": png_data_uri(sheet)}


def can_probe(pipe) -> bool:
    """Probes read real digits, so only for a model trained on them, with scikit-learn (which ships them)."""
    import importlib.util

    dataset = pipe.meta.get("training", {}).get("config", {}).get("dataset")
    return dataset == "digits" and pipe.denoiser.config.num_classes is not None \
        and importlib.util.find_spec("sklearn") is not None


def probe_data(pipe, grid: Grid, count: int) -> dict:
    """Linear-probe accuracy (can a layer's pooled feature tell the digit?) per layer and timestep, on
    real digits noised to x_t; the pixels themselves are the control."""
    from . import probe

    images, labels = probe.real_digits(pipe, count, SEED)
    names = analysis.layer_names(pipe.denoiser)
    picks = sorted({round(i * (len(names) - 1) / max(1, grid.probe_layers - 1)) for i in range(grid.probe_layers)})
    result = probe.probe_real(pipe, images, labels, grid.probe_timesteps, layers=[names[i] for i in picks], seed=SEED)
    accuracy = {name: [next(r["accuracy"] for r in result.rows if r["layer"] == name and r["timestep"] == t)
                       for t in grid.probe_timesteps] for name in result.layers}
    return {"timesteps": list(grid.probe_timesteps), "layers": result.layers, "accuracy": accuracy,
            "chance": result.chance, "count": len(labels)}


def _finite(value: float) -> Optional[float]:
    return None if not math.isfinite(value) else round(value, 2)


# -- writing the page ----------------------------------------------------------------------------------

def write_page(data: dict, out, *, overwrite: bool = False) -> Path:
    """The page's files and data.js into `out`, in one rename (never a half-written folder)."""
    out = Path(out)
    with atomic_folder(out, overwrite=overwrite, kind=PAGE_KIND, marker=True) as tmp:
        assets = resources.files("minidiff") / "assets"
        for asset in ASSETS:
            target = "index.html" if asset == "explain.html" else asset
            with resources.as_file(assets / asset) as src:
                shutil.copyfile(src, tmp / target)
        payload = json.dumps(data, separators=(",", ":"), allow_nan=False)
        (tmp / "data.js").write_text(f"window.MINIDIFF_EXPLAIN = {payload};\n", encoding="utf-8")
    return out


def build(model, out, *, quick: bool = False, probes: int = 0, overwrite: bool = False, progress: bool = True) -> Path:
    """Load `model`, gather the page's data (with linear probes on `probes` real digits) and write it to `out`."""
    from .pipeline import load

    pipe = load(model)
    grid = replace(QUICK if quick else FULL, probe_count=probes)
    data = gather(pipe, grid, model_dir=model, name=Path(model).resolve().name, progress=progress)
    return write_page(data, out, overwrite=overwrite)


__all__ = ["Grid", "FULL", "QUICK", "build", "gather", "write_page", "png_data_uri", "run_key", "grid_settings"]
