"""Attribute probes on the text-to-image scenes model: which layer reads colour, shape, place,
relation and count, from which noise level, and at which sampling step is each one decided?

The digits probe (`minidiff.probe`) reads one class label. A scene has several attributes, and
place lives in *where* the object is, which a global mean throws away; so every layer's output is
average-pooled to a small grid (2 x 2 by default, a quadrant map) and flattened, and one linear
probe (`probe.fit_probe`, the same L-BFGS logistic regression) is fitted per attribute on the
class indices of `scenes.targets`, with the rows where an attribute does not apply dropped (place
for pairs, relation for single objects).

Real scenes: fresh scenes from a stream no training step draws, encoded by the model's autoencoder
(latents times its scale factor, as the pipeline samples them), noised to x_t, and read by the
network under the empty prompt "" (the unconditional half of guidance), so a probe finds what the
network inferred from the picture, not from a caption. Two controls for every attribute:
`pixels`, the probe on the flattened x_t itself (what a linear read of the input already gives),
and `noise`, the same layer run on pure noise with the same labels (chance, plus what picking the
best layer gains by luck).

Trajectories: DDIM runs from captions of the grammar, whose attributes are therefore known; the
state each probed step starts from is re-read under "" and probed the same way. Step 0 starts from
pure noise drawn independently of the captions, so its rows are the trajectories' noise control.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import plots
from .analysis import layer_names, recording, write_csv
from .probe import CONTROL, ProbeResult, noised, probe_accuracy, readable_from, split_mask
from .scenes import HEADS, IGNORE, scene_batch, targets
from .schedules import make_timesteps

# probe attribute -> the scenes.HEADS head that labels it
ATTRIBUTES = {"colour_a": "colour_a", "shape_a": "shape_a", "place": "place", "relation": "axis", "count": "count"}
NEUTRAL_PROMPT = ""
# Scene stream of the probes: scene_batch seeds its generator with seed * 1_000_003 + index, and
# training draws seed 0 at index = step, so stream STREAM + seed never meets a training batch.
STREAM = 2024
COLUMNS = ["attribute", "layer", "source", "timestep", "step", "accuracy", "pixels", "noise", "chance",
           "train_accuracy", "dim", "n_train", "n_test"]
DEFAULT_TIMESTEPS = (999, 900, 800, 700, 600, 500, 400, 300, 200, 100, 50, 0)
MAX_BATCH = 4096


@dataclass
class SceneProbeResult:
    rows: list     # dicts with COLUMNS
    layers: list   # CONTROL first, then depth order


def attribute_accuracy(features: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, num_classes: int,
                       attribute: str = "attribute") -> dict:
    """Probe one attribute on the rows where it applies (labels != IGNORE): held-out and training
    accuracy, the split's sizes, and `chance`, the held-out accuracy of always answering the class
    most frequent in the fitting half."""
    keep = labels != IGNORE
    x, y, fit = features[keep], labels[keep], train[keep]
    if fit.sum() < 2 or (~fit).sum() < 2:
        raise ValueError(f"too few scenes where {attribute} applies ({int(fit.sum())} to fit, {int((~fit).sum())} "
                         "to score; at least 2 each): raise --count or --prompts")
    accuracy, fitted = probe_accuracy(x, y, fit, num_classes)
    majority = torch.bincount(y[fit], minlength=num_classes).argmax()
    chance = float((y[~fit] == majority).float().mean())
    return {"accuracy": round(accuracy, 4), "train_accuracy": round(fitted, 4), "chance": round(chance, 4),
            "n_train": int(fit.sum()), "n_test": int((~fit).sum())}


def probe_attributes(features: dict, labels: dict, train: torch.Tensor, **where) -> list:
    """Rows for every attribute x feature set ({name: (N, D)}): `where` (source, timestep, step) is
    copied into each; the pixels/noise control columns are filled in later (`_add_controls`)."""
    rows = []
    for attribute, head in ATTRIBUTES.items():
        for layer, f in features.items():
            rows.append({"attribute": attribute, "layer": layer, **where,
                         **attribute_accuracy(f, labels[head], train, len(HEADS[head]), attribute),
                         "dim": f.shape[1]})
    return rows


@torch.inference_mode()
def neutral_context(pipe, count: int) -> torch.Tensor:
    """(count, L, D): the empty prompt's text context, what guidance's unconditional half reads."""
    return pipe.encode_prompt([NEUTRAL_PROMPT]).expand(count, -1, -1)


@torch.inference_mode()
def grid_features(pipe, x: torch.Tensor, t: int, names: Sequence[str], *, grid: int = 2, batch: int = 256) -> dict:
    """name -> (N, C * grid * grid) layer outputs of the network at (x, t) under the empty prompt,
    average-pooled to grid x grid (so where a thing is survives) and flattened; CONTROL -> x flattened."""
    network, wanted = pipe.denoiser, set(names)
    kept: dict = {name: [] for name in names}

    def recorder(name, h):
        if name in wanted:
            kept[name].append(F.adaptive_avg_pool2d(h.float(), grid).flatten(1).cpu())

    with recording(network, recorder):
        for start in range(0, x.shape[0], batch):
            part = x[start: start + batch].to(pipe.device, pipe.dtype)
            network(part, t, neutral_context(pipe, part.shape[0]))
    out = {CONTROL: x.flatten(1).float().cpu()}
    out.update({name: torch.cat(kept[name]) for name in names})
    return out


@torch.inference_mode()
def encode_scenes(pipe, images: torch.Tensor, *, batch: int = 64) -> torch.Tensor:
    """uint8 (N, 3, H, W) scenes -> the autoencoder's latents times its scale factor (float32, CPU):
    the space the network denoises in."""
    parts = []
    for start in range(0, images.shape[0], batch):
        part = images[start: start + batch].to(pipe.device, torch.float32) / 127.5 - 1  # [0, 255] -> [-1, 1]
        parts.append(pipe.autoencoder.encode(part).float().cpu())
    return torch.cat(parts)


def real_scenes(pipe, count: int, seed: int = 0) -> tuple:
    """(uint8 images at the model's size, labels {head: (N,)}): fresh scenes of the training distribution."""
    images, scenes = scene_batch(STREAM + seed, 0, count, size=pipe.default_size)
    return images, targets(scenes)


def trajectory_prompts(count: int, seed: int = 0) -> tuple:
    """(captions, labels {head: (N,)}): the captions of fresh scenes, labelled by the scenes they describe."""
    _, scenes = scene_batch(STREAM + seed, 1, count)
    return [s.caption for s in scenes], targets(scenes)


def probe_real_scenes(pipe, latents: torch.Tensor, labels: dict, timesteps: Sequence[int], *, layers=None,
                      grid: int = 2, seed: int = 0, log=None) -> SceneProbeResult:
    """Rows for every attribute x layer x timestep on real scene latents noised to x_t (source "real"),
    and the pure-noise control (source "noise", timestep -1), each with its controls filled in."""
    names = layers or layer_names(pipe.denoiser)
    train = split_mask(latents.shape[0], seed)
    top = pipe.scheduler.num_train_timesteps - 1
    pure = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + 2))
    rows = probe_attributes(grid_features(pipe, pure, top, names, grid=grid), labels, train,
                            source="noise", timestep=-1, step="")
    for t in timesteps:
        x = noised(pipe, latents, int(t), seed + 1)
        rows += probe_attributes(grid_features(pipe, x, int(t), names, grid=grid), labels, train,
                                 source="real", timestep=int(t), step="")
        if log:
            log(f"t={int(t):4d}: " + _best_line(rows, "real", "timestep", int(t)))
    return SceneProbeResult(_add_controls(rows), [CONTROL, *names])


@torch.inference_mode()
def trajectory_states(pipe, prompts: Sequence[str], *, steps: int = 50, every: int = 5,
                      guidance_scale: Optional[float] = None, seed: int = 0) -> dict:
    """{step: (timestep, x)} along one batch of DDIM runs from `prompts` (guidance None: the model's
    default): the state every `every`-th step starts from, at that step's timestep, and the finished
    sample as step `steps` at t = 0."""
    timesteps = make_timesteps(pipe.scheduler, steps).tolist()
    noise = pipe.initial_noise(len(prompts), generator=torch.Generator().manual_seed(seed))
    states = {0: (timesteps[0], noise.float().cpu())}

    def callback(i, t, x):  # x is the state step i + 1 starts from
        if (i + 1) % every == 0 and i + 1 < steps:
            states[i + 1] = (timesteps[i + 1], x.float().cpu().clone())

    final = pipe.generate(prompt=list(prompts), noise=noise, steps=steps, sampler="ddim",
                          guidance_scale=guidance_scale, callback=callback, output="latent", progress=False)
    states[steps] = (0, final.float().cpu())
    return states


def probe_scene_trajectories(pipe, prompts: Sequence[str], labels: dict, *, steps: int = 50, every: int = 5,
                             guidance_scale: Optional[float] = None, layers=None, grid: int = 2, seed: int = 0,
                             log=None) -> SceneProbeResult:
    """Rows (source "trajectory") for every attribute x layer at each state of `trajectory_states`,
    re-read under the empty prompt; labels are the prompts' attributes."""
    names = layers or layer_names(pipe.denoiser)
    states = trajectory_states(pipe, prompts, steps=steps, every=every, guidance_scale=guidance_scale, seed=seed)
    train = split_mask(len(prompts), seed)
    rows = []
    for step, (t, x) in sorted(states.items()):
        rows += probe_attributes(grid_features(pipe, x, t, names, grid=grid), labels, train,
                                 source="trajectory", timestep=t, step=step)
        if log:
            log(f"step {step:3d} (t={t:4d}): " + _best_line(rows, "trajectory", "step", step))
    return SceneProbeResult(_add_controls(rows), [CONTROL, *names])


def _best_line(rows, source, key, value) -> str:
    parts = []
    for attribute in ATTRIBUTES:
        group = [r for r in rows if r["source"] == source and r[key] == value and r["attribute"] == attribute]
        best = max((r for r in group if r["layer"] != CONTROL), key=lambda r: r["accuracy"])
        pixels = next(r["accuracy"] for r in group if r["layer"] == CONTROL)
        parts.append(f"{attribute} {best['accuracy']:.2f} ({best['layer']}; pixels {pixels:.2f})")
    return ", ".join(parts)


def _add_controls(rows: list) -> list:
    """Fill each row's `pixels` (the input probe at the same attribute and noise level) and `noise`
    (the same layer and attribute on pure noise: source "noise", or a trajectory's step 0)."""
    pixels = {(r["source"], r["attribute"], r["timestep"], r["step"]): r["accuracy"]
              for r in rows if r["layer"] == CONTROL}
    noise = {(r["attribute"], r["layer"]): r["accuracy"] for r in rows
             if r["source"] == "noise" or (r["source"] == "trajectory" and r["step"] == 0)}
    out = []
    for r in rows:
        r = {**r, "pixels": pixels[(r["source"], r["attribute"], r["timestep"], r["step"])],
             "noise": noise[(r["attribute"], r["layer"])]}
        out.append({c: r[c] for c in COLUMNS})
    return out


def first_readable(rows: list, attribute: str, source: str, fraction: float = 0.9) -> Optional[dict]:
    """Where an attribute becomes readable: level = fraction x the best accuracy any network layer
    reaches (over the timesteps, or steps, of `source`); per layer the noisiest point from which it
    stays >= level (probe.readable_from), and the layer that gets there first (ties: the more
    accurate there, then the shallower). `readable` is False when the best does not beat both the
    best noise-control layer and majority-class chance by 0.05; None when there are no rows."""
    group = [r for r in rows if r["attribute"] == attribute and r["source"] == source and r["timestep"] >= 0]
    network = [r for r in group if r["layer"] != CONTROL]
    if not network:
        return None
    # readable_from walks from the noisiest timestep down; along a trajectory, steps stand in for
    # it (the finished sample and the last step may share t = 0)
    if source == "trajectory":
        last = max(r["step"] for r in group)
        noisiness = {id(r): last - r["step"] for r in group}
    else:
        noisiness = {id(r): r["timestep"] for r in group}
    proxy = [{"layer": r["layer"], "timestep": noisiness[id(r)], "accuracy": r["accuracy"]} for r in group]
    at = {(r["layer"], noisiness[id(r)]): r for r in group}
    best = max(network, key=lambda r: r["accuracy"])
    noise_best = max(r["noise"] for r in network)
    chance = max(r["chance"] for r in network)
    level = fraction * best["accuracy"]
    order = list(dict.fromkeys(r["layer"] for r in group))  # CONTROL first, then depth order
    reached = {name: readable_from(proxy, name, level) for name in order}
    layers = [n for n in order if n != CONTROL and reached[n] is not None]
    found = {"readable": best["accuracy"] >= max(noise_best, chance) + 0.05, "best": best, "noise": noise_best,
             "chance": chance, "level": level,
             "layer": None, "row": None, "pixels": None if reached[CONTROL] is None else at[(CONTROL, reached[CONTROL])]}
    if layers:
        first = min(layers, key=lambda n: (-reached[n], -at[(n, reached[n])]["accuracy"], order.index(n)))
        found.update(layer=first, row=at[(first, reached[first])])
    return found


def summarize(real: Optional[SceneProbeResult], trajectory: Optional[SceneProbeResult], *,
              fraction: float = 0.9) -> str:
    """Per attribute: "decided at step s, first read by layer L" along trajectories, and from which
    noise level on real scenes, each against the pixels and noise controls."""
    lines = [f"readable: from then on >= {fraction} x the attribute's best network accuracy, and that best "
             "beats both the best noise-control layer and majority-class chance by >= 0.05"]
    for attribute, head in ATTRIBUTES.items():
        chance = [r["chance"] for r in (real or trajectory).rows if r["attribute"] == attribute]
        if not chance:
            continue
        lines.append(f"{attribute} ({len(HEADS[head])} classes, majority-class chance {max(chance):.2f}):")
        if trajectory is not None:
            lines.append("  trajectories: " + _describe(first_readable(trajectory.rows, attribute, "trajectory",
                                                                        fraction), "step"))
        if real is not None:
            lines.append("  real scenes:  " + _describe(first_readable(real.rows, attribute, "real", fraction),
                                                        "timestep"))
    return "\n".join(lines)


def _describe(found: Optional[dict], key: str) -> str:
    if found is None:
        return "no rows"
    best = found["best"]
    where = f"step {best['step']}" if key == "step" else f"t={best['timestep']}"
    tail = f"best {best['accuracy']:.2f} ({best['layer']}, {where}), noise control <= {found['noise']:.2f}"
    if not found["readable"]:
        return f"not readable above the noise control and chance ({found['chance']:.2f}): {tail}"
    if found["layer"] is None:
        return f"no layer stays >= {found['level']:.2f} to the end: {tail}"
    row, pixels = found["row"], found["pixels"]
    if key == "step":
        head = f"decided at step {row['step']} (t={row['timestep']}), first read by layer {found['layer']}"
        control = "pixels never" if pixels is None else f"pixels from step {pixels['step']}"
    else:
        head = f"readable from t={row['timestep']}, first by layer {found['layer']}"
        control = "pixels never" if pixels is None else f"pixels from t={pixels['timestep']}"
    return f"{head} ({row['accuracy']:.2f} >= {found['level']:.2f}); {control}; {tail}"


def check_scene_probe(pipe, *, timesteps: Sequence[int], count: int, prompts: int, steps: int, every: int,
                      grid: int, fraction: float, guidance_scale: Optional[float] = None, trajectories: bool = True):
    """Refuse, before any work, what `run` could not do."""
    if pipe.text_encoder is None or pipe.autoencoder is None:
        raise ValueError("attribute probes need a latent text-to-image model (autoencoder and text encoder)")
    top = pipe.scheduler.num_train_timesteps - 1
    bad = [t for t in timesteps if not 0 <= t <= top]
    if bad or not timesteps:
        raise ValueError(f"timesteps must be ints in [0, {top}] (this model's noise levels), got {bad or 'none'}")
    if not 40 <= count <= 100_000:
        raise ValueError(f"count must be an int in [40, 100000] (real scenes; a pair is 40% of them, and both "
                         f"halves of the split need some), got {count}")
    if trajectories and not 40 <= prompts <= MAX_BATCH:
        raise ValueError(f"prompts must be an int in [40, {MAX_BATCH}] (one batch of sampling runs), got {prompts}")
    if trajectories and not 1 <= every <= steps:
        raise ValueError(f"every must be an int in [1, {steps}] (the number of steps), got {every}")
    if guidance_scale is not None and not (math.isfinite(guidance_scale) and 0 <= guidance_scale <= 100):
        raise ValueError(f"guidance scale must be a number in [0, 100], got {guidance_scale}")
    if not 1 <= grid <= 8:
        raise ValueError(f"grid must be an int in [1, 8] (each layer pooled to grid x grid), got {grid}")
    if not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise ValueError(f"level must be a number in (0, 1] (a share of the best accuracy), got {fraction}")


def write_rows(rows: list, path):
    return write_csv([{c: r[c] for c in COLUMNS} for r in rows], path)


def plot_attribute(result: SceneProbeResult, attribute: str, path, source: str, steps: Optional[int] = None):
    rows = [r for r in result.rows if r["attribute"] == attribute and r["source"] == source]
    chance = max(r["chance"] for r in rows)
    xlabel = f"sampling step (DDIM {steps}; {steps} = the finished sample)" if source == "trajectory" else ""
    return plots.plot_probe(ProbeResult(rows, result.layers, chance), path, source=source, xlabel=xlabel,
                            title=f"{attribute}: held-out linear-probe accuracy ({source}; majority chance "
                                  f"{chance:.2f})")


def run(pipe, out, *, timesteps=DEFAULT_TIMESTEPS, count: int = 1000, prompts: int = 200, steps: int = 50,
        every: int = 5, guidance_scale: Optional[float] = None, grid: int = 2, fraction: float = 0.9,
        seed: int = 0, trajectories: bool = True, log=print) -> dict:
    """The whole attribute-probe experiment: probe.csv, one heatmap per attribute (and per attribute
    along trajectories) and summary.txt under `out`; returns the results."""
    from pathlib import Path

    from .writing import atomic_path

    out = Path(out)
    names = layer_names(pipe.denoiser)
    images, labels = real_scenes(pipe, count, seed)
    log(f"probing {len(names)} layers for {', '.join(ATTRIBUTES)} on {count} real scenes (half fit, half scored) "
        f"at {len(timesteps)} timesteps, pooled to {grid} x {grid}")
    real = probe_real_scenes(pipe, encode_scenes(pipe, images), labels, timesteps, grid=grid, seed=seed, log=log)
    trajectory = None
    if trajectories:
        captions, caption_labels = trajectory_prompts(prompts, seed)
        log(f"{prompts} DDIM-{steps} runs from grammar captions, probed every {every} steps")
        trajectory = probe_scene_trajectories(pipe, captions, caption_labels, steps=steps, every=every,
                                              guidance_scale=guidance_scale, grid=grid, seed=seed, log=log)
    write_rows(real.rows + (trajectory.rows if trajectory else []), out / "probe.csv")
    for attribute in ATTRIBUTES:
        plot_attribute(real, attribute, out / f"probe_{attribute}.png", "real")
        if trajectory:
            plot_attribute(trajectory, attribute, out / f"probe_{attribute}_trajectory.png", "trajectory", steps)
    text = summarize(real, trajectory, fraction=fraction)
    with atomic_path(out / "summary.txt") as tmp:
        tmp.write_text(text + "\n")
    log(text)
    return {"real": real, "trajectory": trajectory, "summary": text}
