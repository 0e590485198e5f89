"""Measuring DeepCache's premise on a model: recording, similarity, depth profile, switch experiment.

DeepCache (Ma, Fang, Wang, CVPR 2024) rests on one observation: a U-Net's deep features change
little between adjacent denoising steps while the shallow skip features keep changing. This module
measures that on any minidiff model through the U-Net's `recorder` hook (nothing is patched):

- `record_features`: every layer's output at every step of a sampling run, kept on the CPU
- `similarity_matrices`, `summarize`, `plot_heatmaps`: step x step cosine similarity (their Fig. 2b)
- `depth_profile`: adjacent-step similarity from skip 0 down to the bottleneck and back up
- `switch_experiment`: change the class (or prompt) at step k; when does the image stop following?

Elsewhere: `calibration.calibrate` measures reuse costs and `cache.calibrated_full_steps` picks full
steps from them; `frontier.frontier` measures schedules; `plots` draws every figure.

Layer names follow the recorder, and each network names its own (`UNet.layer_names`: `enc.i`, `mid`,
`dec.i`; `DiT.layer_names`: `block.i`, `cache.b`), with the layer a shallow step reuses and a role.
"""
from __future__ import annotations

import csv
import io
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .writing import atomic_path
from .metrics import psnr
from .samplers import num_model_calls
from .cache import wrap
from .denoiser import Denoiser
from .scenes_metric import ATTRIBUTES
from .unet import PreparedContext

THRESHOLD = 0.95  # "similar" in DeepCache's sense


# -- layers ---------------------------------------------------------------------------------------

def layer_names(unet: Denoiser) -> list:
    """Recorder names in depth order (each network names its own: UNet.layer_names, DiT.layer_names)."""
    return unet.layer_names()


def cached_layer(unet: Denoiser, branch: int) -> str:
    """The layer whose output a shallow step at `branch` reuses (what FeatureCache.hidden holds)."""
    return unet.cached_layer(branch)


def layer_role(unet: Denoiser, name: str) -> str:
    """What a layer is in DeepCache's terms, for tables."""
    return unet.layer_role(name)


def _check_layers(unet: Denoiser, layers) -> list:
    names = layer_names(unet)
    if layers is None:
        return names
    layers = [layers] if isinstance(layers, str) else list(layers)
    unknown = [name for name in layers if name not in names]
    if unknown or not layers:
        raise ValueError(f"unknown layer(s) {unknown}; this model records {names[0]} .. {names[-1]}")
    return [name for name in names if name in layers]  # depth order, no repeats


# -- recording ------------------------------------------------------------------------------------

@contextmanager
def recording(unet: Denoiser, fn: Callable[[str, torch.Tensor], None]):
    """Set `unet.recorder = fn` for the duration of the block; it is removed even on error."""
    if unet.recorder is not None:
        raise RuntimeError("this U-Net already has a recorder attached; recordings cannot be nested")
    unet.recorder = fn
    try:
        yield
    finally:
        unet.recorder = None


class FeatureReducer:
    """A (B, C, H, W) layer output -> a (B, D) float32 CPU copy, reduced the same way at every step.

    `pool`: adaptive average pooling to pool x pool (only where the map is larger).
    `project`: feature hashing to `project` dims (each coordinate goes to one seeded random bucket
    with a random sign), a random projection that preserves inner products in expectation and
    needs O(D) memory; applied only where D is larger. Both bound memory; neither is needed for
    exact numbers.
    """

    def __init__(self, pool: Optional[int] = None, project: Optional[int] = None, seed: int = 0):
        for name, value in (("pool", pool), ("project", project)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or a positive int, got {value!r}")
        self.pool, self.project, self.seed = pool, project, seed
        self._hashes: dict = {}

    def __call__(self, name: str, h: torch.Tensor) -> torch.Tensor:
        h = h.detach()
        if self.pool is not None and (h.shape[-2] > self.pool or h.shape[-1] > self.pool):
            h = F.adaptive_avg_pool2d(h.float(), (min(h.shape[-2], self.pool), min(h.shape[-1], self.pool)))
        h = h.to(torch.float32).flatten(1)  # (B, C, H, W) -> (B, D)
        if self.project is not None and h.shape[1] > self.project:
            bucket, sign = self._hash(name, h.shape[1], h.device)
            h = torch.zeros(h.shape[0], self.project, device=h.device).index_add_(1, bucket, h * sign)
        return h.to("cpu", copy=True)

    def _hash(self, name: str, dim: int, device) -> tuple:
        key = (name, dim, str(device))
        if key not in self._hashes:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
            bucket = torch.randint(0, self.project, (dim,), generator=g)
            sign = torch.randint(0, 2, (dim,), generator=g).float() * 2 - 1
            self._hashes[key] = (bucket.to(device), sign.to(device))
        return self._hashes[key]


@dataclass
class FeatureRecord:
    """Layer outputs of one sampling run: features[name] is (steps, batch, D) float32 on the CPU."""

    features: dict
    shapes: dict  # name -> (C, H, W) of the unreduced output
    timesteps: list  # t of every model call
    sampler: str
    images: torch.Tensor

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.features.values())


def record_features(pipe, *, steps: int = 50, sampler: str = "ddim", layers=None, pool: Optional[int] = None,
                    project: Optional[int] = None, projection_seed: int = 0, **generate_kwargs) -> FeatureRecord:
    """Run `pipe.generate` once, keeping the chosen layers' outputs at every model call.

    The run is the uncached network (caching would skip the deep layers being measured), and the
    images are exactly those of the same call without recording. With guidance the U-Net sees the
    unconditional and conditional halves as one batch, so the record holds both.
    """
    cache_args = {k: v for k, v in generate_kwargs.items() if k.startswith("cache_")}
    if cache_args.get("cache_interval", 1) != 1 or not isinstance(cache_args.get("cache_schedule", "uniform"), str):
        raise ValueError("record_features measures the whole network at every step; leave cache_interval at 1 "
                         "and cache_schedule unset")
    unet = pipe.denoiser
    names = _check_layers(unet, layers)
    wanted = set(names)
    reduce = FeatureReducer(pool, project, projection_seed)
    kept: dict = {name: [] for name in names}
    shapes: dict = {}
    timesteps: list = []
    user_callback = generate_kwargs.pop("callback", None)

    def recorder(name, h):
        if name in wanted:
            shapes.setdefault(name, tuple(h.shape[1:]))
            kept[name].append(reduce(name, h))

    def callback(i, t, x):
        timesteps.append(int(t))
        if user_callback is not None:
            user_callback(i, t, x)

    generate_kwargs.setdefault("progress", False)
    with recording(unet, recorder):
        images = pipe.generate(steps=steps, sampler=sampler, callback=callback, **generate_kwargs)
    calls = num_model_calls(sampler, steps)
    for name in names:
        if len(kept[name]) != calls:
            raise RuntimeError(f"layer {name} was recorded {len(kept[name])} times in {calls} model calls")
    features = {name: torch.stack(kept[name]) for name in names}  # (S, B, D)
    return FeatureRecord(features, shapes, timesteps, sampler, images)


# -- similarity -----------------------------------------------------------------------------------

def cosine_matrix(features: torch.Tensor) -> np.ndarray:
    """(S, B, D) features -> (S, S) cosine similarity between steps, per sample, mean over the batch."""
    f = features.to(torch.float64)
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    sim = torch.einsum("sbd,tbd->st", f, f) / f.shape[1]
    sim = (sim + sim.T) / 2  # exactly symmetric
    return sim.clamp(-1.0, 1.0).numpy()


def similarity_matrices(record: FeatureRecord) -> dict:
    """{layer: (S, S) cosine similarity between the steps' features}, in depth order."""
    return {name: cosine_matrix(f) for name, f in record.features.items()}


def summarize(matrices: dict, threshold: float = THRESHOLD) -> dict:
    """Per layer: mean and minimum adjacent-step similarity, the fraction of step pairs above
    `threshold`, and the first step whose similarity to the final step's features exceeds it."""
    out = {}
    for name, sim in matrices.items():
        s = sim.shape[0]
        adjacent = np.diagonal(sim, 1) if s > 1 else np.ones(1)
        pairs = sim[np.triu_indices(s, 1)] if s > 1 else np.ones(1)
        final = np.nonzero(sim[:, -1] > threshold)[0]
        out[name] = {"adjacent_mean": float(adjacent.mean()), "adjacent_min": float(adjacent.min()),
                     "adjacent_min_step": int(adjacent.argmin()), "frac_above": float((pairs > threshold).mean()),
                     "close_to_final_from": int(final[0]) if len(final) else None}
    return out


def format_summary(summary: dict, threshold: float = THRESHOLD, roles: Optional[dict] = None) -> str:
    """A fixed-width table of `summarize` output."""
    lines = [f"{'layer':<8} {'adj. mean':>9} {'adj. min':>8} {'at':>4} {f'>{threshold:g}':>7} "
             f"{'~final from':>11}" + ("  role" if roles else "")]
    for name, row in summary.items():
        near = "-" if row["close_to_final_from"] is None else str(row["close_to_final_from"])
        lines.append(f"{name:<8} {row['adjacent_mean']:>9.4f} {row['adjacent_min']:>8.4f} "
                     f"{row['adjacent_min_step']:>4} {row['frac_above']:>7.1%} {near:>11}"
                     + (f"  {roles[name]}" if roles else ""))
    return "\n".join(lines)


def save_matrices(matrices: dict, path) -> Path:
    """All matrices in one .npz (keys are layer names)."""
    path = Path(path)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **matrices)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return path


# -- depth profile --------------------------------------------------------------------------------

def depth_profile(matrices: dict, unet: Denoiser, shapes: dict) -> list:
    """Adjacent-step similarity of every recorded layer in depth order (skip 0 .. bottleneck .. up)."""
    summary = summarize(matrices)
    return [{"position": i, "layer": name, "shape": "x".join(str(d) for d in shapes[name]),
             "role": layer_role(unet, name), **summary[name]} for i, name in enumerate(matrices)]


def format_depth(rows: list) -> str:
    lines = [f"{'layer':<7} {'C x H x W':>11} {'adj. mean':>9} {'1 - mean':>9} {'adj. min':>8} "
             f"{'>0.95':>6}  role"]
    for r in rows:
        lines.append(f"{r['layer']:<7} {r['shape']:>11} {r['adjacent_mean']:>9.4f} {1 - r['adjacent_mean']:>9.2e} "
                     f"{r['adjacent_min']:>8.4f} {r['frac_above']:>6.1%}  {r['role']}")
    return "\n".join(lines)


def write_csv(rows: list, path) -> Path:
    """Rows of dicts (same keys) as CSV, written atomically."""
    path = Path(path)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())
    return path


# -- switching the condition mid-run ----------------------------------------------------------------

class ConditionSwitch:
    """`model(x, t, cond)` that conditions on `after` instead of `before` from model call `at_step` on.

    A plain wrapper: the sampler and the U-Net are untouched. With guidance the pipeline's denoiser
    passes [uncond, cond] as one batch; only the conditional (last) half is switched. A text model
    is handed its context with keys and values projected (`PreparedContext`), so the switched
    context is projected once, by `prepare` (the network's `prepare_context`), the way the pipeline
    projects an unswitched one.
    """

    def __init__(self, model, at_step: int, before: torch.Tensor, after: torch.Tensor, prepare=None):
        if before.shape != after.shape:
            raise ValueError(f"the switched conditioning must match the original: {tuple(before.shape)} vs "
                             f"{tuple(after.shape)}")
        self.model, self.at_step, self.after, self.prepare = model, at_step, after, prepare
        self.calls = 0
        self._switched = None  # (the conditioning seen, its switched form): made once per run

    def __call__(self, x, t, cond=None):
        step = self.calls
        self.calls += 1
        if step >= self.at_step:
            cond = self._switch(cond)
        return self.model(x, t, cond)

    def _switch(self, cond):
        if self._switched is None or self._switched[0] is not cond:
            tokens = cond.tokens if isinstance(cond, PreparedContext) else cond
            switched = torch.cat([tokens[: tokens.shape[0] - len(self.after)], self.after.to(tokens.dtype)])
            if isinstance(cond, PreparedContext):
                switched = self.prepare(switched)
            self._switched = (cond, switched)
        return self._switched[1]


# -- switch experiment ----------------------------------------------------------------------------

@dataclass
class SwitchResult:
    """One row of measurements per switch step k (`rows`) and the final images of every run."""

    rows: list
    images: dict  # k -> (B, C, H, W) in [0, 1]; k = 0 is the new label throughout, k = calls the old
    cached_images: dict = field(default_factory=dict)  # the same runs with the cache on, if it was


def switch_experiment(pipe, *, old, new, steps: int = 50, sampler: str = "ddim", at_steps=None, batch_size: int = 8,
                      seed: int = 0, layers=None, guidance_scale=None, classifier=None, project: Optional[int] = 4096,
                      settle_factor: float = 2.0, threshold: float = THRESHOLD,
                      cache: Optional[dict] = None) -> SwitchResult:
    """Condition on `old`, switch to `new` at step k for each k in `at_steps`; measure what follows.

    `old`/`new` are class labels (ints) or prompts. Returns one row per k (k = 0 and k = the number
    of model calls being the runs that never switch) with the PSNR of the final images against the
    old-label and new-label runs and per deep layer the similarity of the final features to both
    runs, the feature jump at the switch (1 - cos between steps k-1 and k), the steps until they
    have settled (from then on changing from step to step at most `settle_factor` times as much as
    in the unswitched run, + 0.001), and the steps until they have joined the new run (`to_new_steps`:
    from then on their cosine to the never-switched new run's features at the same step stays above
    `threshold`; None if the last step is not).

    `classifier` scores the final images: the digits' toy classifier (`images -> class`) gives the
    share read as each class (`reads_as_old`, `reads_as_new`); a `SceneMetric` (prompts) gives, per
    attribute a prompt fixes, the share that follows each prompt (`colour_old`, `colour_new`, ...).

    `cache` (generate's `cache_*` keywords, e.g. {"cache_interval": 3}) runs every switch again with
    the cache on: `step_k` says whether call k was full or shallow (for the adaptive schedule, for
    how many samples), `psnr_cached_vs_uncached` compares with the uncached switch at the same k,
    and `*_new_cached` is the share following the new condition.
    """
    guidance_scale = pipe.guidance_for(guidance_scale)  # as generate reads it
    calls = num_model_calls(sampler, steps)
    at_steps = list(range(0, calls, max(1, calls // 10))) if at_steps is None else list(at_steps)
    if any(not isinstance(k, int) or not 0 <= k <= calls for k in at_steps):
        raise ValueError(f"switch steps must be ints in [0, {calls}] ({calls} model calls), got {at_steps}")
    unet = pipe.denoiser
    layers = _check_layers(unet, layers or ["mid", cached_layer(unet, unet.num_branches // 2)])
    key = "class_labels" if unet.config.num_classes is not None else "prompt"
    before, uncond = pipe.conditioning(batch_size, **{key: old}, guidance_scale=guidance_scale)
    after, _ = pipe.conditioning(batch_size, **{key: new})
    noise = pipe.initial_noise(batch_size, generator=torch.Generator().manual_seed(seed))
    prepare = unet.prepare_context if key == "prompt" else None
    reduce = FeatureReducer(project=project)

    def cached_model():
        options = {name.removeprefix("cache_"): value for name, value in cache.items()}
        return wrap(unet, calls=calls, x=noise, cond=before, sampler=sampler, steps=steps,
                    calibration=pipe.calibration, calibration_error=pipe.calibration_error, **options)

    if cache is not None:
        cached_model()  # the options are refused here, before any run, if they are wrong

    def run(at_step, cached=False):
        model = cached_model() if cached else unet
        kept = {name: [] for name in layers}

        def recorder(name, h):
            if name in kept:
                kept[name].append(reduce(name, h[-batch_size:]))  # the conditional half under guidance

        with recording(unet, recorder if not cached else lambda name, h: None):
            x = pipe.sample(ConditionSwitch(model, at_step, before, after, prepare), noise.clone(), steps=steps,
                            sampler=sampler, cond=before, uncond=uncond, guidance_scale=guidance_scale,
                            generator=torch.Generator().manual_seed(seed), progress=False)
        images = pipe.decode(x)
        if cached:
            return images, model.full_steps_per_sample
        return images, {name: torch.stack(f) for name, f in kept.items()}

    def follows(images, suffix=""):
        """Shares following each condition (only the new one for a cached run)."""
        if classifier is None:
            return {}
        if key == "class_labels":
            predicted = classifier(images)
            return {f"reads_as_{which}{suffix}": float((predicted == labels.cpu()).float().mean())
                    for which, labels in (("old", before), ("new", after)) if suffix == "" or which == "new"}
        return {f"{attribute}_{which}{suffix}": float(share.float().mean())
                for which, prompt in (("old", old), ("new", new)) if suffix == "" or which == "new"
                for attribute, share in classifier.follows(images, [prompt] * batch_size).items()
                if attribute in classifier.attributes(prompt)}

    old_images, old_feats = run(calls)
    new_images, new_feats = run(0)
    old_adjacent = {name: _adjacent(old_feats[name]) for name in layers}
    rows, finals, cached_finals = [], {}, {}
    for k in sorted(set(at_steps) | {0, calls}):
        images, feats = (old_images, old_feats) if k == calls else (new_images, new_feats) if k == 0 else run(k)
        finals[k] = images
        row = {"switch_at": k}
        if cache is not None:
            cached_finals[k], full_steps_per_sample = run(k, cached=True)
            full = sum(k in ran for ran in full_steps_per_sample)
            row["step_k"] = "-" if k == calls else "full" if full == batch_size else "shallow" if full == 0 \
                else f"{full}/{batch_size} full"
        row.update(psnr_vs_old=psnr(images, old_images, per_image=True),
                   psnr_vs_new=psnr(images, new_images, per_image=True), **follows(images))
        if cache is not None:
            row["psnr_cached_vs_uncached"] = psnr(cached_finals[k], images, per_image=True)
            row.update(follows(cached_finals[k], suffix="_cached"))
        for name in layers:
            f = feats[name]
            row[f"{name}_final_cos_old"] = _mean_cos(f[-1], old_feats[name][-1])
            row[f"{name}_final_cos_new"] = _mean_cos(f[-1], new_feats[name][-1])
            if 0 < k < calls:
                adjacent = _adjacent(f)  # adjacent[s]: cos(step s, step s + 1)
                row[f"{name}_jump"] = float(1 - adjacent[k - 1])
                change, usual = 1 - adjacent[k - 1:], 1 - old_adjacent[name][k - 1:]
                unsettled = np.nonzero(change > settle_factor * usual + 1e-3)[0]
                row[f"{name}_settle_steps"] = int(unsettled[-1] + 1) if len(unsettled) else 0
                row[f"{name}_to_new_steps"] = steps_above(_cos_per_step(f, new_feats[name]), k, threshold)
        rows.append(row)
    return SwitchResult(rows, finals, cached_finals)


def steps_above(cos: np.ndarray, start: int, threshold: float = THRESHOLD) -> Optional[int]:
    """Steps from `start` until `cos` (one value per step) is above `threshold` at every later step;
    None if the last step is not above it."""
    above = cos[start:] > threshold
    if not above[-1]:
        return None
    below = np.nonzero(~above)[0]
    return int(below[-1] + 1) if len(below) else 0


def last_followed(rows: list, column: str, calls: int, share: float = 0.5) -> Optional[int]:
    """The last switch step k (< calls) at which at least `share` of the batch still follows the new
    condition (`column`: that share in each row): by the next measured k the attribute is decided.
    None where not even the run conditioned on the new one throughout follows it."""
    followed = [r["switch_at"] for r in rows if r["switch_at"] < calls and r.get(column) is not None
                and r[column] >= share]
    return max(followed) if followed else None


def format_decided(rows: list, calls: int, share: float = 0.5) -> list:
    """One line per `*_new` column (with its cached twin): the last switch step still followed."""
    lines = []
    for column in [c for c in rows[0] if c == "reads_as_new" or c.removesuffix("_new") in ATTRIBUTES]:
        parts = []
        for label, col in (("", column), ("cached: ", f"{column}_cached")):
            if col in rows[0]:
                k = last_followed(rows, col, calls, share)
                later = [r["switch_at"] for r in rows if k is not None and r["switch_at"] > k]
                parts.append(label + ("none (not even from step 0)" if k is None else
                                      f"{k}" + (f" (not {later[0]})" if later else "")))
        name = column.removesuffix("_new").replace("reads_as", "class")
        lines.append(f"{name}: last switch step still followed (>= {share:.0%} of the batch), of {calls} calls: "
                     + "; ".join(parts))
    return lines


def _cos_per_step(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """(S, B, D) twice -> (S,) cosine similarity of the two runs' features at each step, mean over the batch."""
    return F.cosine_similarity(a.double(), b.double(), dim=-1).mean(-1).numpy()


def _mean_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def _adjacent(features: torch.Tensor) -> np.ndarray:
    """(S, B, D) -> (S - 1,) mean cosine similarity of each step's features with the next step's."""
    return _cos_per_step(features[:-1], features[1:])
