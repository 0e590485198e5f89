"""`minidiff demo`: the shipped digits model sampled with and without DeepCache-style caching.

Same noise, same labels, DDIM 50 steps: once running the whole U-Net every step, once running it
in full only every N-th step and the shallow branch in between. Prints U-Net calls, wall time,
speedup, the MAC bound, the toy metrics of both (a small classifier's confidence and accuracy and a
Frechet distance in its feature space; not Inception FID) and the PSNR of cached vs uncached.

A text-to-image model (weights/scenes) gets the same comparison on 16 fixed scenes prompts, its
quality columns the share of samples the scenes classifier finds following their prompt.
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
from .scenes import parse_caption
from .scenes_metric import demo_prompts, following_shares, load_scene_metric

DEFAULT_MODEL = "digits-cond"
DEFAULT_CLASSIFIER = "digits-classifier"
DEFAULT_SCENES_CLASSIFIER = "scenes-classifier"  # the default --classifier of a text model
OUTPUTS = ("demo_uncached.png", "demo_cached.png", "demo_side_by_side.png")  # replaced by each run
MAX_SAMPLES = 4096  # one batch: generate's limit
HEADER = ["run", "steps", "full", "shallow", "wall s", "speedup", "MAC bound", "confident", "class acc", "toy FID",
          "PSNR dB"]
FOLLOWING = ("colour", "shape", "place", "relation", "all")  # SceneMetric.follows' attributes, the text columns
TEXT_NROW = 4  # the 16 prompts as a 4 x 4 grid
CAPTION_LINES = 3  # a relation prompt needs three lines under a 128 px tile


def network_name(pipe: Pipeline) -> str:
    """What the denoising network is called in messages: "U-Net" or "DiT"."""
    return {"unet": "U-Net", "dit": "DiT"}[pipe.denoiser_kind]


def run(pipe: Pipeline, noise, labels=None, *, prompts=None, steps, interval=1, branch=0, schedule="uniform",
        guidance=None) -> dict:
    """One sampling run (class labels or prompts); returns the images and what it cost."""
    start = time.perf_counter()
    images = pipe.generate(steps=steps, noise=noise, class_labels=labels, prompt=prompts, cache_interval=interval,
                           cache_branch=branch, cache_schedule=schedule, guidance_scale=guidance,
                           batch_size=noise.shape[0], progress=False)
    stats = pipe.last_run
    return {"images": images, "seconds": time.perf_counter() - start, "full": stats.full_calls,
            "shallow": stats.shallow_calls, "steps": stats.steps}


def table(rows: list, header: list = HEADER) -> str:
    lines = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def fmt(line):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))

    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(line) for line in lines[1:]])


def plans_of(interval: int, branch: int, schedule: str, sweep: bool) -> list:
    """(name, interval, schedule) of each run: uncached, the chosen caching, and with `sweep` more."""
    plans = [("uncached", 1, "uniform"), (f"N={interval} {schedule} b={branch}", interval,
                                          schedule)]
    if sweep:  # N=1 is the uncached run itself
        plans += [(f"N={n} {s} b={branch}", n, s) for s in ("uniform", "nonuniform") for n in (2, 3, 5, 10)
                  if (n, s) != (interval, schedule)]
    return plans


def time_plans(pipe: Pipeline, noise, plans: list, *, repeats: int, progress: bool, **inputs) -> dict:
    """{name: run} for each plan, the fastest of `repeats`; `inputs` are `run`'s (labels or prompts,
    steps, branch, guidance)."""
    results: dict = {}
    bar = tqdm(total=repeats * len(plans), desc="sampling", unit="run", disable=not progress, dynamic_ncols=True)
    for _ in range(repeats):  # interleaved, so a change in machine load hits every setting alike
        for name, n, kind in plans:
            bar.set_postfix_str(name)
            r = run(pipe, noise, interval=n, schedule=kind, **inputs)
            if name not in results or r["seconds"] < results[name]["seconds"]:
                results[name] = r
            bar.update(1)
    bar.close()
    return results


def print_mac_bound(name: str, chosen: dict, ratio: float):
    print(f"MAC bound of {name}: mac_bound({chosen['full']}, {chosen['shallow']}, {ratio:.3f}) = "
          f"{mac_bound(chosen['full'], chosen['shallow'], ratio):.2f}x (full, shallow calls, shallow/full MACs; "
          "compute only: wall time also pays per-call overhead)")


def save_pictures(out, uncached, cached, *, interval: int, branch: int, schedule: str):
    """The two grids alone and side by side (OUTPUTS), under `out`."""
    out = Path(out)
    label = f"cached N={interval}, branch {branch}" + ("" if schedule == "uniform" else f", {schedule} schedule")
    pictures = [uncached, cached, side_by_side([("uncached", uncached), (label, cached)])]
    for name, picture in zip(OUTPUTS, pictures):
        save_image(picture, out / name)
    print(f"wrote {out / OUTPUTS[2]} (uncached | {label}), {out / OUTPUTS[0]}, {out / OUTPUTS[1]}")


def demo(*, model=None, classifier=None, steps: int = 50, interval: int = 5, branch: int = 0, schedule="uniform",
         per_class=None, guidance=None, seed: int = 0, repeats: int = 3, sweep: bool = False, out="out",
         threads: int = 1, scale=None, progress: bool = True) -> list:
    """Sample the shipped (or given) model uncached and cached from the same noise; print the table,
    write the grids (images enlarged `scale` times; None: readable tiles), return the table's rows.
    `model` is a folder or a loaded Pipeline; a text model runs `text_demo`. `per_class` (None: 4)
    is for class-conditional models. `minidiff demo` (cli/generate.py) documents every argument."""
    if threads:
        torch.set_num_threads(threads)
    if isinstance(model, Pipeline):
        pipe, model_path = model, model.source
    else:
        model_path = Path(model) if model else find_weights(DEFAULT_MODEL)
        pipe = load(model_path)
    text = pipe.text_encoder is not None
    if text and per_class is not None:
        raise ValueError(f"per_class does not apply to a text model: its demo samples {len(demo_prompts())} fixed "
                         "scenes prompts")
    classifier_path = None if classifier == "none" else \
        classifier or find_weights(DEFAULT_SCENES_CLASSIFIER if text else DEFAULT_CLASSIFIER)
    if schedule == "calibrated" and pipe.calibration_error:
        raise ValueError(pipe.calibration_error)
    if schedule == "calibrated" and pipe.calibration is None:
        raise ValueError(f"the calibrated schedule needs {model_path / 'calibration.json'}; write it with "
                         f"minidiff analyze calibrate --model {model_path}, or choose another schedule")
    if text:
        return text_demo(pipe, model_path, classifier_path, steps=steps, interval=interval, branch=branch,
                         schedule=schedule, guidance=guidance, seed=seed, repeats=repeats, sweep=sweep, out=out,
                         scale=scale, progress=progress)
    per_class = 4 if per_class is None else per_class
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
    plans = plans_of(interval, branch, schedule, sweep)
    results = time_plans(pipe, noise, plans, repeats=repeats, progress=progress, labels=labels, steps=steps,
                         branch=branch, guidance=guidance)
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
    print_mac_bound(plans[1][0], results[plans[1][0]], ratio)
    if metric is not None:
        print("confident: max softmax >= 0.9; class acc: vs the requested label; toy FID: Frechet distance in a "
              "small digit classifier's features, NOT Inception FID (biased upwards at small n)")

    titles = class_titles(pipe.class_names, range(classes)) if 0 < classes <= 16 else None
    uncached = grid_image(base["images"], nrow, scale=scale, column_titles=titles)
    cached = grid_image(results[plans[1][0]]["images"], nrow, scale=scale, column_titles=titles)
    save_pictures(out, uncached, cached, interval=interval, branch=branch, schedule=schedule)
    return rows


def text_demo(pipe: Pipeline, model_path, classifier_path, *, steps: int, interval: int, branch: int, schedule: str,
              guidance, seed: int, repeats: int, sweep: bool, out, scale, progress: bool) -> list:
    """`demo` on a text model: the 16 prompts of scenes_metric.demo_prompts uncached and cached from
    the same noise, at the model's default guidance unless `guidance` is given; with a classifier
    (None: no quality columns), the share of samples following each part of their prompt."""
    prompts = demo_prompts()
    check_steps(steps, pipe.scheduler.num_train_timesteps)
    size = pipe.default_size
    check_grid(len(prompts), size, size, TEXT_NROW, scale if scale is not None else auto_scale(size, size),
               "each demo grid", caption_lines=CAPTION_LINES)
    metric = None if classifier_path is None else load_scene_metric(classifier_path)
    noise = pipe.initial_noise(len(prompts), generator=torch.Generator().manual_seed(seed))
    used = pipe.guidance_for(guidance)
    guided = f"guidance {used:g}" if used is not None and used > 1 else "no guidance"
    n_params = sum(param.numel() for param in pipe.denoiser.parameters())
    print(f"model {model_path} ({size}x{size} text-to-image, {n_params / 1e6:.2f}M-parameter {network_name(pipe)}), "
          f"DDIM {steps} steps, {len(prompts)} prompts, {guided}, seed {seed}, {torch.get_num_threads()} CPU thread(s)")

    cond = pipe.conditioning(1, prompt=prompts[:1])[0]
    macs = pipe.denoiser.macs(noise[:1], 500, cond, branch=branch)
    ratio = macs["shallow"] / macs["full"]
    print(f"{network_name(pipe)} MACs per image: full {macs['full'] / 1e6:.1f}M, shallow (branch {branch}) "
          f"{macs['shallow'] / 1e6:.1f}M ({ratio:.3f} of full)")

    run(pipe, noise[:2], prompts=prompts[:2], steps=2, guidance=guidance)  # warm-up
    plans = plans_of(interval, branch, schedule, sweep)
    results = time_plans(pipe, noise, plans, repeats=repeats, progress=progress, prompts=prompts, steps=steps,
                         branch=branch, guidance=guidance)
    base = results["uncached"]

    header = HEADER[:7] + (list(FOLLOWING) if metric is not None else []) + ["PSNR dB"]
    rows = []
    for name, r in results.items():
        shares = following_shares(metric, r["images"], prompts) if metric is not None else {}
        rows.append([name, r["steps"], r["full"], r["shallow"], f"{r['seconds']:.2f}",
                     f"{base['seconds'] / r['seconds']:.2f}x", f"{mac_bound(r['full'], r['shallow'], ratio):.2f}x",
                     *(f"{shares[k]:.3f}" for k in FOLLOWING if metric is not None),
                     "-" if r is base else f"{psnr(r['images'], base['images']):.1f}"])
    print(table(rows, header))
    print_mac_bound(plans[1][0], results[plans[1][0]], ratio)
    if metric is not None:
        singles = sum(parse_caption(p)["relation"] is None for p in prompts)
        print(f"share of samples the scenes classifier ({classifier_path}) finds following their prompt: colour, "
              f"shape and all (every part the prompt names; size not scored) of {len(prompts)}, place of the "
              f"{singles} single objects, relation of the {len(prompts) - singles} pairs")

    uncached = grid_image(base["images"], TEXT_NROW, scale=scale, captions=prompts, caption_lines=CAPTION_LINES)
    cached = grid_image(results[plans[1][0]]["images"], TEXT_NROW, scale=scale, captions=prompts,
                        caption_lines=CAPTION_LINES)
    save_pictures(out, uncached, cached, interval=interval, branch=branch, schedule=schedule)
    return rows
