"""Linear probes: at which depth and at which noise level is the class linearly readable?

Reading C of DeepCache's finding ("decide early, refine late") predicts that the deep features
carry the class from early (noisy) timesteps on. A probe measures that directly: take real digits,
noise them to x_t, run the model conditioned on the *null* class (so the label cannot come in
through the class embedding), global-average-pool every recorded layer to a (B, C) vector, and fit
a logistic regression from that vector to the digit on one half of the images, scoring it on the
other half. `pixels` (the flattened x_t itself) is the control: what a linear read of the input
already gives, without the network.

The same probe runs along sampling trajectories: x_t of class-conditional DDIM runs, re-read by
the model under the null class, labelled with the class the run was conditioned on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import plots
from .analysis import layer_names, recording
from .samplers import SAMPLERS
from .schedules import NoiseSchedule, make_timesteps

CONTROL = "pixels"  # the probe on x_t itself


@dataclass
class ProbeResult:
    rows: list  # dicts: source, layer, timestep, step, accuracy, train_accuracy, dim, n_train, n_test
    layers: list  # depth order, the pixel control first
    chance: float


def fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, *, weight_decay: float = 1e-3,
              iterations: int = 100) -> tuple:
    """Multinomial logistic regression by L-BFGS on standardised features; returns (weight, bias, mean, std)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    z = (train_x - mean) / std
    weight = torch.zeros(z.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight + bias, train_y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach(), mean, std


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, num_classes: int) -> tuple:
    """(held-out accuracy, training accuracy) of a probe fitted on rows `train` and scored on the rest."""
    weight, bias, mean, std = fit_probe(features[train], labels[train], num_classes)
    predicted = (((features - mean) / std) @ weight + bias).argmax(1)
    correct = (predicted == labels).float()
    return float(correct[~train].mean()), float(correct[train].mean())


def split_mask(n: int, seed: int = 0) -> torch.Tensor:
    """A fixed random half of n rows for fitting (True), the other half for scoring."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[: n // 2]] = True
    return mask


@torch.inference_mode()
def pooled_features(pipe, x: torch.Tensor, t, names: Sequence[str], *, batch: int = 256) -> dict:
    """name -> (N, C) global-average-pooled layer outputs of the model at (x, t) under the null class;
    CONTROL -> x flattened."""
    unet, wanted = pipe.denoiser, set(names)
    null = _null_class(pipe)
    kept: dict = {name: [] for name in names}

    def recorder(name, h):
        if name in wanted:
            kept[name].append(h.float().mean(dim=(-2, -1)).cpu())

    with recording(unet, recorder):
        for start in range(0, x.shape[0], batch):
            part = x[start: start + batch].to(pipe.device, pipe.dtype)
            cond = None if null is None else torch.full((part.shape[0],), null, device=pipe.device)
            unet(part, t, cond)
    out = {CONTROL: x.flatten(1).float().cpu()}
    out.update({name: torch.cat(kept[name]) for name in names})
    return out


def _null_class(pipe) -> Optional[int]:
    if pipe.denoiser.config.num_classes is None:
        return None
    if pipe.null_class is None:
        raise ValueError("this model has no null class, so the probe cannot hide the label from it; probes need a "
                         "class-conditional model trained with label dropout (null_class in config.json)")
    return pipe.null_class


DIGIT_CLASSES = 10  # the probes read real digits


def check_probe(pipe, *, timesteps: Sequence[int], count: Optional[int] = None, per_class: int = 20,
                trajectories: bool = True):
    """Refuse, before any work, what `run` could not do: timesteps outside the model's noise levels,
    too few digits for both halves of the split, trajectories of a model without classes."""
    top = pipe.scheduler.num_train_timesteps - 1
    bad = [t for t in timesteps if not 0 <= t <= top]
    if bad or not timesteps:
        raise ValueError(f"timesteps must be ints in [0, {top}] (this model's noise levels), got {bad or 'none'}")
    if count is not None and count < 2 * DIGIT_CLASSES:
        raise ValueError(f"count must be an int >= {2 * DIGIT_CLASSES} (2 digits per class, so that both halves of "
                         f"the split hold some), got {count}")
    null = _null_class(pipe)
    if trajectories:
        if null is None:
            raise ValueError("trajectory probes need a class-conditional model; pass --no-trajectories to probe "
                             "only real digits")
        if per_class * pipe.num_real_classes() > 4096:
            raise ValueError(f"per_class {per_class} makes {per_class * pipe.num_real_classes()} trajectories in one "
                             "batch; at most 4096")


def noised(pipe, images: torch.Tensor, t: int, seed: int) -> torch.Tensor:
    """x_t ~ q(x_t | x_0) for images in [-1, 1], with fixed noise."""
    a = NoiseSchedule.from_config(pipe.scheduler).alphas_cumprod[t]
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return a.sqrt() * images + (1 - a).sqrt() * noise  # q(x_t | x_0)


def probe_real(pipe, images: torch.Tensor, labels: torch.Tensor, timesteps: Sequence[int], *, layers=None,
               seed: int = 0, log=None) -> ProbeResult:
    """Probes at every layer and timestep on real images noised to x_t; also the pure-noise control
    (timestep -1 in the rows: x is noise alone, so no probe can beat chance there)."""
    names = layers or layer_names(pipe.denoiser)
    num_classes = int(labels.max()) + 1
    train = split_mask(len(labels), seed)
    rows = []
    settings = [(int(t), noised(pipe, images, int(t), seed + 1)) for t in timesteps]
    pure = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed + 2))
    settings.append((-1, pure))
    for t, x in settings:
        features = pooled_features(pipe, x, pipe.scheduler.num_train_timesteps - 1 if t < 0 else t, names)
        for name in [CONTROL, *names]:
            accuracy, fitted = probe_accuracy(features[name], labels, train, num_classes)
            rows.append({"source": "real" if t >= 0 else "noise", "layer": name, "timestep": t, "step": "",
                         "accuracy": round(accuracy, 4), "train_accuracy": round(fitted, 4),
                         "dim": features[name].shape[1], "n_train": int(train.sum()), "n_test": int((~train).sum())})
        if log:
            best = max((r for r in rows if r["timestep"] == t and r["layer"] != CONTROL), key=lambda r: r["accuracy"])
            log(f"{'noise' if t < 0 else f't={t}':>6}: best layer {best['layer']} {best['accuracy']:.3f}, pixels "
                f"{next(r['accuracy'] for r in rows if r['timestep'] == t and r['layer'] == CONTROL):.3f}")
    return ProbeResult(rows, [CONTROL, *names], 1.0 / num_classes)


def probe_trajectories(pipe, *, per_class: int = 20, steps: int = 50, every: int = 5, layers=None, seed: int = 0,
                       log=None) -> ProbeResult:
    """Probes along class-conditional DDIM runs: x_t at every `every`-th step, re-read under the null class."""
    names = layers or layer_names(pipe.denoiser)
    null = _null_class(pipe)
    if null is None:
        raise ValueError("trajectory probes need a class-conditional model")
    num_classes = null if null == pipe.denoiser.config.num_classes - 1 else pipe.denoiser.config.num_classes
    labels = torch.arange(num_classes).repeat(per_class)
    size = pipe.default_size
    noise = torch.randn(len(labels), pipe.denoiser.config.in_channels, size, size,
                        generator=torch.Generator().manual_seed(seed))
    states: dict = {}

    def model(x, t):
        return pipe.denoiser(x, t, labels.to(x.device))

    def callback(i, t, x):
        if i % every == 0:
            states[i] = (int(t), x.detach().cpu().clone())

    with torch.inference_mode():
        SAMPLERS["ddim"](model, noise.to(pipe.device, pipe.dtype), pipe.scheduler, steps, callback=callback,
                         progress=False)
    train = split_mask(len(labels), seed)
    rows = []
    for i, (t, x) in sorted(states.items()):
        features = pooled_features(pipe, x, t, names)
        for name in [CONTROL, *names]:
            accuracy, fitted = probe_accuracy(features[name], labels, train, num_classes)
            rows.append({"source": "trajectory", "layer": name, "timestep": t, "step": i,
                         "accuracy": round(accuracy, 4), "train_accuracy": round(fitted, 4),
                         "dim": features[name].shape[1], "n_train": int(train.sum()), "n_test": int((~train).sum())})
        if log:
            best = max((r for r in rows if r["step"] == i and r["layer"] != CONTROL), key=lambda r: r["accuracy"])
            log(f"step {i:2d} (t={t:4d}): best layer {best['layer']} {best['accuracy']:.3f}")
    return ProbeResult(rows, [CONTROL, *names], 1.0 / num_classes)


def readable_from(rows: list, layer: str, level: float) -> Optional[int]:
    """The noisiest timestep from which on (towards t = 0) the layer's accuracy stays >= level."""
    curve = sorted(((r["timestep"], r["accuracy"]) for r in rows if r["layer"] == layer and r["timestep"] >= 0),
                   reverse=True)
    first = None
    for t, accuracy in curve:
        if accuracy >= level:
            first = t if first is None else first
        else:
            first = None
    return first


def summarize(real: ProbeResult, trajectory: Optional[ProbeResult] = None, *, ddim_timesteps=None,
              window=(20, 40)) -> str:
    """Where and when the class becomes linearly readable, in sentences with the numbers."""
    rows = [r for r in real.rows if r["source"] == "real"]
    noise = {r["layer"]: r["accuracy"] for r in real.rows if r["source"] == "noise"}
    timesteps = sorted({r["timestep"] for r in rows})
    noisiest, cleanest = timesteps[-1], timesteps[0]
    at = {(r["layer"], r["timestep"]): r["accuracy"] for r in rows}
    layers = [name for name in real.layers if name != CONTROL]
    best_clean = max(layers, key=lambda n: at[(n, cleanest)])
    best_noisy = max(layers, key=lambda n: at[(n, noisiest)])
    lines = [f"chance {real.chance:.2f}; pure-noise control: best layer {max(noise.values()):.3f}, "
             f"mean {np.mean(list(noise.values())):.3f}",
             f"noisiest t={noisiest}: best layer {best_noisy} {at[(best_noisy, noisiest)]:.3f}, "
             f"pixels {at[(CONTROL, noisiest)]:.3f}",
             f"cleanest t={cleanest}: best layer {best_clean} {at[(best_clean, cleanest)]:.3f}, "
             f"pixels {at[(CONTROL, cleanest)]:.3f}"]
    for level in (0.5, 0.8):
        earliest = {n: readable_from(rows, n, level) for n in [CONTROL, *layers]}
        reached = {n: t for n, t in earliest.items() if t is not None}
        if reached:
            first = max(reached, key=lambda n: (reached[n], n != CONTROL, at[(n, reached[n])]))
            lines.append(f"accuracy >= {level}: first (noisiest) at t={reached[first]} in {first} "
                         f"(pixels from t={earliest[CONTROL]})")
    if ddim_timesteps is not None and len(ddim_timesteps) > window[1]:  # runs of fewer steps have no such window
        lo, hi = int(ddim_timesteps[window[0]]), int(ddim_timesteps[window[1]])
        inside = sorted({r["timestep"] for r in rows if lo >= r["timestep"] >= hi})
        if inside:
            best = [max(at[(n, t)] for n in layers) for t in inside]
            lines.append(f"switch-experiment decision window (steps {window[0]}-{window[1]} of {len(ddim_timesteps)}, "
                         f"t={lo}..{hi}): best layer {min(best):.3f}-{max(best):.3f} at t={inside[-1]}..{inside[0]}")
    if trajectory is not None:
        traj = [r for r in trajectory.rows if r["layer"] != CONTROL]
        by_step: dict = {}
        for r in traj:
            by_step.setdefault(r["step"], []).append(r)
        parts = []
        for step, group in sorted(by_step.items()):
            best = max(group, key=lambda r: r["accuracy"])
            pixel = next(r["accuracy"] for r in trajectory.rows if r["step"] == step and r["layer"] == CONTROL)
            parts.append(f"{step}:{best['accuracy']:.2f}/{pixel:.2f}")
        lines.append("trajectories (step: best layer / pixels): " + " ".join(parts))
    return "\n".join(lines)


def real_digits(pipe, count: Optional[int] = None, seed: int = 0) -> tuple:
    """(images in [-1, 1], labels): the digits dataset at the model's size, `count` of them class-balanced."""
    from .data import load_dataset

    data = load_dataset("digits", pipe.default_size, pipe.denoiser.config.in_channels)
    indices = torch.arange(len(data))
    if count is not None and count < len(data):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        per_class = math.ceil(count / data.num_classes)
        picked = [order[data.labels[order] == c][:per_class] for c in range(data.num_classes)]
        indices = torch.cat(picked)[:count].sort().values
    return data.batch(indices)


def write_rows(rows: list, path):
    from .analysis import write_csv

    columns = ["layer", "timestep", "accuracy", "source", "step", "train_accuracy", "dim", "n_train", "n_test"]
    return write_csv([{k: r[k] for k in columns} for r in rows], path)


def run(pipe, out, *, timesteps=(999, 900, 800, 700, 600, 500, 400, 300, 200, 100, 50, 0), count=None,
        per_class: int = 20, steps: int = 50, every: int = 5, seed: int = 0, trajectories: bool = True,
        log=print) -> dict:
    """The whole probe experiment: probe.csv, heatmaps and summary.txt under `out`; returns the results."""
    from pathlib import Path

    out = Path(out)
    images, labels = real_digits(pipe, count, seed)
    log(f"probing {len(layer_names(pipe.denoiser))} layers on {len(labels)} real digits (half fit, half scored) at {len(timesteps)} timesteps")
    real = probe_real(pipe, images, labels, timesteps, seed=seed, log=log)
    trajectory = probe_trajectories(pipe, per_class=per_class, steps=steps, every=every, seed=seed, log=log) \
        if trajectories else None
    rows = real.rows + (trajectory.rows if trajectory else [])
    write_rows(rows, out / "probe.csv")
    plots.plot_probe(real, out / "probe_heatmap.png")
    if trajectory:
        plots.plot_probe(trajectory, out / "probe_trajectory.png", source="trajectory")
    text = summarize(real, trajectory, ddim_timesteps=make_timesteps(pipe.scheduler, steps).tolist())
    (out / "summary.txt").write_text(text + "\n")
    log(text)
    return {"real": real, "trajectory": trajectory, "summary": text}
