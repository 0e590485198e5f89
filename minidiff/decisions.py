"""Per-sample decisions of the adaptive schedule across conditions: how far apart they are, and whether
they matter.

The adaptive schedule (minidiff.adaptive) decides per sample when to refresh the deep feature. On
the digits model the samples mostly decide alike (docs/adaptive.md); a text model, whose prompts ask
for more varied pictures, may not. `measure` answers four questions on one batch of varied
conditions (one per class, or scenes prompts), each against the uncached run from the same noise:

(a) how far the samples' full-step sets spread (mean pairwise Jaccard distance, std of their sizes);
(b) how much the cached deep feature changes per step, per sample, and where in the trajectory;
(c) whether the signal adds more than the pacer: the adaptive run against the pacer alone (the same
    allowance and credit, the signal ignored: threshold = inf) and against the batch-mean schedule
    (`mean_schedule`, one list for every sample); all spend the same MACs;
(d) whether a sample's own schedule beats another sample's: the adaptive schedules replayed as fixed
    per-sample lists (`PerSampleSchedule`), as chosen and rotated across the batch.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .adaptive import AdaptiveSchedule, full_step_allowance, relative_l1
from .analysis import cached_layer, record_features
from .cache import CacheOptions, FixedSchedule, explicit_schedule
from .cached_model import CachedModel, mac_fraction
from .metrics import psnr
from .samplers import num_model_calls


# -- decision sets ----------------------------------------------------------------------------------

def jaccard_distance(a: Sequence[int], b: Sequence[int]) -> float:
    """1 - |a & b| / |a | b| of two sets of full steps (0 for two empty sets)."""
    a, b = set(a), set(b)
    union = a | b
    return 0.0 if not union else 1 - len(a & b) / len(union)


def spread(full_steps_per_sample: Sequence[Sequence[int]]) -> dict:
    """How far apart the samples' full-step sets are: the mean Jaccard distance over all pairs, the
    mean and (population) std of the number of full steps, and how many distinct sets there are."""
    sets = [tuple(sorted(set(s))) for s in full_steps_per_sample]
    if not sets:
        raise ValueError("no samples: spread needs at least one full-step set")
    pairs = [jaccard_distance(a, b) for a, b in itertools.combinations(sets, 2)]
    counts = np.array([len(s) for s in sets], dtype=np.float64)
    return {"mean_jaccard": float(np.mean(pairs)) if pairs else 0.0, "mean_full": float(counts.mean()),
            "std_full": float(counts.std()), "distinct": len(set(sets))}


def mean_schedule(full_steps_per_sample: Sequence[Sequence[int]]) -> list:
    """The batch's average decision pattern as one list: the k-th full step is the mean position of
    every sample's k-th full step, rounded (half up). Each sample's steps rise by at least one, so the
    means do too and the list has as many steps as each sample ran, spending the same MACs. Samples
    with different numbers of full steps have no such average and are refused."""
    lists = [sorted(set(s)) for s in full_steps_per_sample]
    counts = {len(s) for s in lists}
    if len(counts) != 1:
        raise ValueError(f"the samples ran different numbers of full steps ({sorted(counts)}); no one schedule "
                         "spends the same MACs as all of them")
    means = np.array(lists, dtype=np.float64).mean(0)
    return [int(math.floor(m + 0.5)) for m in means]


def rotate(full_steps_per_sample: Sequence[Sequence[int]], shift: int) -> list:
    """Sample i gets the full steps of sample (i + shift) mod n: every set still used once, so the
    batch spends the same MACs."""
    n = len(full_steps_per_sample)
    return [list(full_steps_per_sample[(i + shift) % n]) for i in range(n)]


class PerSampleSchedule:
    """The decider of `CachedModel` for a fixed list of full steps per sample (the adaptive schedule's
    decisions, replayed or swapped). Step 0 is full for every sample, as in any schedule."""

    def __init__(self, num_calls: int, full_steps_per_sample: Sequence[Sequence[int]]):
        self.full_steps_per_sample = [explicit_schedule(num_calls, s) for s in full_steps_per_sample]
        self._full = [frozenset(s) for s in self.full_steps_per_sample]
        self.every_step_full = all(len(s) == num_calls for s in self._full)

    def decide(self, step: int, t: float, feature: torch.Tensor, samples: int, first: bool) -> torch.Tensor:
        if samples != len(self._full):
            raise ValueError(f"this schedule holds {len(self._full)} samples' full steps, the batch {samples}")
        return torch.tensor([first or step in s for s in self._full], dtype=torch.bool)

    def refreshed(self, rows: torch.Tensor, t: float, feature: torch.Tensor, batch: int):
        """A fixed list learns nothing from a refresh."""


# -- the deep feature's change ----------------------------------------------------------------------

def feature_change(features: torch.Tensor, samples: int) -> np.ndarray:
    """(S, rows, D) features of one run -> (S - 1, samples): the relative L1 change of each sample's
    feature from step s to s + 1 (the adaptive signal's formula). A guided batch holds two rows per
    sample; the larger change of the two counts, as the adaptive schedule decides from the larger."""
    steps, rows = features.shape[:2]
    if rows % samples:
        raise ValueError(f"{rows} rows cannot hold {samples} samples (one row each, or two with guidance)")
    change = torch.stack([relative_l1(features[s + 1].double(), features[s].double()) for s in range(steps - 1)])
    return change.view(steps - 1, rows // samples, samples).amax(1).numpy()


def change_summary(change: np.ndarray) -> dict:
    """Where and how much the feature changes: the mean over steps and samples, the mean in each third
    of the trajectory, the between-sample spread of each sample's mean change (std / mean), and the
    step of the largest change (median and range over samples)."""
    per_sample = change.mean(0)
    thirds = np.array_split(np.arange(change.shape[0]), 3)
    peaks = change.argmax(0)
    return {"mean": float(change.mean()), "early": float(change[thirds[0]].mean()),
            "middle": float(change[thirds[1]].mean()), "late": float(change[thirds[2]].mean()),
            "between_samples_cv": float(per_sample.std() / max(per_sample.mean(), 1e-30)),
            "peak_step": int(np.median(peaks)), "peak_min": int(peaks.min()), "peak_max": int(peaks.max())}


# -- conditions -------------------------------------------------------------------------------------

def scenes_conditions(count: int, seed: int = 0) -> list:
    """`count` scenes prompts, singles with places and two-object relations interleaved (two in five
    are pairs, the training stream's share), from scenes_metric's seeded prompt sets."""
    from .scenes_metric import pair_prompts, single_prompts

    if count < 1:
        raise ValueError(f"need at least one prompt, got {count}")
    pairs = count * 2 // 5
    singles = single_prompts(count - pairs, seed=seed)
    doubles = pair_prompts(pairs, seed=seed)
    out = []
    for i in range(count - pairs):
        out.append(singles[i])
        if i < pairs:
            out.append(doubles[i])
    return out


def conditions(pipe, count: Optional[int] = None, seed: int = 0) -> dict:
    """generate's keyword for `count` varied conditions: one per class in turn (default: every class),
    or scenes prompts for a text model (default 10)."""
    if pipe.denoiser.config.num_classes is not None:
        classes = pipe.num_real_classes()
        return {"class_labels": [i % classes for i in range(classes if count is None else count)]}
    return {"prompt": scenes_conditions(10 if count is None else count, seed)}


# -- the measurement --------------------------------------------------------------------------------

def _per_image_psnr(images: torch.Tensor, reference: torch.Tensor) -> list:
    return [psnr(images[i:i + 1], reference[i:i + 1], per_image=True) for i in range(len(images))]


@dataclass
class Batch:
    """One batch of varied conditions from one noise, with everything a cached run of it needs, and its
    uncached run: the reference images and the cached layer's features at every step."""

    pipe: object
    key: str  # "class_labels" or "prompt"
    values: list
    noise: torch.Tensor
    cond: object
    uncond: object
    guidance: Optional[float]
    steps: int
    sampler: str
    seed: int
    branch: int
    calls: int
    order: int  # the forecast order the adaptive schedule uses for this sampler ("auto")
    ratio: float  # shallow / full MACs
    layer: str
    features: torch.Tensor  # (calls, rows, D) of `layer`, uncached
    reference: torch.Tensor  # the uncached images

    @property
    def samples(self) -> int:
        return len(self.values)


@torch.inference_mode()
def prepare(pipe, condition: dict, *, steps: int = 50, sampler: str = "ddim", branch: int = 0, seed: int = 0,
            guidance_scale: Optional[float] = None) -> Batch:
    """`condition` is generate's keyword for the batch ({"class_labels": [...]} or {"prompt": [...]}),
    one sample per condition, noise from `seed`; guidance None is the model's default."""
    (key, values), = condition.items()
    n = len(values)
    guidance = pipe.guidance_for(guidance_scale)
    cond, uncond = pipe.conditioning(n, **{key: values}, guidance_scale=guidance)
    noise = pipe.initial_noise(n, generator=torch.Generator().manual_seed(seed))
    layer = cached_layer(pipe.denoiser, branch)
    record = record_features(pipe, steps=steps, sampler=sampler, layers=[layer], noise=noise, seed=seed,
                             batch_size=n, guidance_scale=guidance, **{key: values})
    return Batch(pipe, key, list(values), noise, cond, uncond, guidance, steps, sampler, seed, branch,
                 num_model_calls(sampler, steps), CacheOptions(schedule="adaptive").forecast_order(sampler),
                 pipe.shallow_ratio(branch, noise, cond), layer, record.features[layer], record.images)


@torch.inference_mode()
def run(batch: Batch, decider) -> dict:
    """The batch cached as `decider` says (any decider of `CachedModel`), at the adaptive schedule's
    forecast order: its images, per-sample PSNR against the uncached run, MAC fraction and full steps."""
    pipe = batch.pipe
    model = CachedModel(pipe.denoiser, decider, branch=batch.branch, forecast=batch.order, samples=batch.samples)
    x = pipe.sample(model, batch.noise.clone(), steps=batch.steps, sampler=batch.sampler, cond=batch.cond,
                    uncond=batch.uncond, guidance_scale=batch.guidance,
                    generator=torch.Generator().manual_seed(batch.seed), progress=False)
    images = pipe.decode(x)
    per_sample = [list(s) for s in model.full_steps_per_sample]
    return {"psnr": _per_image_psnr(images, batch.reference), "images": images, "full_steps_per_sample": per_sample,
            "mac_fraction": mac_fraction(per_sample, batch.calls, batch.ratio)}


def measure(batch: Batch, *, budget: float = 0.3, threshold: Optional[float] = None, swaps: int = 1) -> dict:
    """(a)-(d) of the module docstring for one prepared batch at a MAC budget. Returns the decisions,
    the feature change, and every run (`run`'s dict): "adaptive", "pacer only", "batch mean" (left out
    where the samples ran different numbers of full steps), "own (replayed)", "rotated r" (r = 1 ..
    swaps: sample i on sample i + r's schedule)."""
    n, calls = batch.samples, batch.calls
    allowed = full_step_allowance(budget, calls, batch.ratio)
    runs = {"adaptive": run(batch, AdaptiveSchedule(n, calls, order=batch.order, threshold=threshold,
                                                    allowed=allowed))}
    chosen = runs["adaptive"]["full_steps_per_sample"]
    runs["pacer only"] = run(batch, AdaptiveSchedule(n, calls, order=batch.order, threshold=math.inf,
                                                     allowed=allowed))
    try:
        runs["batch mean"] = run(batch, FixedSchedule(calls, mean_schedule(chosen)))
    except ValueError:  # unequal counts: no one schedule at the same MACs
        pass
    runs["own (replayed)"] = run(batch, PerSampleSchedule(calls, chosen))
    for r in range(1, min(swaps, n - 1) + 1):
        runs[f"rotated {r}"] = run(batch, PerSampleSchedule(calls, rotate(chosen, r)))
    change = feature_change(batch.features, n)
    return {"conditions": batch.values, "key": batch.key, "calls": calls, "allowed": allowed,
            "shallow_ratio": batch.ratio, "order": batch.order, "guidance": batch.guidance, "layer": batch.layer,
            "spread": spread(chosen), "pacer_spread": spread(runs["pacer only"]["full_steps_per_sample"]),
            "change": change, "change_summary": change_summary(change), "runs": runs,
            "differs": [sorted(chosen[i]) != sorted(chosen[(i + 1) % n]) for i in range(n)]}


def merge(results: Sequence[dict]) -> dict:
    """Several seeds' `measure` results as one: per-sample PSNRs and feature changes pooled over seeds,
    the spreads averaged."""
    first = results[0]
    runs = {name: {"psnr": [p for r in results for p in r["runs"][name]["psnr"]],
                   "mac_fraction": max(r["runs"][name]["mac_fraction"] for r in results)}
            for name in first["runs"] if all(name in r["runs"] for r in results)}
    average = lambda key: {k: float(np.mean([r[key][k] for r in results])) for k in first[key]}  # noqa: E731
    change = np.concatenate([r["change"] for r in results], axis=1)
    return {**{k: first[k] for k in ("conditions", "key", "calls", "allowed", "shallow_ratio", "order", "guidance",
                                      "layer")},
            "seeds": len(results), "spread": average("spread"), "pacer_spread": average("pacer_spread"),
            "change": change, "change_summary": change_summary(change), "runs": runs,
            "differs": [d for r in results for d in r["differs"]],
            "batch_mean_missing": sum("batch mean" not in r["runs"] for r in results)}


def format_result(result: dict, title: str = "") -> str:
    """The tables of one model: decisions, feature change, and PSNR of every run at the same MACs."""
    s, p, c = result["spread"], result["pacer_spread"], result["change_summary"]
    lines = [title] if title else []
    lines += [f"{len(result['conditions'])} conditions x {result.get('seeds', 1)} seed(s), {result['calls']} model "
              f"calls, allowance {result['allowed']} full steps (shallow/full MACs {result['shallow_ratio']:.3f}), "
              f"forecast order {result['order']}, guidance {result['guidance']}",
              "",
              "(a) decisions         mean Jaccard  distinct  full steps (std)",
              f"    adaptive          {s['mean_jaccard']:>12.3f}  {s['distinct']:>8.1f}  {s['mean_full']:.1f} "
              f"({s['std_full']:.2f})",
              f"    pacer only        {p['mean_jaccard']:>12.3f}  {p['distinct']:>8.1f}  {p['mean_full']:.1f} "
              f"({p['std_full']:.2f})",
              "",
              f"(b) change of {result['layer']} per step (relative L1): mean {c['mean']:.4f}; early {c['early']:.4f}, "
              f"middle {c['middle']:.4f}, late {c['late']:.4f}; between samples std/mean {c['between_samples_cv']:.3f}; "
              f"largest at step {c['peak_step']} ({c['peak_min']}-{c['peak_max']})",
              "",
              "(c, d) run             PSNR dB (worst)   MACs     vs adaptive"]
    base = np.array(result["runs"]["adaptive"]["psnr"])
    for name, run in result["runs"].items():
        scores = np.array(run["psnr"])
        lines.append(f"    {name:<17} {scores.mean():>7.2f} ({scores.min():>6.2f})  {run['mac_fraction']:.4f}  "
                     f"{scores.mean() - base.mean():+7.2f}")
    if result.get("batch_mean_missing"):
        lines.append(f"    (batch mean: left out for {result['batch_mean_missing']} seed(s) whose samples ran different "
                     "numbers of full steps)")
    own = np.array(result["runs"]["own (replayed)"]["psnr"])
    rotated = [name for name in result["runs"] if name.startswith("rotated")]
    if rotated:
        other = np.array(result["runs"][rotated[0]]["psnr"])
        differs = np.array(result["differs"])
        wins = int((own[differs] > other[differs]).sum())
        gain = float((own[differs] - other[differs]).mean()) if differs.any() else 0.0
        lines.append(f"    own vs neighbour's schedule: {int(differs.sum())} of {len(differs)} samples have a different "
                     f"neighbour; own wins on {wins}, by {gain:+.2f} dB on average over them")
    return "\n".join(lines)
