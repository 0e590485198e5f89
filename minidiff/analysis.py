"""Measuring DeepCache's premise on a model, and cache schedules calibrated from the measurement.

DeepCache (Ma, Fang, Wang, CVPR 2024) rests on one observation: a U-Net's deep features change
little between adjacent denoising steps while the shallow skip features keep changing. This module
measures that on any minidiff model through the U-Net's `recorder` hook (nothing is patched):

- `record_features`: every layer's output at every step of a sampling run, kept on the CPU
- `similarity_matrices`, `summarize`, `plot_heatmaps`: step x step cosine similarity (their Fig. 2b)
- `depth_profile`: adjacent-step similarity from skip 0 down to the bottleneck and back up
- `switch_experiment`: change the class (or prompt) at step k; when does the image stop following?
- `calibrate`, `calibrated_full_steps`: the full steps that minimise the error of reusing the cache
- `frontier`: measured speedup and quality of uniform, non-uniform and calibrated schedules

Layer names follow the recorder: `enc.i` is the output of input_blocks[i] (skip i), `mid` the
bottleneck, `dec.i` the output of output_blocks[i]. A shallow step at branch b reuses the state
entering output_blocks[-1 - b]: the output of `dec.{n - 2 - b}`, or of `mid` for the deepest branch.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .cache import make_schedule, save_calibrated
from .checkpoint import CheckpointError, atomic_path
from .samplers import SAMPLERS, num_model_calls
from .unet import FeatureCache, UNet

THRESHOLD = 0.95  # "similar" in DeepCache's sense
CALIBRATION_FORMAT = "minidiff-calibration"
CALIBRATION_VERSION = 1


# -- layers ---------------------------------------------------------------------------------------

def layer_names(unet: UNet) -> list:
    """Recorder names in depth order: enc.0 .. enc.n-1, mid, dec.0 .. dec.n-1 (a DiT names its own)."""
    if hasattr(unet, "layer_names"):
        return unet.layer_names()
    return ([f"enc.{i}" for i in range(len(unet.input_blocks))] + ["mid"]
            + [f"dec.{i}" for i in range(len(unet.output_blocks))])


def cached_layer(unet: UNet, branch: int) -> str:
    """The layer whose output a shallow step at `branch` reuses (what FeatureCache.hidden holds)."""
    if hasattr(unet, "cached_layer"):
        return unet.cached_layer(branch)
    unet._check_branch(branch)
    i = len(unet.output_blocks) - 2 - branch
    return "mid" if i < 0 else f"dec.{i}"


def layer_role(unet: UNet, name: str) -> str:
    """What a layer is in DeepCache's terms, for tables."""
    if hasattr(unet, "layer_role"):
        return unet.layer_role(name)
    n = len(unet.output_blocks)
    if name == "mid":
        return f"bottleneck, cached at branch {n - 1}"
    kind, i = name.split(".")
    if kind == "enc":
        return f"skip {i}"
    consumes = f"consumes skip {n - 1 - int(i)}"
    return consumes if int(i) == n - 1 else f"{consumes}, cached at branch {n - 2 - int(i)}"


def _check_layers(unet: UNet, layers) -> list:
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
def recording(unet: UNet, fn: Callable[[str, torch.Tensor], None]):
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
    unet = pipe.unet
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


# -- plots (matplotlib is optional) --------------------------------------------------------------

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


# -- depth profile --------------------------------------------------------------------------------

def depth_profile(matrices: dict, unet: UNet, shapes: dict) -> list:
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


# -- conditioning and custom runs -----------------------------------------------------------------

def condition(pipe, batch_size: int, *, class_labels=None, prompt=None):
    """The conditioning tensor `pipe.unet` takes for these labels or this prompt (None if unconditional)."""
    cfg = pipe.unet.config
    if cfg.num_classes is not None:
        labels = default_labels(pipe, batch_size) if class_labels is None else class_labels
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        return (labels.expand(batch_size) if labels.numel() == 1 else labels).to(pipe.device)
    if cfg.context_dim is not None:
        if prompt is None:
            raise ValueError("this model is text-conditioned: give a prompt (--prompt)")
        return pipe.encode_prompt([prompt] * batch_size if isinstance(prompt, str) else list(prompt))
    return None


def default_labels(pipe, batch_size: int) -> list:
    """One of each real class in turn (0, 1, 2, ...), for class-conditional models."""
    return [i % pipe._num_real_classes() for i in range(batch_size)]


def noise_for(pipe, batch_size: int, seed: int) -> torch.Tensor:
    """Initial noise at the model's default size, drawn as `generate` draws it."""
    cfg = pipe.unet.config
    size = pipe.default_size // pipe.latent_scale
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch_size, cfg.in_channels, size, size), generator=g).to(pipe.device, pipe.dtype)


def _guidance(pipe, guidance_scale, cond):
    """The unconditional conditioning for classifier-free guidance, or None without guidance."""
    if guidance_scale is None or guidance_scale == 1.0:
        return None
    if pipe.unet.config.num_classes is not None:
        if pipe.null_class is None:
            raise ValueError("this model has no unconditional class, so it cannot use guidance")
        return torch.full_like(cond, pipe.null_class)
    return pipe.encode_prompt([""] * cond.shape[0])


class ConditionSwitch:
    """`model(x, t, cond)` that conditions on `after` instead of `before` from model call `at_step` on.

    A plain wrapper: the sampler and the U-Net are untouched. With guidance the pipeline's denoiser
    passes [uncond, cond] as one batch; only the conditional (last) half is switched.
    """

    def __init__(self, model, at_step: int, before: torch.Tensor, after: torch.Tensor):
        if before.shape != after.shape:
            raise ValueError(f"the switched conditioning must match the original: {tuple(before.shape)} vs "
                             f"{tuple(after.shape)}")
        self.model, self.at_step, self.after = model, at_step, after
        self.calls = 0

    def __call__(self, x, t, cond=None):
        step = self.calls
        self.calls += 1
        if step >= self.at_step:
            cond = torch.cat([cond[: cond.shape[0] - len(self.after)], self.after])
        return self.model(x, t, cond)


@torch.inference_mode()
def sample_with(pipe, model, noise: torch.Tensor, *, steps: int, sampler: str = "ddim", cond=None, uncond=None,
                guidance_scale=None, seed: int = 0, output: str = "image") -> torch.Tensor:
    """Sample with any `model(x, t, cond)` callable in place of the cached U-Net, as `generate` would."""
    denoiser = pipe.make_denoiser(model, cond, uncond, guidance_scale)
    x = SAMPLERS[sampler](denoiser, noise.clone(), pipe.scheduler, steps, **_sampler_kwargs(sampler, seed))
    return x if output == "latent" else pipe.decode(x)


def _sampler_kwargs(sampler: str, seed: int, **kwargs) -> dict:
    """No progress bar, and a seeded generator for the samplers that draw noise."""
    if sampler != "plms":
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return {"progress": False, **kwargs}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over the batch of the PSNR (dB) between images in [0, 1]; 100 for identical images."""
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def toy_classifier(pipe, model_dir=None, classifier_dir=None):
    """`images -> predicted class` from the toy metric's classifier, or None where there is none.

    Without `classifier_dir`, looks beside the model folder for `{dataset}-classifier` (the dataset
    the model was trained on, from its config), e.g. weights/digits-classifier for weights/digits-cond.
    """
    if classifier_dir is None:
        dataset = pipe.meta.get("training", {}).get("config", {}).get("dataset")
        if model_dir is None or not isinstance(dataset, str):
            return None
        classifier_dir = Path(model_dir).resolve().parent / f"{Path(dataset).name}-classifier"
        if not (classifier_dir / "config.json").exists():
            return None
    from .toy_metric import load_metric

    network = load_metric(classifier_dir).classifier

    @torch.inference_mode()
    def predict(images: torch.Tensor) -> torch.Tensor:
        return network(images.float().cpu()).argmax(-1)

    return predict


# -- switch experiment ----------------------------------------------------------------------------

@dataclass
class SwitchResult:
    """One row of measurements per switch step k (`rows`) and the final images of every run."""

    rows: list
    images: dict  # k -> (B, C, H, W) in [0, 1]; k = 0 is the new label throughout, k = calls the old


def switch_experiment(pipe, *, old, new, steps: int = 50, sampler: str = "ddim", at_steps=None, batch_size: int = 8,
                      seed: int = 0, layers=None, guidance_scale=None, classifier=None, project: Optional[int] = 4096,
                      settle_factor: float = 2.0) -> SwitchResult:
    """Condition on `old`, switch to `new` at step k for each k in `at_steps`; measure what follows.

    `old`/`new` are class labels (ints) or prompts. Returns one row per k (k = 0 and k = the number
    of model calls being the runs that never switch) with the PSNR of the final images against the
    old-label and new-label runs, the share of images the toy classifier reads as each class, and
    per deep layer the similarity of the final features to both runs, the feature jump at the switch
    (1 - cos between steps k-1 and k) and the steps until they have settled: from then on changing
    from step to step at most `settle_factor` times as much as in the unswitched run (+ 0.001).
    """
    calls = num_model_calls(sampler, steps)
    at_steps = list(range(0, calls, max(1, calls // 10))) if at_steps is None else list(at_steps)
    if any(not isinstance(k, int) or not 0 <= k <= calls for k in at_steps):
        raise ValueError(f"switch steps must be ints in [0, {calls}] ({calls} model calls), got {at_steps}")
    unet = pipe.unet
    layers = _check_layers(unet, layers or ["mid", cached_layer(unet, unet.num_branches // 2)])
    key = "class_labels" if unet.config.num_classes is not None else "prompt"
    before = condition(pipe, batch_size, **{key: old})
    after = condition(pipe, batch_size, **{key: new})
    uncond = _guidance(pipe, guidance_scale, before)
    noise = noise_for(pipe, batch_size, seed)
    reduce = FeatureReducer(project=project)

    def run(at_step):
        kept = {name: [] for name in layers}

        def recorder(name, h):
            if name in kept:
                kept[name].append(reduce(name, h[-batch_size:]))  # the conditional half under guidance

        with recording(unet, recorder):
            images = sample_with(pipe, ConditionSwitch(unet, at_step, before, after), noise, steps=steps,
                                 sampler=sampler, cond=before, uncond=uncond, guidance_scale=guidance_scale,
                                 seed=seed)
        return images, {name: torch.stack(f) for name, f in kept.items()}

    old_images, old_feats = run(calls)
    new_images, new_feats = run(0)
    old_adjacent = {name: _adjacent(old_feats[name]) for name in layers}
    rows, finals = [], {}
    for k in sorted(set(at_steps) | {0, calls}):
        images, feats = (old_images, old_feats) if k == calls else (new_images, new_feats) if k == 0 else run(k)
        finals[k] = images
        row = {"switch_at": k, "psnr_vs_old": psnr(images, old_images), "psnr_vs_new": psnr(images, new_images)}
        if classifier is not None and key == "class_labels":
            predicted = classifier(images)
            row["reads_as_old"] = float((predicted == before.cpu()).float().mean())
            row["reads_as_new"] = float((predicted == after.cpu()).float().mean())
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
        rows.append(row)
    return SwitchResult(rows, finals)


def _mean_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def _adjacent(features: torch.Tensor) -> np.ndarray:
    """(S, B, D) -> (S - 1,) mean cosine similarity of each step's features with the next step's."""
    return F.cosine_similarity(features[:-1].double(), features[1:].double(), dim=-1).mean(-1).numpy()


def plot_switch(result: SwitchResult, path, layers: Sequence[str], title: str = "", samples: int = 3) -> Path:
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
    if "reads_as_new" in rows[0]:
        legend_on = left.twinx()
        legend_on.plot(k, [r["reads_as_new"] for r in rows], "k^:", label="toy classifier reads the new class")
        legend_on.set_ylim(-0.05, 1.05)
        legend_on.set_ylabel("share read as the new class")
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


# -- calibrated schedules ---------------------------------------------------------------------------

# A schedule is judged segment by segment: full step s followed by the next full step e means
# steps s+1 .. e-1 reuse the deep feature cached at s. segments[s, e] (e > s) is what that costs;
# entries with e <= s are 0 (an empty segment costs nothing).

def optimal_full_steps(segments: np.ndarray, count: int) -> list:
    """The `count` full steps (step 0 among them) whose segments cost least in total.

    `segments` is (S, S + 1): segments[s, e] is the cost of full step s serving steps s .. e-1.
    A dynamic programme over (segments used, steps covered) finds the exact minimum in O(count S^2).
    """
    segments = np.asarray(segments, dtype=np.float64)
    s = segments.shape[0]
    if segments.shape != (s, s + 1):
        raise ValueError(f"segment costs must have shape (steps, steps + 1), got {segments.shape}")
    if not isinstance(count, int) or not 1 <= count <= s:
        raise ValueError(f"the number of full steps must be an int in [1, {s}], got {count!r}")
    best = np.full((count + 1, s + 1), np.inf)  # best[k, e]: steps 0 .. e-1 served by k segments
    choice = np.zeros((count + 1, s + 1), dtype=np.int64)
    best[1, 1:] = segments[0, 1:]
    for k in range(2, count + 1):
        for e in range(k, s + 1):
            starts = np.arange(k - 1, e)
            totals = best[k - 1, starts] + segments[starts, e]
            i = int(np.argmin(totals))
            best[k, e], choice[k, e] = totals[i], starts[i]
    steps, e = [], s
    for k in range(count, 1, -1):
        e = int(choice[k, e])
        steps.append(e)
    return [0] + sorted(steps)


def schedule_cost(segments: np.ndarray, full_steps: Sequence[int]) -> float:
    """The total `optimal_full_steps` minimises, for a given schedule."""
    bounds = list(full_steps) + [len(segments)]
    return float(sum(segments[a, e] for a, e in zip(bounds, bounds[1:])))


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
def trace(pipe, noise, *, steps, sampler, branches, cond=None, uncond=None, guidance_scale=None, seed=0) -> Trajectory:
    """Run the uncached network once, keeping what calibration needs."""
    layer_of = {b: cached_layer(pipe.unet, b) for b in branches}
    hidden: dict = {b: [] for b in branches}
    outputs = []
    denoiser = pipe.make_denoiser(pipe.unet, cond, uncond, guidance_scale)

    def recorder(name, h):
        for b, layer in layer_of.items():
            if layer == name:
                hidden[b].append(h)

    def tapped(x, t):
        outputs.append(denoiser(x, t))
        return outputs[-1]

    with recording(pipe.unet, recorder):
        SAMPLERS[sampler](tapped, noise.clone(), pipe.scheduler, steps, **_sampler_kwargs(sampler, seed))
    return Trajectory(noise, outputs, hidden, cond, uncond)


class _Reuse:
    """`(x, t, cond)` running the shallow path on a given cache (one per group of rows of x)."""

    def __init__(self, unet, branch, hidden):
        self.unet, self.cache = unet, FeatureCache(branch, hidden)

    def __call__(self, x, t, cond=None):
        return self.unet.forward_shallow(x, t, cond, cache=self.cache)


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

    def __init__(self, pipe, trajectory: Trajectory, branch: int, guidance_scale, max_batch: int):
        self.pipe, self.trajectory, self.branch, self.guidance_scale = pipe, trajectory, branch, guidance_scale
        self.halves = 1 if trajectory.uncond is None else 2  # guidance: the U-Net sees [uncond; cond] rows
        self.batch = trajectory.noise.shape[0]
        self.group = max(1, max_batch // (self.batch * self.halves))
        self.calls = 0

    def __call__(self, x, t):
        j, b = self.calls, self.batch
        self.calls += 1
        runs = len(self.trajectory.outputs)
        out = _tile(self.trajectory.outputs[j], runs)
        hidden = self.trajectory.hidden[self.branch]
        for first in range(0, j, self.group):
            sources = range(first, min(j, first + self.group))
            n = len(sources)
            parts = [hidden[s].chunk(self.halves) for s in sources]
            cache = torch.cat([p[h] for h in range(self.halves) for p in parts])  # as the denoiser stacks rows
            reuse = _Reuse(self.pipe.unet, self.branch, cache)
            cond, uncond = _tile(self.trajectory.cond, n), _tile(self.trajectory.uncond, n)
            denoiser = self.pipe.make_denoiser(reuse, cond, uncond, self.guidance_scale)
            out[first * b:(first + n) * b] = denoiser(x[first * b:(first + n) * b], t)
        return out


@torch.inference_mode()
def rollout_costs(pipe, trajectory: Trajectory, branch: int, *, steps: int, sampler: str, guidance_scale=None,
                  max_batch: int = 256) -> np.ndarray:
    """segments[s, e]: mean squared distance of the sample after model call e-1 from the uncached
    sample, when full step s is followed by shallow steps reusing its cache (and nothing else changed).

    Every start s is rolled out at once as one batched sampling run, so a segment's cost includes
    how its errors add up and carry through the sampler's own updates. Needs a deterministic sampler.
    """
    if sampler == "ddpm":
        raise ValueError("the 'output' calibration cost compares deterministic runs; calibrate with "
                         "--sampler ddim (the schedule is over model calls and carries over) or --cost feature")
    runs, b = len(trajectory.outputs), trajectory.noise.shape[0]
    segments = np.zeros((runs, runs + 1))

    def measure(i, t, x):
        reference = x[(runs - 1) * b:].double()
        distance = ((x.double().unflatten(0, (runs, b)) - reference) ** 2).flatten(1).mean(1)  # (runs,)
        segments[: i + 1, i + 1] = distance[: i + 1].numpy()

    model = _Rollouts(pipe, trajectory, branch, guidance_scale, max_batch)
    SAMPLERS[sampler](model, _tile(trajectory.noise, runs), pipe.scheduler, steps,
                      **_sampler_kwargs(sampler, 0, callback=measure))
    return segments


def drift_costs(trajectory: Trajectory, branch: int) -> np.ndarray:
    """segments[s, e] = sum over j in s .. e-1 of 1 - cos(h_s, h_j), the drift of the cached feature
    itself (mean over the batch)."""
    hidden = torch.stack([h.flatten(1) for h in trajectory.hidden[branch]]).cpu()  # (S, B, D)
    drift = np.triu(1.0 - cosine_matrix(hidden))
    return np.concatenate([np.zeros((len(drift), 1)), np.cumsum(drift, axis=1)], axis=1)


COSTS = {"output": "mean squared distance from the uncached sample after step e-1 when steps s+1 .. e-1 reuse "
                   "the cache of full step s (batched rollouts along the uncached run)",
         "feature": "sum over steps j in s .. e-1 of 1 - cos(cached feature at s, at j)"}


def calibrate(pipe, *, steps: int = 50, sampler: str = "ddim", branch: int = 0, branches=None, cost: str = "output",
              batch_size: int = 8, seed: int = 0, class_labels=None, prompt=None, guidance_scale=None) -> dict:
    """Measure, for each branch, the cost of every segment (a full step s whose cache serves steps up
    to e-1); return the calibration dict `calibrated_full_steps` (cache_schedule="calibrated") reads.

    `branch` is the default branch the schedule is chosen for; `branches` (default: just `branch`)
    are all branches measured. Calibrate on other noise (seed) than you evaluate on.
    """
    if cost not in COSTS:
        raise ValueError(f"unknown calibration cost {cost!r}; choose one of {sorted(COSTS)}")
    branches = sorted({branch, *(branches or [])})
    for b in branches:
        pipe.unet._check_branch(b)
    cond = condition(pipe, batch_size, class_labels=class_labels, prompt=prompt)
    uncond = _guidance(pipe, guidance_scale, cond)
    start = time.perf_counter()
    trajectory = trace(pipe, noise_for(pipe, batch_size, seed), steps=steps, sampler=sampler, branches=branches,
                       cond=cond, uncond=uncond, guidance_scale=guidance_scale, seed=seed)
    segments = {b: rollout_costs(pipe, trajectory, b, steps=steps, sampler=sampler, guidance_scale=guidance_scale)
                if cost == "output" else drift_costs(trajectory, b) for b in branches}
    return {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "cost": cost, "cost_meaning": COSTS[cost],
            "steps": steps, "model_calls": len(trajectory.outputs), "sampler": sampler, "branch": branch,
            "batch_size": batch_size, "seed": seed,
            "class_labels": None if cond is None or prompt is not None else cond.tolist(),
            "prompt": prompt, "guidance_scale": guidance_scale, "seconds": round(time.perf_counter() - start, 2),
            "segments": {str(b): _pack(m) for b, m in segments.items()}}


def _pack(segments: np.ndarray) -> list:
    """Row s holds segments[s, s+1 .. S], at 4 significant digits."""
    return [[float(f"{v:.4g}") for v in segments[s, s + 1:]] for s in range(segments.shape[0])]


def _unpack(rows: list) -> np.ndarray:
    size = len(rows)
    segments = np.zeros((size, size + 1))
    for s, row in enumerate(rows):
        if len(row) != size - s:
            raise ValueError(f"calibration row {s} has {len(row)} segment costs, expected {size - s}; the file is "
                             "damaged: run `minidiff analyze calibrate --overwrite` again")
        segments[s, s + 1:] = row
    return segments


def segment_matrix(calibration: dict, branch: Optional[int] = None, num_steps: Optional[int] = None) -> np.ndarray:
    """The calibrated (S, S + 1) segment costs for `branch`, resampled to `num_steps` model calls if given."""
    if not isinstance(calibration, dict) or calibration.get("format") != CALIBRATION_FORMAT:
        raise ValueError("this is not a minidiff calibration (calibration.json); make one with "
                         "`minidiff analyze calibrate --model DIR`")
    if calibration.get("version") != CALIBRATION_VERSION:
        raise ValueError(f"calibration version {calibration.get('version')!r} is not supported (expected "
                         f"{CALIBRATION_VERSION}); run `minidiff analyze calibrate --overwrite` again")
    branch = calibration["branch"] if branch is None else branch
    measured = calibration["segments"]
    if str(branch) not in measured:
        raise ValueError(f"the calibration covers branches {sorted(int(b) for b in measured)}, not {branch}; run "
                         f"`minidiff analyze calibrate --branches {branch} ...` to add it")
    segments = _unpack(measured[str(branch)])
    return segments if num_steps is None or num_steps == len(segments) else resample_segments(segments, num_steps)


def resample_segments(segments: np.ndarray, num_steps: int) -> np.ndarray:
    """Bilinear resampling of segment costs to another number of steps over the same time span.

    Segment boundaries b = 0 .. S sit at fraction b / S of the way through sampling; a segment of the
    new run is read off the calibrated costs between the same fractions.
    """
    size = len(segments)
    starts, ends = np.arange(num_steps) * size / num_steps, np.arange(num_steps + 1) * size / num_steps
    by_start = np.stack([np.interp(starts, np.arange(size), column) for column in segments.T], axis=1)
    out = np.stack([np.interp(ends, np.arange(size + 1), row) for row in by_start])  # (num_steps, num_steps + 1)
    return np.triu(out, 1)


def calibrated_full_steps(calibration: dict, num_steps: int, interval: int, branch: Optional[int] = None) -> list:
    """ceil(num_steps / interval) full steps (as many as uniform) chosen to minimise the calibrated cost."""
    if not isinstance(interval, int) or interval < 1:
        raise ValueError(f"cache interval must be an int >= 1, got {interval!r}")
    count = math.ceil(num_steps / interval)
    segments = segment_matrix(calibration, branch, num_steps)
    return list(range(num_steps)) if count >= num_steps else optimal_full_steps(segments, count)


# -- the speed/quality frontier -------------------------------------------------------------------

SCHEDULES = ("uniform", "nonuniform", "calibrated")


def frontier(pipe, *, steps: int = 50, sampler: str = "ddim", intervals=(2, 3, 5, 10), branches=(0, 1, 3),
             schedules=SCHEDULES, batch_size: int = 8, seed: int = 1, class_labels=None, prompt=None,
             guidance_scale=None, classifier=None, calibration: Optional[dict] = None, repeats: int = 2,
             log=print) -> list:
    """One row per (schedule, branch, interval): measured speedup against the uncached run, the MAC
    bound of that schedule, and the PSNR of the final images against the uncached run from the same
    noise (plus the toy classifier's accuracy where there is one).

    Every cached run is timed alternately with an uncached run, `repeats` times each, and the
    speedup is the ratio of the best times: on a shared machine both sides then see the same load.
    """
    unet = pipe.unet
    calls = num_model_calls(sampler, steps)
    kept = [b for b in branches if 0 <= b < unet.num_branches]
    if len(kept) < len(branches):
        log(f"skipping branches {sorted(set(branches) - set(kept))}: this U-Net has branches 0-{unet.num_branches - 1}")
    noise = noise_for(pipe, batch_size, seed)
    labels = default_labels(pipe, batch_size) if unet.config.num_classes is not None and class_labels is None \
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
    cond = condition(pipe, 1, class_labels=None if labels is None else labels[:1], prompt=prompt)
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
                             "mac_speedup": calls / (count + (calls - count) * ratio),
                             "psnr": psnr(images, reference), "accuracy": _accuracy(classifier, images, labels)})
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


# -- command line ---------------------------------------------------------------------------------

def _model_args(p: argparse.ArgumentParser, batch: int = 8):
    p.add_argument("--model", required=True, help="minidiff model folder")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--batch", type=int, default=batch, help="images per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class", dest="class_label", type=int, help="class label (default: one of each class)")
    p.add_argument("--prompt", help="prompt for text-conditioned models")
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--threads", type=int, help="torch CPU threads")


def _classifier_arg(p: argparse.ArgumentParser):
    p.add_argument("--classifier", help="toy-metric classifier folder (default: DATASET-classifier beside the model)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minidiff analyze", description="Measure how a model's features change "
                                "between denoising steps (DeepCache's premise) and calibrate cache schedules.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("similarity", "step x step cosine similarity of layer outputs (heatmaps, .npz, summary)"),
                       ("depth", "adjacent-step similarity against depth: skip 0 .. bottleneck .. back up")):
        q = sub.add_parser(name, help=text, description=text)
        _model_args(q)
        q.add_argument("--layers", nargs="+", help="layer names (enc.i, mid, dec.i); default all")
        q.add_argument("--pool", type=int, help="average-pool each map to POOL x POOL first")
        q.add_argument("--project", type=int, default=4096, help="hash features to at most this many dims "
                       "(bounds memory; 0 keeps them whole)")
        q.add_argument("--out", default=f"out/{name}")
    q = sub.add_parser("switch", help="change the class/prompt at step k and measure what follows")
    _model_args(q)
    _classifier_arg(q)
    q.add_argument("--from", dest="old", required=True, help="class label (int) or prompt before the switch")
    q.add_argument("--to", dest="new", required=True, help="class label (int) or prompt after the switch")
    q.add_argument("--at", type=int, nargs="+", help="switch steps (default 0, S/10, 2S/10, ...)")
    q.add_argument("--layers", nargs="+", help="deep layers to follow (default mid and a middle cached feature)")
    q.add_argument("--out", default="out/switch")
    q = sub.add_parser("calibrate", help="measure cache reuse costs; write calibration.json into the model folder")
    _model_args(q)
    q.add_argument("--branch", type=int, default=0, help="the branch cache_schedule='calibrated' uses by default")
    q.add_argument("--branches", type=int, nargs="+", help="all branches to measure (default 0 1 2 3)")
    q.add_argument("--cost", default="output", choices=sorted(COSTS))
    q.add_argument("--out", help="where to write (default: MODEL/calibration.json)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing calibration")
    return p


def main(argv=None) -> int:
    """`minidiff analyze similarity|depth|switch|calibrate ...`"""
    args = _parser().parse_args(argv)
    try:
        pipe = _load(args)
        return {"similarity": _similarity_cmd, "depth": _depth_cmd, "switch": _switch_cmd,
                "calibrate": _calibrate_cmd}[args.command](pipe, args)
    except (CheckpointError, ValueError, FileExistsError, ImportError) as e:
        print(f"minidiff analyze {args.command}: {e}", file=sys.stderr)
        return 2


def _load(args):
    """The model named on the command line, after setting the thread count asked for."""
    from .pipeline import load

    if args.threads:
        torch.set_num_threads(args.threads)
    return load(args.model)


def _labels_from(args, pipe):
    if args.class_label is None:
        return None if pipe.unet.config.num_classes is None else default_labels(pipe, args.batch)
    return [args.class_label] * args.batch


def _record_from(args, pipe) -> FeatureRecord:
    start = time.perf_counter()
    record = record_features(pipe, steps=args.steps, sampler=args.sampler, layers=args.layers, pool=args.pool,
                             project=args.project or None, seed=args.seed, batch_size=args.batch,
                             class_labels=_labels_from(args, pipe), prompt=args.prompt,
                             guidance_scale=args.guidance_scale)
    print(f"recorded {len(record.features)} layers x {record.num_steps} steps x {args.batch} images "
          f"({record.nbytes / 2 ** 20:.0f} MiB) in {time.perf_counter() - start:.1f}s")
    return record


def _similarity_cmd(pipe, args) -> int:
    out = Path(args.out)
    record = _record_from(args, pipe)
    matrices = similarity_matrices(record)
    summary = summarize(matrices)
    roles = {name: layer_role(pipe.unet, name) for name in matrices}
    print(format_summary(summary, roles=roles))
    save_matrices(matrices, out / "similarity.npz")
    write_csv([{"layer": k, **v, "role": roles[k]} for k, v in summary.items()], out / "summary.csv")
    plot_heatmaps(matrices, out / "heatmaps.png", title=f"{args.model}: {args.sampler}, {args.steps} steps")
    print(f"wrote {out / 'similarity.npz'}, {out / 'summary.csv'}, {out / 'heatmaps.png'}")
    return 0


def _depth_cmd(pipe, args) -> int:
    out = Path(args.out)
    record = _record_from(args, pipe)
    rows = depth_profile(similarity_matrices(record), pipe.unet, record.shapes)
    print(format_depth(rows))
    write_csv(rows, out / "depth.csv")
    plot_depth(rows, out / "depth.png", title=f"{args.model}: feature change per step vs depth "
               f"({args.sampler}, {args.steps} steps)")
    print(f"wrote {out / 'depth.csv'}, {out / 'depth.png'}")
    return 0


def _switch_cmd(pipe, args) -> int:
    out = Path(args.out)
    text = pipe.unet.config.num_classes is None
    old, new = (args.old, args.new) if text else (int(args.old), int(args.new))
    classifier = None if text else toy_classifier(pipe, args.model, args.classifier)
    start = time.perf_counter()
    layers = args.layers or ["mid", cached_layer(pipe.unet, pipe.unet.num_branches // 2)]
    result = switch_experiment(pipe, old=old, new=new, steps=args.steps, sampler=args.sampler, at_steps=args.at,
                               batch_size=args.batch, seed=args.seed, layers=layers,
                               guidance_scale=args.guidance_scale, classifier=classifier)
    rows = result.rows
    columns = sorted({c for r in rows for c in r}, key=_column_order)
    print(format_rows(rows, [c for c in columns if not c.endswith("_final_cos_old")]))
    print(f"{len(rows)} runs in {time.perf_counter() - start:.1f}s")
    write_csv([{c: r.get(c) for c in columns} for r in rows], out / "switch.csv")
    plot_switch(result, out / "switch.png", layers, title=f"{args.model}: switch {old} -> {new} at step k")
    print(f"wrote {out / 'switch.csv'}, {out / 'switch.png'}")
    return 0


def _column_order(column: str):
    first = ["switch_at", "psnr_vs_old", "psnr_vs_new", "reads_as_old", "reads_as_new"]
    return (first.index(column), "") if column in first else (len(first), column)


def _calibrate_cmd(pipe, args) -> int:
    target = Path(args.out) if args.out else Path(args.model) / "calibration.json"
    if target.exists() and not args.overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    branches = args.branches or [b for b in (0, 1, 2, 3) if b < pipe.unet.num_branches]
    calibration = calibrate(pipe, steps=args.steps, sampler=args.sampler, branch=args.branch, branches=branches,
                            cost=args.cost, batch_size=args.batch, seed=args.seed,
                            class_labels=_labels_from(args, pipe), prompt=args.prompt,
                            guidance_scale=args.guidance_scale)
    save_calibrated(target, calibration)
    calls = calibration["model_calls"]
    print(f"measured {args.cost} costs of branches {branches} over {calls} model calls in "
          f"{calibration['seconds']:.1f}s; wrote {target}")
    for n in (2, 3, 5, 10):
        if n < calls:
            print(f"  1:{n:<2} ({math.ceil(calls / n)} full steps): "
                  f"{calibrated_full_steps(calibration, calls, n)}")
    return 0


def _bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minidiff bench", description="Benchmarks of cached sampling.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("frontier", help="speedup, MAC bound and quality of cache schedules at several budgets")
    _model_args(q)
    _classifier_arg(q)
    q.set_defaults(seed=1)
    q.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5, 10], help="N: ceil(steps/N) full steps")
    q.add_argument("--branches", type=int, nargs="+", default=[0, 1, 3])
    q.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    q.add_argument("--repeats", type=int, default=2,
                   help="time every run this many times, alternating with the uncached run; keep the best")
    q.add_argument("--calibration-seed", type=int, default=0,
                   help="noise for calibrating when the model has no calibration.json for a branch")
    q.add_argument("--out", default="out/frontier")
    return p


def bench_main(argv=None) -> int:
    """`minidiff bench frontier --model DIR ...`"""
    args = _bench_parser().parse_args(argv)
    try:
        pipe = _load(args)
        labels = _labels_from(args, pipe)
        calibration = pipe.calibration
        branches = [b for b in args.branches if 0 <= b < pipe.unet.num_branches]
        if not branches:
            raise ValueError(f"none of the branches {args.branches} exists; this U-Net has branches "
                             f"0-{pipe.unet.num_branches - 1}")
        if "calibrated" in args.schedules and (calibration is None or
                                               any(str(b) not in calibration.get("segments", {}) for b in branches)):
            print(f"the model's calibration does not cover branches {branches}: calibrating them on seed "
                  f"{args.calibration_seed} (the bench uses seed {args.seed})")
            calibration = calibrate(pipe, steps=args.steps, sampler=args.sampler, branch=branches[0], branches=branches,
                                    batch_size=args.batch, seed=args.calibration_seed, class_labels=labels,
                                    prompt=args.prompt, guidance_scale=args.guidance_scale)
        elif calibration is not None and calibration.get("seed") == args.seed:
            print(f"note: the calibration was measured on seed {args.seed}, the noise this bench uses; pass another "
                  "--seed for an honest comparison")
        rows = frontier(pipe, steps=args.steps, sampler=args.sampler, intervals=args.intervals,
                        branches=args.branches, schedules=args.schedules, batch_size=args.batch, seed=args.seed,
                        class_labels=labels, prompt=args.prompt, guidance_scale=args.guidance_scale,
                        classifier=toy_classifier(pipe, args.model, args.classifier),
                        calibration=calibration, repeats=args.repeats)
        out = Path(args.out)
        print(format_rows(rows, ["schedule", "branch", "interval", "full_steps", "seconds", "uncached_seconds",
                                 "speedup", "mac_speedup", "psnr", "accuracy"]))
        write_csv(rows, out / "frontier.csv")
        plot_frontier(rows, out / "frontier.png", title=f"{args.model}: {args.sampler}, {args.steps} steps, "
                      f"batch {args.batch}")
    except (CheckpointError, ValueError, ImportError) as e:
        print(f"minidiff bench {args.command}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'frontier.csv'}, {out / 'frontier.png'}")
    return 0
