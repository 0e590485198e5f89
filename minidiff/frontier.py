"""The speed/quality frontier of cache schedules: for each schedule, branch and budget, the measured
speedup over the uncached run (timed side by side), its MAC bound, and the images' PSNR against it."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .cache import calibrated_full_steps, mac_bound, make_schedule
from .metrics import psnr
from .samplers import num_model_calls


SCHEDULES = ("uniform", "nonuniform", "calibrated")


def frontier(pipe, *, steps: int = 50, sampler: str = "ddim", intervals=(2, 3, 5, 10), branches=(0, 1, 3),
             schedules=SCHEDULES, batch_size: int = 8, seed: int = 1, class_labels=None, prompt=None,
             guidance_scale=None, classifier=None, calibration: Optional[dict] = None, repeats: int = 2,
             log=print, on_row=None) -> list:
    """One row per (schedule, branch, interval): measured speedup against the uncached run, the MAC
    bound of that schedule, and the PSNR of the final images against the uncached run from the same
    noise (plus the toy classifier's accuracy where there is one).

    Every cached run is timed alternately with an uncached run, `repeats` times each, and the
    speedup is the ratio of the best times: on a shared machine both sides then see the same load.
    `on_row(row)` is called with each cached row as soon as it is measured.
    """
    unet = pipe.unet
    calls = num_model_calls(sampler, steps)
    kept = [b for b in branches if 0 <= b < unet.num_branches]
    if len(kept) < len(branches):
        log(f"skipping branches {sorted(set(branches) - set(kept))}: this U-Net has branches 0-{unet.num_branches - 1}")
    noise = pipe.initial_noise(batch_size, generator=torch.Generator().manual_seed(seed))
    labels = pipe.default_labels(batch_size) if unet.config.num_classes is not None and class_labels is None \
        else class_labels
    common = dict(steps=steps, sampler=sampler, noise=noise, class_labels=labels, prompt=prompt,
                  guidance_scale=guidance_scale, batch_size=batch_size, progress=False)

    def paired(**kwargs):
        uncached, cached = [], []
        for _ in range(repeats):
            pipe.generate(**common)
            uncached.append(pipe.last_run.seconds)
            images = pipe.generate(**common, **kwargs)
            cached.append(pipe.last_run.seconds)
        return images, min(uncached), min(cached)

    pipe.generate(**common)  # warm-up: first calls pay for allocation
    reference = pipe.generate(**common)
    cond, _ = pipe.conditioning(1, class_labels=None if labels is None else labels[:1], prompt=prompt)
    rows = [{"schedule": "none", "branch": "-", "interval": 1, "full_steps": calls, "seconds": None,
             "uncached_seconds": None, "speedup": 1.0, "mac_speedup": 1.0, "psnr": float("inf"),
             "accuracy": _accuracy(classifier, reference, labels)}]
    for b in kept:
        macs = unet.macs(noise[:1], 500, cond, branch=b)
        ratio = macs["shallow"] / macs["full"]
        for kind in schedules:
            if kind == "calibrated" and (calibration is None or str(b) not in calibration["segments"]):
                log(f"no calibration for branch {b}: skipping the calibrated schedule there")
                continue
            for n in intervals:
                full = (calibrated_full_steps(calibration, calls, n, b) if kind == "calibrated"
                        else make_schedule(kind, calls, n))
                images, base, seconds = paired(cache_interval=n, cache_branch=b, cache_schedule=full)
                count = len(full)
                rows.append({"schedule": kind, "branch": b, "interval": n, "full_steps": count, "seconds": seconds,
                             "uncached_seconds": base, "speedup": base / seconds,
                             "mac_speedup": mac_bound(count, calls - count, ratio),
                             "psnr": psnr(images, reference, per_image=True), "accuracy": _accuracy(classifier, images, labels)})
                if on_row is not None:
                    on_row(rows[-1])
    rows[0]["seconds"] = rows[0]["uncached_seconds"] = min([r["uncached_seconds"] for r in rows[1:]], default=None)
    return rows


def _accuracy(classifier, images, labels):
    if classifier is None or labels is None:
        return None
    return float((classifier(images) == torch.as_tensor(labels).cpu()).float().mean())


def format_rows(rows: list, columns: Sequence[str]) -> str:
    """A fixed-width text table of the given columns."""
    def cell(v):
        if isinstance(v, float):
            return "inf" if v == float("inf") else f"{v:.3f}"
        return "-" if v is None else str(v)

    table = [list(columns)] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in table)
