"""Measuring forecast and adaptive caching against reuse and against fewer steps, at equal MACs.

    minidiff bench adaptive --model weights/digits-cond --sampler ddim --steps 50 \
        --seeds 1 2 3 --budgets 0.1 0.2 0.3 0.4 0.5 [--plot docs/figures/adaptive_refreshes.png]

For every MAC budget (a fraction of the uncached run's U-Net MACs) each method gets as many full
steps as fit in it: fixed evenly spaced full steps with reuse or forecast of order 1 and 2, the
adaptive schedule with either signal, and plainly running fewer sampler steps. PSNR is against the
uncached run of `--steps` steps from the same noise and seed, averaged over seeds (a batch of
`--batch` samples each).
"""
from __future__ import annotations

import math
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .adaptive import AdaptiveSchedule, full_step_allowance
from .analysis import cached_layer, record_features
from .cache import FixedSchedule
from .cached_model import CachedModel, mac_fraction
from .frontier import format_rows
from .metrics import psnr
from .samplers import draws_noise, num_model_calls


# Each signal's threshold, chosen on calibration seeds 11-13 (DDIM 50, budget of uniform N=5).
THRESHOLDS = {"forecast": 0.03, "change": 0.2}


def even_full_steps(num_steps: int, count: int) -> list:
    """`count` full steps spread as evenly as integers allow, starting at step 0."""
    return sorted({int(i * num_steps / count) for i in range(count)})


def methods(pipe, calls: int, branch: int, ratio: float, budget: float, samples: int, stochastic: bool) -> dict:
    """name -> a function making a fresh cached model for one run at this budget."""
    net, allowed = pipe.denoiser, full_step_allowance(budget, calls, ratio)
    full = even_full_steps(calls, allowed)

    def adaptive(k: int, threshold: float, signal: str = "forecast"):
        decider = AdaptiveSchedule(samples, calls, order=k, threshold=threshold, allowed=allowed, signal=signal)
        return CachedModel(net, decider, branch=branch, forecast=k, samples=samples)

    made = {f"uniform k={k}": (lambda k=k: CachedModel(net, FixedSchedule(calls, full), branch=branch, forecast=k,
                                                       samples=samples)) for k in (0, 1, 2)}
    if not stochastic:  # the adaptive schedule's pacing alone, its signal ignored: what the signal adds
        made["paced k=2, no signal"] = lambda: adaptive(2, math.inf)
    for name, k, signal in (("adaptive k=0", 0, "change"), ("adaptive k=2, change signal", 2, "change"),
                            ("adaptive k=2, forecast signal", 2, "forecast")):
        if stochastic and k:
            continue
        made[name] = lambda k=k, signal=signal: adaptive(k, THRESHOLDS[signal], signal)
    return made


def _noise(pipe, batch: int, seed: int) -> torch.Tensor:
    return pipe.initial_noise(batch, generator=torch.Generator().manual_seed(seed))


def _images(pipe, model, noise, *, steps: int, sampler: str, cond, seed: int) -> torch.Tensor:
    """Decoded samples of `model` (any `(x, t, cond)` callable) from `noise`; seeded as generate seeds."""
    x = pipe.sample(model, noise.clone(), steps=steps, sampler=sampler, cond=cond,
                    generator=torch.Generator().manual_seed(seed), progress=False)
    return pipe.decode(x)


def fewer_steps(sampler: str, steps: int, budget: float) -> int:
    """The most sampler steps whose uncached run fits in `budget` of the full run's MACs."""
    calls = num_model_calls(sampler, steps)
    return max(1, next(s for s in range(steps, 0, -1) if num_model_calls(sampler, s) <= budget * calls + 1e-9))


@torch.inference_mode()
def compare(pipe, *, sampler: str = "ddim", steps: int = 50, seeds: Sequence[int] = (1, 2, 3), batch: int = 8,
            budgets: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5), branch: int = 0, log=print) -> list:
    """One row per (budget, method): MAC fraction spent, mean PSNR vs the uncached run, seconds per run."""
    labels = torch.arange(batch) % pipe.num_real_classes()
    calls = num_model_calls(sampler, steps)
    stochastic = draws_noise(sampler)
    noises = {seed: _noise(pipe, batch, seed) for seed in seeds}
    ratio = pipe.shallow_ratio(branch, noises[seeds[0]], labels)
    references = {seed: _images(pipe, pipe.denoiser, noises[seed], steps=steps, sampler=sampler, cond=labels,
                                    seed=seed) for seed in seeds}
    rows = []
    for budget in budgets:
        for name, make in methods(pipe, calls, branch, ratio, budget, batch, stochastic).items():
            scores, fractions, seconds, distinct = [], [], [], []
            for seed in seeds:
                model = make()
                start = time.perf_counter()
                images = _images(pipe, model, noises[seed], steps=steps, sampler=sampler, cond=labels, seed=seed)
                seconds.append(time.perf_counter() - start)
                scores.append(psnr(images, references[seed], per_image=True))
                per_sample = model.full_steps_per_sample
                fractions.append(mac_fraction(per_sample, calls, ratio))
                distinct.append(len({tuple(s) for s in per_sample}))
            rows.append({"budget": budget, "method": name, "mac_fraction": float(max(fractions)),
                         "psnr": float(np.mean(scores)), "psnr_min": float(min(scores)),
                         "seconds": float(np.median(seconds)), "distinct_schedules": max(distinct)})
            log(format_rows(rows[-1:], list(rows[-1])).splitlines()[-1])
        fewer = fewer_steps(sampler, steps, budget)
        scores = [psnr(_images(pipe, pipe.denoiser, noises[seed], steps=fewer, sampler=sampler, cond=labels,
                                   seed=seed), references[seed], per_image=True) for seed in seeds]
        rows.append({"budget": budget, "method": f"{fewer} steps, no cache",
                     "mac_fraction": num_model_calls(sampler, fewer) / calls, "psnr": float(np.mean(scores)),
                     "psnr_min": float(min(scores)), "seconds": None, "distinct_schedules": 1})
        log(format_rows(rows[-1:], list(rows[-1])).splitlines()[-1])
    return rows


def adjacent_similarity(pipe, *, sampler: str, steps: int, branch: int, seed: int, batch: int) -> np.ndarray:
    """(calls - 1,) cosine similarity of the cached deep feature between adjacent steps of the uncached run."""
    name = cached_layer(pipe.denoiser, branch)
    labels = (torch.arange(batch) % pipe.num_real_classes()).tolist()
    record = record_features(pipe, steps=steps, sampler=sampler, layers=[name], seed=seed, class_labels=labels,
                             batch_size=batch)
    features = record.features[name].double()
    return F.cosine_similarity(features[:-1], features[1:], dim=-1).mean(-1).numpy()


def plot_refreshes(full_steps_per_sample: Sequence[Sequence[int]], similarity: np.ndarray, path,
                   title: str = "") -> Optional[str]:
    """Where the adaptive schedule refreshed (samples x steps) above the deep feature's adjacent-step
    similarity along the uncached run, on one step axis. Returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    calls = len(similarity) + 1
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 4.5), sharex=True, height_ratios=(1.2, 1))
    for i, steps in enumerate(full_steps_per_sample):
        top.scatter(list(steps), [i] * len(steps), marker="|", s=120, color="black")
    top.set_ylim(len(full_steps_per_sample) - 0.5, -0.5)
    top.set_ylabel("sample")
    top.set_title(title or "full steps chosen by the adaptive schedule", fontsize=10)
    bottom.semilogy(np.arange(1, calls), np.clip(1 - similarity, 1e-6, None), marker=".", color="tab:blue")
    bottom.set_ylabel("1 - cos(step i-1, step i)\nof the cached feature")
    bottom.set_xlabel("model call (step)")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    path = str(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

