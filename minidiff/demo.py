"""`minidiff demo`: the shipped digits model sampled with and without DeepCache-style caching.

Same noise, same labels, DDIM 50 steps: once running the whole U-Net every step, once running it
in full only every N-th step and the shallow branch in between. Prints U-Net calls, wall time,
speedup, the MAC bound, the toy metrics of both (a small classifier's confidence and accuracy and a
Frechet distance in its feature space; not Inception FID) and the PSNR of cached vs uncached.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cache import mac_bound
from .checks import check_steps
from .data import find_weights
from .images import auto_scale, check_grid, class_titles, grid_image, save_image, side_by_side
from .metrics import load_metric, psnr
from .pipeline import Pipeline, load

DEFAULT_MODEL = "digits-cond"
DEFAULT_CLASSIFIER = "digits-classifier"
OUTPUTS = ("demo_uncached.png", "demo_cached.png", "demo_side_by_side.png")  # replaced by each run
MAX_SAMPLES = 4096  # one batch: generate's limit


def network_name(pipe: Pipeline) -> str:
    """What the denoising network is called in messages: "U-Net" or "DiT"."""
    return {"unet": "U-Net", "dit": "DiT"}[pipe.denoiser_kind]


def run(pipe: Pipeline, noise, labels, *, steps, interval=1, branch=0, schedule="uniform", guidance=None) -> dict:
    """One sampling run; returns the images and what it cost."""
    start = time.perf_counter()
    images = pipe.generate(steps=steps, noise=noise, class_labels=labels, cache_interval=interval,
                           cache_branch=branch, cache_schedule=schedule, guidance_scale=guidance,
                           batch_size=noise.shape[0], progress=False)
    stats = pipe.last_run
    return {"images": images, "seconds": time.perf_counter() - start, "full": stats.full_calls,
            "shallow": stats.shallow_calls, "steps": stats.steps}


def table(rows: list) -> str:
    header = ["run", "steps", "full", "shallow", "wall s", "speedup", "MAC bound", "confident", "class acc",
              "toy FID", "PSNR dB"]
    lines = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def fmt(line):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))

    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(line) for line in lines[1:]])


def demo(*, model=None, classifier=None, steps: int = 50, interval: int = 5, branch: int = 0, schedule="uniform",
         per_class: int = 4, guidance=None, seed: int = 0, repeats: int = 3, sweep: bool = False, out="out",
         threads: int = 1, scale=None, progress: bool = True) -> list:
    """Sample the shipped (or given) model uncached and cached from the same noise; print the table,
    write the grids (images enlarged `scale` times; None: readable tiles), return the table's rows.
    `model` is a folder or a loaded Pipeline. `minidiff demo` (cli.py) documents every argument."""
    if threads:
        torch.set_num_threads(threads)
    if isinstance(model, Pipeline):
        pipe, model_path = model, model.source
    else:
        model_path = Path(model) if model else find_weights(DEFAULT_MODEL)
        pipe = load(model_path)
    classifier_path = None if classifier == "none" else classifier or find_weights(DEFAULT_CLASSIFIER)
    if schedule == "calibrated" and pipe.calibration_error:
        raise ValueError(pipe.calibration_error)
    if schedule == "calibrated" and pipe.calibration is None:
        raise ValueError(f"the calibrated schedule needs {model_path / 'calibration.json'}; write it with "
                         f"minidiff analyze calibrate --model {model_path}, or choose another schedule")
    cfg = pipe.denoiser.config
    classes = pipe.num_real_classes() if cfg.num_classes else 0
    count = per_class * max(classes, 1)
    if count > MAX_SAMPLES:
        raise ValueError(f"per_class {per_class} makes {count} samples ({max(classes, 1)} classes); the demo samples "
                         f"them in one batch of at most {MAX_SAMPLES}")
    check_steps(steps, pipe.scheduler.num_train_timesteps)
    size = pipe.default_size
    nrow = classes if 0 < classes <= 16 else 8
    check_grid(count, size, size, nrow, scale if scale is not None else auto_scale(size, size), "each demo grid")
    metric = None if classifier_path is None else load_metric(classifier_path)
    labels = torch.arange(classes).repeat(per_class) if classes else None
    noise = torch.randn(count, cfg.in_channels, size, size, generator=torch.Generator().manual_seed(seed))
    n_params = sum(param.numel() for param in pipe.denoiser.parameters())
    print(f"model {model_path} ({size}x{size}, {n_params / 1e6:.2f}M parameters), DDIM {steps} steps, "
          f"{count} samples, seed {seed}, {torch.get_num_threads()} CPU thread(s)")

    macs = pipe.denoiser.macs(noise[:1], 500, None if labels is None else labels[:1], branch=branch)
    ratio = macs["shallow"] / macs["full"]
    print(f"{network_name(pipe)} MACs per image: full {macs['full'] / 1e6:.1f}M, shallow (branch {branch}) "
          f"{macs['shallow'] / 1e6:.1f}M ({macs['shallow'] / macs['full']:.3f} of full)")

    run(pipe, noise[:2], None if labels is None else labels[:2], steps=2, guidance=guidance)  # warm-up
    plans = [("uncached", 1, "uniform"), (f"N={interval} {schedule} b={branch}", interval,
                                          schedule)]
    if sweep:  # N=1 is the uncached run itself
        plans += [(f"N={n} {s} b={branch}", n, s) for s in ("uniform", "nonuniform") for n in (2, 3, 5, 10)
                  if (n, s) != (interval, schedule)]
    results: dict = {}
    bar = tqdm(total=repeats * len(plans), desc="sampling", unit="run", disable=not progress, dynamic_ncols=True)
    for _ in range(repeats):  # interleaved, so a change in machine load hits every setting alike
        for name, n, kind in plans:
            bar.set_postfix_str(name)
            r = run(pipe, noise, labels, steps=steps, interval=n, branch=branch, schedule=kind, guidance=guidance)
            if name not in results or r["seconds"] < results[name]["seconds"]:
                results[name] = r
            bar.update(1)
    bar.close()
    base = results["uncached"]

    rows = []
    for name, r in results.items():
        scores = metric.score(r["images"], labels) if metric is not None else None
        rows.append([name, r["steps"], r["full"], r["shallow"], f"{r['seconds']:.2f}",
                     f"{base['seconds'] / r['seconds']:.2f}x", f"{mac_bound(r['full'], r['shallow'], ratio):.2f}x",
                     "-" if scores is None else f"{scores.confident:.3f}",
                     "-" if scores is None or scores.accuracy is None else f"{scores.accuracy:.3f}",
                     "-" if scores is None else f"{scores.toy_fid:.2f}",
                     "-" if r is base else f"{psnr(r['images'], base['images']):.1f}"])
    print(table(rows))
    chosen = results[plans[1][0]]
    print(f"MAC bound of {plans[1][0]}: mac_bound({chosen['full']}, {chosen['shallow']}, {ratio:.3f}) = "
          f"{mac_bound(chosen['full'], chosen['shallow'], ratio):.2f}x (full, shallow calls, shallow/full MACs; "
          "compute only: wall time also pays per-call overhead)")
    if metric is not None:
        print("confident: max softmax >= 0.9; class acc: vs the requested label; toy FID: Frechet distance in a "
              "small digit classifier's features, NOT Inception FID (biased upwards at small n)")

    out = Path(out)
    titles = class_titles(pipe.class_names, range(classes)) if 0 < classes <= 16 else None
    uncached = grid_image(base["images"], nrow, scale=scale, column_titles=titles)
    cached = grid_image(results[plans[1][0]]["images"], nrow, scale=scale, column_titles=titles)
    label = f"cached N={interval}, branch {branch}" + ("" if schedule == "uniform" else f", {schedule} schedule")
    pictures = [uncached, cached, side_by_side([("uncached", uncached), (label, cached)])]
    for name, picture in zip(OUTPUTS, pictures):
        save_image(picture, out / name)
    print(f"wrote {out / OUTPUTS[2]} (uncached | {label}), {out / OUTPUTS[0]}, {out / OUTPUTS[1]}")
    return rows
