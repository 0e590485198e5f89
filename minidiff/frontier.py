"""The speed/quality frontier of cache schedules: for each schedule, branch and budget, the measured
speedup over the uncached run (timed side by side), its MAC bound, and the images' PSNR against it;
and for each budget the honest baseline, the same sampler with as many fewer steps as fit its MACs."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .cache import calibrated_full_steps, check_calibration, mac_bound, make_schedule
from .metrics import psnr
from .samplers import SAMPLERS, changed_options, num_model_calls, sampler_options


SCHEDULES = ("uniform", "nonuniform", "calibrated")
FEWER = "fewer_steps"  # the schedule name of the baseline rows


def fewer_steps(sampler: str, steps: int, full_calls: int, shallow_calls: int, full_macs: int,
                shallow_macs: int) -> int:
    """The most steps of `sampler` (at most `steps`, at least 1) whose uncached model calls cost no
    more MACs than a cached run of `full_calls` full and `shallow_calls` shallow calls:
    num_model_calls(sampler, k) <= floor((full_macs * full_calls + shallow_macs * shallow_calls) / full_macs)."""
    budget = (full_macs * full_calls + shallow_macs * shallow_calls) // full_macs  # in whole full calls
    k = steps
    while k > 1 and num_model_calls(sampler, k) > budget:
        k -= 1
    return k


def parse_samplers(text: str, default_steps: int) -> list:
    """"ddim:50,dpmpp_2m:20,euler_a" -> [("ddim", 50), ("dpmpp_2m", 20), ("euler_a", default_steps)]."""
    runs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, count = item.partition(":")
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r} in --samplers; choose from {sorted(SAMPLERS)}")
        try:
            steps = int(count) if count else default_steps
        except ValueError:
            raise ValueError(f"--samplers takes NAME or NAME:STEPS, got {item!r}") from None
        if steps < 1:
            raise ValueError(f"the step count of {name} must be at least 1, got {steps}")
        runs.append((name, steps))
    if not runs:
        raise ValueError("--samplers is empty; give e.g. ddim:50,dpmpp_2m:20")
    return runs


def frontier(pipe, *, steps: int = 50, sampler: str = "ddim", intervals=(2, 3, 5, 10), branches=(0, 1, 3),
             schedules=SCHEDULES, batch_size: int = 8, seed: int = 1, class_labels=None, prompt=None,
             guidance_scale=None, classifier=None, calibration: Optional[dict] = None, repeats: int = 2,
             eta: float = 0.0, karras_sigmas: bool = False, baseline: bool = True, log=print, on_row=None,
             images: Optional[dict] = None) -> list:
    """One row per (schedule, branch, interval): measured speedup against the uncached run, the MAC
    bound of that schedule, and the PSNR of the final images against the uncached run from the same
    noise (plus the toy classifier's accuracy where there is one). With `baseline`, one "fewer_steps"
    row per (branch, interval): `fewer_steps` uncached steps within the same MACs, same noise and
    seed (a stochastic sampler draws its i-th step's noise from the same generator), same reference.

    Every run is timed alternately with an uncached run, `repeats` times each, and the speedup is
    the ratio of the best times: on a shared machine both sides then see the same load (repeats=0:
    no timing, quality only). `on_row(row)` sees each row as it is measured; `images`, if a dict,
    receives each row's images under (schedule, branch, interval).
    """
    unet = pipe.denoiser
    options = sampler_options(sampler, eta=eta, karras_sigmas=karras_sigmas)
    calls = num_model_calls(sampler, steps)
    if calibration is not None and "calibrated" in schedules:
        check_calibration(calibration, sampler, changed_options(options), calls, steps)
    kept = [b for b in branches if 0 <= b < unet.num_branches]
    if len(kept) < len(branches):
        log(f"skipping branches {sorted(set(branches) - set(kept))}: this U-Net has branches 0-{unet.num_branches - 1}")
    noise = pipe.initial_noise(batch_size, generator=torch.Generator().manual_seed(seed))
    labels = pipe.default_labels(batch_size) if unet.config.num_classes is not None and class_labels is None \
        else class_labels
    common = dict(steps=steps, sampler=sampler, noise=noise, class_labels=labels, prompt=prompt, seed=seed,
                  guidance_scale=guidance_scale, batch_size=batch_size, progress=False, **options)

    def paired(**kwargs):
        run = {**common, **kwargs}
        uncached, cached, result = [], [], None
        for _ in range(repeats):
            pipe.generate(**common)
            uncached.append(pipe.last_run.seconds)
            result = pipe.generate(**run)
            cached.append(pipe.last_run.seconds)
        if result is None:
            result = pipe.generate(**run)
        return result, min(uncached, default=None), min(cached, default=None)

    pipe.generate(**common)  # warm-up: first calls pay for allocation
    reference = pipe.generate(**common)
    cond, _ = pipe.conditioning(1, class_labels=None if labels is None else labels[:1], prompt=prompt)
    rows = []

    def add(row, result):
        row.update(sampler=sampler, steps=row.get("steps", steps), mac_fraction=1 / row["mac_speedup"],
                   reference_steps=steps)
        rows.append(row)
        if images is not None:
            images[(row["schedule"], row["branch"], row["interval"])] = result
        if on_row is not None:
            on_row(row)

    add({"schedule": "none", "branch": "-", "interval": 1, "full_steps": calls, "seconds": None,
         "uncached_seconds": None, "speedup": 1.0, "mac_speedup": 1.0, "psnr": float("inf"),
         "accuracy": _accuracy(classifier, reference, labels)}, reference)
    baselines: dict = {}  # fewer steps -> (images, uncached seconds, seconds), shared by equal budgets
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
                result, base, seconds = paired(cache_branch=b, cache_schedule=full)  # the list holds n
                add(_row(kind, b, n, len(full), base, seconds, mac_bound(len(full), calls - len(full), ratio),
                         psnr(result, reference, per_image=True), _accuracy(classifier, result, labels)), result)
        if not baseline:
            continue
        for n in intervals:
            count = len(make_schedule("uniform", calls, n))  # every schedule kind has this many full calls
            k = fewer_steps(sampler, steps, count, calls - count, macs["full"], macs["shallow"])
            if k not in baselines:
                baselines[k] = paired(steps=k)
            result, base, seconds = baselines[k]
            add(_row(FEWER, b, n, num_model_calls(sampler, k), base, seconds, calls / num_model_calls(sampler, k),
                     psnr(result, reference, per_image=True), _accuracy(classifier, result, labels), steps=k), result)
    timed = [r["uncached_seconds"] for r in rows[1:] if r["uncached_seconds"] is not None]
    rows[0]["seconds"] = rows[0]["uncached_seconds"] = min(timed, default=None)
    return rows


def _row(kind, branch, interval, full_calls, base, seconds, mac_speedup, quality, accuracy, **extra) -> dict:
    return {"schedule": kind, "branch": branch, "interval": interval, "full_steps": full_calls, "seconds": seconds,
            "uncached_seconds": base, "speedup": None if seconds is None else base / seconds,
            "mac_speedup": mac_speedup, "psnr": quality, "accuracy": accuracy, **extra}


def _accuracy(classifier, images, labels):
    if classifier is None or labels is None:
        return None
    return float((classifier(images) == torch.as_tensor(labels).cpu()).float().mean())


def format_budgets(rows: list) -> str:
    """Markdown, one table per sampler: for each budget (branch, interval), the PSNR of every cache
    schedule next to the fewer-steps baseline at no more MACs; the best of them in bold."""
    kinds = [k for k in SCHEDULES if any(r["schedule"] == k for r in rows)]
    out = []
    for sampler, steps in dict.fromkeys((r["sampler"], r["reference_steps"]) for r in rows):
        mine = [r for r in rows if (r["sampler"], r["reference_steps"]) == (sampler, steps)]
        calls = mine[0]["full_steps"]
        out += [f"{sampler}, {steps} steps ({calls} model calls)", "",
                "| branch | 1:N | full calls | MACs | " + " | ".join(kinds) + " | fewer steps | their MACs | their PSNR |",
                "|---" * (7 + len(kinds)) + "|"]
        budgets = dict.fromkeys((r["branch"], r["interval"]) for r in mine if r["schedule"] != "none")
        for b, n in budgets:
            here = {r["schedule"]: r for r in mine if (r["branch"], r["interval"]) == (b, n)}
            cached = next((here[k] for k in kinds if k in here), None)
            fewer = here.get(FEWER)
            best = max(r["psnr"] for r in here.values())

            def cell(r):
                return "-" if r is None else (f"**{r['psnr']:.2f}**" if r["psnr"] == best else f"{r['psnr']:.2f}")

            out.append(f"| {b} | {n} | {cached['full_steps'] if cached else '-'} | "
                       f"{'-' if cached is None else format(cached['mac_fraction'], '.1%')} | "
                       + " | ".join(cell(here.get(k)) for k in kinds)
                       + (f" | {fewer['steps']} | {fewer['mac_fraction']:.1%} | {cell(fewer)} |" if fewer else
                          " | - | - | - |"))
        out.append("")
    return "\n".join(out)


def format_rows(rows: list, columns: Sequence[str]) -> str:
    """A fixed-width text table of the given columns."""
    def cell(v):
        if isinstance(v, float):
            return "inf" if v == float("inf") else f"{v:.3f}"
        return "-" if v is None else str(v)

    table = [list(columns)] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in table)
