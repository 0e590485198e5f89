"""Calibrating a cache schedule: what reusing the cache costs, measured on one uncached run.

`trace` runs the uncached network once; `rollout_costs` (the sample's error, with every start rolled
out as one batched run) or `drift_costs` (the cached feature's own drift) turn it into segment costs;
`calibrate` writes them in the format `cache.calibrated_full_steps` reads (cache_schedule="calibrated").
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .analysis import cached_layer, cosine_matrix, recording
from .cache import CALIBRATION_FORMAT, CALIBRATION_VERSION, pack_segments
from .samplers import SharedNoise, changed_options, draws_noise, sampler_options
from .denoiser import FeatureCache


@dataclass
class Trajectory:
    """One uncached sampling run, kept for calibration: the denoiser's output at every model call
    and the state every requested branch would cache there (unreduced, on the pipeline's device)."""

    noise: torch.Tensor
    outputs: list
    hidden: dict  # branch -> [cached state at every call]
    cond: Optional[torch.Tensor]
    uncond: Optional[torch.Tensor]


@torch.inference_mode()
def trace(pipe, noise, *, steps, sampler, branches, cond=None, uncond=None, guidance_scale=None, seed=0,
          **options) -> Trajectory:
    """Run the uncached network once, keeping what calibration needs (a stochastic sampler draws its
    noise from `seed`, as the rollouts will)."""
    layer_of = {b: cached_layer(pipe.denoiser, b) for b in branches}
    hidden: dict = {b: [] for b in branches}
    outputs = []
    denoiser = pipe.make_denoiser(pipe.denoiser, cond, uncond, guidance_scale)  # tapped after guidance

    def recorder(name, h):
        for b, layer in layer_of.items():
            if layer == name:
                hidden[b].append(h)

    def tapped(x, t, cond=None):  # the conditioning is inside `denoiser` already
        outputs.append(denoiser(x, t))
        return outputs[-1]

    with recording(pipe.denoiser, recorder):
        pipe.sample(tapped, noise.clone(), steps=steps, sampler=sampler, generator=torch.Generator().manual_seed(seed),
                    progress=False, **options)
    return Trajectory(noise, outputs, hidden, cond, uncond)


class _Reuse:
    """`(x, t, cond)` running the shallow path on a given cache (one per group of rows of x)."""

    def __init__(self, net, branch, hidden):
        self.net, self.cache = net, FeatureCache(branch, hidden)

    def __call__(self, x, t, cond=None):
        return self.net.forward_shallow(x, t, cond, cache=self.cache)


def _tile(z: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    """n copies of a batch stacked along the batch dimension (None stays None)."""
    return None if z is None else z.repeat(n, *[1] * (z.ndim - 1))


class _Rollouts:
    """The denoiser for S sampling runs side by side, run s being the uncached run up to its full
    step s and reusing the cache of step s from then on (run S - 1 never reuses: the reference).

    Rows s*B .. (s+1)*B of x belong to run s. Up to step s a run's output is the recorded uncached
    one (its x is the uncached x, so nothing needs computing); after it, the runs that reuse run
    the shallow path together, `max_batch` rows at a time.
    """

    def __init__(self, pipe, trajectory: Trajectory, branch: int, guidance_scale, max_batch: int, on_input=None):
        self.pipe, self.trajectory, self.branch, self.guidance_scale = pipe, trajectory, branch, guidance_scale
        self.on_input = on_input  # on_input(j, x) sees every run's state entering model call j
        self.halves = 1 if trajectory.uncond is None else 2  # guidance: the U-Net sees [uncond; cond] rows
        self.batch = trajectory.noise.shape[0]
        self.group = max(1, max_batch // (self.batch * self.halves))
        self.calls = 0

    def __call__(self, x, t, cond=None):  # each run's conditioning comes from the trajectory
        j, b = self.calls, self.batch
        self.calls += 1
        if self.on_input is not None:
            self.on_input(j, x)
        runs = len(self.trajectory.outputs)
        out = _tile(self.trajectory.outputs[j], runs)
        hidden = self.trajectory.hidden[self.branch]
        for first in range(0, j, self.group):
            sources = range(first, min(j, first + self.group))
            n = len(sources)
            parts = [hidden[s].chunk(self.halves) for s in sources]
            cache = torch.cat([p[h] for h in range(self.halves) for p in parts])  # as the denoiser stacks rows
            reuse = _Reuse(self.pipe.denoiser, self.branch, cache)
            cond, uncond = _tile(self.trajectory.cond, n), _tile(self.trajectory.uncond, n)
            denoiser = self.pipe.make_denoiser(reuse, cond, uncond, self.guidance_scale)
            out[first * b:(first + n) * b] = denoiser(x[first * b:(first + n) * b], t)
        return out


@torch.inference_mode()
def rollout_costs(pipe, trajectory: Trajectory, branch: int, *, steps: int, sampler: str, guidance_scale=None,
                  max_batch: int = 256, seed: int = 0, **options) -> np.ndarray:
    """segments[s, e]: mean squared distance of the state entering model call e (for e = S: the final
    sample) from the uncached one, when full step s is followed by shallow steps reusing its cache
    (and nothing else changed). Every sampler feeds the model x_t, so costs share one scale across
    the run; the samplers' own states do not (Euler/Heun step x_t * sqrt(1 + sigma^2)).

    Every start s is rolled out at once as one batched sampling run, so a segment's cost includes
    how its errors add up and carry through the sampler's own updates. A sampler that draws noise
    (`samplers.draws_noise`) gives every rolled-out run the noise the traced run drew from `seed`
    (`SharedNoise`), so a cost is the cache's error alone, as a cached run and an uncached run from
    one seed differ.
    """
    runs, b = len(trajectory.outputs), trajectory.noise.shape[0]
    segments = np.zeros((runs, runs + 1))

    def distance(x):  # (runs,): each run's mean squared distance from the reference run (the last)
        reference = x[(runs - 1) * b:].double()
        return ((x.double().unflatten(0, (runs, b)) - reference) ** 2).flatten(1).mean(1).numpy()

    def measure(j, x):  # runs s < j have reused the cache of step s for calls s + 1 .. j - 1
        segments[:j, j] = distance(x)[:j]

    model = _Rollouts(pipe, trajectory, branch, guidance_scale, max_batch, on_input=measure)
    generator = torch.Generator().manual_seed(seed)
    if draws_noise(sampler, **options):
        generator = SharedNoise(generator, runs)
    final = pipe.sample(model, _tile(trajectory.noise, runs), steps=steps, sampler=sampler, generator=generator,
                        progress=False, **options)
    segments[:, runs] = distance(final)
    return segments


def drift_costs(trajectory: Trajectory, branch: int) -> np.ndarray:
    """segments[s, e] = sum over j in s .. e-1 of 1 - cos(h_s, h_j), the drift of the cached feature
    itself (mean over the batch)."""
    hidden = torch.stack([h.flatten(1) for h in trajectory.hidden[branch]]).cpu()  # (S, B, D)
    drift = np.triu(1.0 - cosine_matrix(hidden))
    return np.concatenate([np.zeros((len(drift), 1)), np.cumsum(drift, axis=1)], axis=1)


COSTS = {"output": "mean squared distance from the uncached x_t entering step e (the final sample for e = S) when "
                   "steps s+1 .. e-1 reuse the cache of full step s (batched rollouts along the uncached run)",
         "feature": "sum over steps j in s .. e-1 of 1 - cos(cached feature at s, at j)"}


def calibrate(pipe, *, steps: int = 50, sampler: str = "ddim", branch: int = 0, branches=None, cost: str = "output",
              batch_size: int = 8, seed: int = 0, class_labels=None, prompt=None, guidance_scale=None,
              eta: float = 0.0, karras_sigmas: bool = False,
              progress: bool = False) -> dict:
    """Measure, for each branch, the cost of every segment (a full step s whose cache serves steps up
    to e-1); return the calibration dict `calibrated_full_steps` (cache_schedule="calibrated") reads.

    `branch` is the default branch the schedule is chosen for; `branches` (default: just `branch`)
    are all branches measured. Calibrate on other noise (seed) than you evaluate on. The result holds
    for this sampler, its options and step count (`cache.check_calibration` enforces it). `progress`
    shows a bar (stderr) over the uncached run and each branch's measurement.
    """
    options = sampler_options(sampler, eta=eta, karras_sigmas=karras_sigmas)
    if cost not in COSTS:
        raise ValueError(f"unknown calibration cost {cost!r}; choose one of {sorted(COSTS)}")
    branches = sorted({branch, *(branches or [])})
    for b in branches:
        pipe.denoiser.check_branch(b)
    if class_labels is None and pipe.denoiser.config.num_classes is not None:
        class_labels = pipe.default_labels(batch_size)
    cond, uncond = pipe.conditioning(batch_size, class_labels=class_labels, prompt=prompt,
                                     guidance_scale=guidance_scale)
    noise = pipe.initial_noise(batch_size, generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    bar = tqdm(total=1 + len(branches), desc="calibrating", unit="pass", disable=not progress, dynamic_ncols=True)
    trajectory = trace(pipe, noise, steps=steps, sampler=sampler, branches=branches,
                       cond=cond, uncond=uncond, guidance_scale=guidance_scale, seed=seed, **options)
    bar.update(1)
    segments = {}
    for b in branches:
        bar.set_postfix(branch=b)
        segments[b] = (rollout_costs(pipe, trajectory, b, steps=steps, sampler=sampler,
                                     guidance_scale=guidance_scale, seed=seed, **options)
                       if cost == "output" else drift_costs(trajectory, b))
        bar.update(1)
    bar.close()
    return {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "cost": cost, "cost_meaning": COSTS[cost],
            "steps": steps, "model_calls": len(trajectory.outputs), "sampler": sampler,
            "sampler_options": changed_options(options), "draws_noise": draws_noise(sampler, **options), "branch": branch,
            "batch_size": batch_size, "seed": seed,
            "class_labels": None if cond is None or prompt is not None else cond.tolist(),
            "prompt": prompt, "guidance_scale": guidance_scale, "seconds": round(time.perf_counter() - start, 2),
            "segments": {str(b): pack_segments(m) for b, m in segments.items()}}
