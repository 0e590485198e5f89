"""Train a pixel-space U-Net with the DDPM epsilon objective: one file, one config, one loop.

    python -m minidiff.train --dataset digits --image-size 32 --steps 4000 --out-dir runs/digits
    torchrun --standalone --nproc_per_node=2 -m minidiff.train ...   # DDP: each rank takes a shard
    python -m minidiff.train --resume runs/digits --steps 8000          # continue, bit for bit

Everything random comes from generators that are saved in the checkpoint (data order, noise,
timesteps, label dropout, torch/numpy/python global state), so k steps + resume + k steps equals
2k steps exactly on CPU. Every rank draws the whole global batch and keeps its slice, so the union
over ranks is the single-process batch and averaged DDP gradients equal the full-batch gradient
(dropout masks come from each rank's own global RNG, so with dropout > 0 that holds in distribution only).

A run lives in one folder: a fresh run refuses a folder holding another run's outputs (resume it,
or pass overwrite=True to delete just those), and a resumed run writes where it was resumed from.
SIGINT/SIGTERM (Ctrl-C) stop after the current step with a checkpoint, and say how to resume.

out_dir/checkpoint/ is replaced as a whole, in one rename (a kill mid-write keeps the previous one):
    model/                    the EMA weights as a native pipeline folder (minidiff.pipeline.load)
    train_state.safetensors   raw weights, optimizer moments, generator states
    train_state.json          step, config, optimizer hyper-parameters, scalar RNG state
    loss.csv                  the loss curve so far
"""
from __future__ import annotations

import copy
import csv
import io
import json
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, load_weights, read_state_dict
from .writing import TRAINING_KIND, atomic_folder, atomic_path, folder_kind, remove_folder, save_json, save_safetensors
from .config import config_to_dict
from .data import ImageSet, load_dataset, save_grid
from .images import class_titles
from .pipeline import Pipeline, load
from .plots import plot_loss
from .schedules import NoiseSchedule, SchedulerConfig
from .dit import DiT, DiTConfig
from .unet import UNet, UNetConfig


@dataclass
class TrainConfig:
    # data
    dataset: str = "digits"          # "digits", "shapes" or a folder of images (sub-folders = classes)
    image_size: int = 32
    channels: Optional[int] = None   # None: the dataset's own (1 for digits, 3 otherwise)
    # model: "unet" (UNetConfig fields below) or "dit" (DiTConfig fields further down)
    arch: str = "unet"
    model_channels: int = 32
    channel_mult: tuple = (1, 2, 2)
    num_res_blocks: int = 2
    attention_levels: tuple = (2,)
    mid_attention: bool = True
    norm_groups: int = 8
    dropout: float = 0.0
    patch_size: int = 2
    hidden_size: int = 128
    depth: int = 8
    num_heads: int = 4
    mlp_ratio: int = 4
    # conditioning: labels are replaced by the null class K with this probability (classifier-free guidance)
    class_cond: bool = True
    label_dropout: float = 0.1
    # noise schedule
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    # optimisation
    batch_size: int = 64             # the global batch; each of P ranks takes batch_size / P
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 200          # linear warm-up, then constant (so `steps` can grow on resume)
    steps: int = 4000
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    # output
    out_dir: str = "runs/digits"
    log_every: int = 50
    sample_every: int = 500          # sample grid + loss plot every this many steps (0: never)
    ckpt_every: int = 500
    sample_steps: int = 25           # DDIM steps for the periodic sample grids
    grid_scale: int = 0              # sample grids: nearest-neighbour upscaling (0: tiles of at least 128 px)
    progress: bool = True

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_levels = tuple(self.attention_levels)
        for name in ("image_size", "batch_size", "steps", "log_every", "ckpt_every", "sample_steps",
                     "num_train_timesteps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig: {name} must be a positive int, got {value!r}")
        if not isinstance(self.grid_scale, int) or self.grid_scale < 0:
            raise ValueError(f"TrainConfig: grid_scale must be an int >= 0 (0: readable tiles), got {self.grid_scale!r}")
        if not isinstance(self.sample_every, int) or self.sample_every < 0:
            raise ValueError(f"TrainConfig: sample_every must be an int >= 0 (0: never), got {self.sample_every!r}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"TrainConfig: label_dropout must be in [0, 1), got {self.label_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig: ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.arch not in ("unet", "dit"):
            raise ValueError(f"TrainConfig: arch must be 'unet' or 'dit', got {self.arch!r}")
        if not self.lr > 0 or not self.grad_clip > 0:
            raise ValueError(f"TrainConfig: lr and grad_clip must be > 0, got {self.lr}, {self.grad_clip}")

    def to_dict(self) -> dict:
        return config_to_dict(self)


# Fields that may change when resuming: they do not change what the next step computes.
RESUMABLE = frozenset({"steps", "out_dir", "log_every", "sample_every", "ckpt_every", "sample_steps", "progress"})

PRESETS = {
    "tiny": dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(), norm_groups=8),
    "small": dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(2,), norm_groups=8),
    "base": dict(model_channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_levels=(2,),
                 norm_groups=16),
    "dit-small": dict(arch="dit", patch_size=2, hidden_size=64, depth=8, num_heads=4, mlp_ratio=4),
}


def unet_config(cfg: TrainConfig, data: ImageSet) -> UNetConfig:
    """The U-Net for this data; a class-conditional one has K + 1 classes, the last being "no class"."""
    return UNetConfig(in_channels=data.channels, out_channels=data.channels, model_channels=cfg.model_channels,
                      channel_mult=cfg.channel_mult, num_res_blocks=cfg.num_res_blocks,
                      attention_levels=cfg.attention_levels, mid_attention=cfg.mid_attention,
                      num_classes=data.num_classes + 1 if cfg.class_cond else None, class_cond="add",
                      dropout=cfg.dropout, norm_groups=cfg.norm_groups, sample_size=cfg.image_size)


def dit_config(cfg: TrainConfig, data: ImageSet) -> DiTConfig:
    """The DiT for this data, with the same K + 1 classes as `unet_config`."""
    return DiTConfig(in_channels=data.channels, out_channels=data.channels, patch_size=cfg.patch_size,
                     hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                     num_classes=data.num_classes + 1 if cfg.class_cond else None, sample_size=cfg.image_size)


def build_model(cfg: TrainConfig, data: ImageSet):
    """A freshly initialised U-Net or DiT, as `cfg.arch` says."""
    return DiT(dit_config(cfg, data)) if cfg.arch == "dit" else UNet(unet_config(cfg, data))


def scheduler_config(cfg: TrainConfig) -> SchedulerConfig:
    # No x0 clipping: DDIM keeps the unclipped epsilon (as diffusers does), and with classifier-free
    # guidance the two disagree enough to turn digits into other digits (measured: accuracy 1.0 -> 0.3).
    return SchedulerConfig(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule)


class BatchOrder:
    """Shuffled epochs of dataset indices drawn from one generator; its whole state is saveable."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(size, generator=self.generator)
        self.pos = 0

    def next(self, count: int) -> torch.Tensor:
        taken = []
        while count:
            if self.pos == self.size:
                self.order, self.pos = torch.randperm(self.size, generator=self.generator), 0
            part = self.order[self.pos: self.pos + count]
            taken.append(part)
            self.pos += len(part)
            count -= len(part)
        return torch.cat(taken)


@dataclass
class Trained:
    """What `train` returns: the EMA pipeline, the raw model and optimizer, and the loss log."""

    pipeline: Pipeline
    model: torch.nn.Module  # UNet or DiT
    optimizer: torch.optim.Optimizer
    step: int
    losses: list = field(default_factory=list)  # rows (step, loss, images_per_s, seconds)


# -- distributed -------------------------------------------------------------------------------------

def _distributed() -> tuple:
    """(rank, world size, initialised here); a process group exists only under torchrun with P > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


# -- the loop ----------------------------------------------------------------------------------------

class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; the message says how to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # what a shell reports for a process the signal ended


def train(config: TrainConfig, resume=None, *, overwrite: bool = False) -> Trained:
    """Train (or continue training the run in folder `resume`) and return the result.

    A fresh run refuses an out_dir holding another run's outputs unless `overwrite`, which deletes
    those outputs (checkpoint/, samples/step_*.png, loss.csv, loss.png) and nothing else. A resumed
    run continues in `resume`, wherever the checkpoint was first written.
    """
    cfg = config
    if resume is not None:
        if overwrite:
            raise ValueError("resume continues a run and overwrite starts a new one; pass one of them")
        cfg = replace(cfg, out_dir=str(_resume_folder(resume, cfg)))
    rank, world, own_group = _distributed()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {world}")
    main = rank == 0
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    out_dir = Path(cfg.out_dir)
    stop = _StopRequest()
    try:
        if resume is None:
            _claim_run_folder(out_dir, overwrite, clear=main)
        if main:
            print(f"writing to {out_dir}" + (" (resuming the run there)" if resume is not None else " (a new run)"),
                  flush=True)
        data = load_dataset(cfg.dataset, cfg.image_size, cfg.channels)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        model = build_model(cfg, data).to(device)
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        order = BatchOrder(len(data), cfg.seed)
        noise_gen = torch.Generator().manual_seed(cfg.seed + 1)
        step, seconds, losses, loss_sum = 0, 0.0, [], [0.0, 0]
        if resume is not None:
            state = _read_checkpoint(resume, cfg)
            step, seconds, losses, loss_sum = _restore(state, model, ema, optimizer, order, noise_gen)
        # pack=False: the EMA is updated in place after every step, so its weights must stay plain
        pipeline = Pipeline(ema, scheduler_config(cfg), null_class=data.num_classes if cfg.class_cond else None,
                            class_names=data.class_names if cfg.class_cond else None, pack=False)
        if step >= cfg.steps:
            return Trained(pipeline, model, optimizer, step, losses)

        net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(model)
        alphas_cumprod = NoiseSchedule.from_config(pipeline.scheduler).alphas_cumprod.to(device)
        shard = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
        if main:
            n_params = sum(p.numel() for p in model.parameters())
            print(f"training {n_params / 1e6:.2f}M parameters on {len(data)} images from {data.source} "
                  f"({data.num_classes} classes, {cfg.image_size}px), {world} process(es), step {step} -> {cfg.steps}")
        bar = tqdm(total=cfg.steps, initial=step, disable=not (main and cfg.progress), dynamic_ncols=True)
        model.train()
        clock = rate_clock = time.perf_counter()  # clock: training time so far; rate_clock: since the last log
        rate_step = saved_step = step
        stop.install()
        while step < cfg.steps:
            x0, noise, t, cond = (None if v is None else v[shard].to(device)
                                  for v in draw_batch(cfg, data, order, noise_gen))
            a = alphas_cumprod[t][:, None, None, None]
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise  # q(x_t | x_0)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
            loss = F.mse_loss(net(xt, t, cond), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            _update_ema(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
            step += 1
            loss_sum[0] += loss.item()
            loss_sum[1] += 1

            if step % cfg.log_every == 0 or step == cfg.steps:
                mean_loss = torch.tensor(loss_sum[0] / loss_sum[1], device=device)
                if world > 1:
                    dist.all_reduce(mean_loss)
                    mean_loss /= world
                now = time.perf_counter()
                rate = (step - rate_step) * cfg.batch_size / (now - rate_clock)
                seconds, clock = seconds + now - clock, now
                rate_clock, rate_step = now, step
                losses.append((step, float(mean_loss), rate, seconds))
                loss_sum = [0.0, 0]
                bar.set_postfix(loss=f"{float(mean_loss):.4f}", img_s=f"{rate:.0f}")
            bar.update(1)
            if main and cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps):
                _sample_grid(pipeline, out_dir / "samples" / f"step_{step:06d}.png", cfg.sample_steps, cfg.grid_scale)
                plot_loss(losses, out_dir / "loss.png", missing_ok=True)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                seconds, clock = seconds + now - clock, now
                if main:
                    _write_checkpoint(out_dir, cfg, pipeline, model, optimizer, order, noise_gen, step, seconds,
                                      losses, loss_sum)
                saved_step = step
                model.train()
            if stop.requested(world, device):
                bar.close()
                now = time.perf_counter()
                seconds, clock = seconds + now - clock, now
                if main and saved_step != step:
                    _write_checkpoint(out_dir, cfg, pipeline, model, optimizer, order, noise_gen, step, seconds,
                                      losses, loss_sum)
                message = (f"stopped at step {step} of {cfg.steps}; the checkpoint in {out_dir / 'checkpoint'} "
                           f"holds it. Continue with: minidiff train --resume {out_dir}")
                if main:
                    print(message, flush=True)
                raise TrainingInterrupted(message, stop.signum)
        bar.close()
        return Trained(pipeline, model, optimizer, step, losses)
    finally:
        stop.restore()
        if own_group:
            dist.destroy_process_group()


class _StopRequest:
    """Once installed, SIGINT/SIGTERM ask the loop to stop after the current step (and save); a second
    signal stops at once, leaving the last checkpoint, which is always whole, as it is."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.previous: dict = {}

    def install(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (signal again to quit "
              "without saving)", file=sys.stderr, flush=True)

    def requested(self, world: int, device) -> bool:
        """Whether any process was asked to stop (all ranks must stop at the same step)."""
        if world == 1:
            return self.signum is not None
        flag = torch.tensor(0 if self.signum is None else self.signum, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signum = int(flag) or None
        return self.signum is not None


# What training writes into out_dir; a fresh run must not mix with another run's.
RUN_OUTPUTS = ("checkpoint", "loss.csv", "loss.png")


def _resume_folder(resume, cfg: TrainConfig) -> Path:
    """The run folder that `resume` names (the folder holding checkpoint/, or checkpoint/ itself)."""
    path, folder = checkpoint_dir(resume), Path(resume)
    if path == folder:  # the checkpoint folder itself was named
        if path.name != "checkpoint":
            raise CheckpointError(f"{path} holds a checkpoint but is not named checkpoint/; pass the run folder "
                                  "that holds checkpoint/ to --resume")
        folder = path.parent
    saved = json.loads((path / "train_state.json").read_text())["config"].get("out_dir")
    asked = Path(cfg.out_dir).resolve()
    if asked not in (folder.resolve(), Path(saved or folder).resolve()):
        raise ValueError(f"resuming continues in {folder}, but out_dir asks for {cfg.out_dir}; to branch a run, copy "
                         "its folder and resume the copy")
    return folder


def _claim_run_folder(out_dir: Path, overwrite: bool, clear: bool):
    """A fresh run refuses a folder with another run's outputs; `overwrite` deletes those (only those)."""
    samples = sorted((out_dir / "samples").glob("step_*.png"))
    found = [name for name in RUN_OUTPUTS if (out_dir / name).exists()] + (["samples/"] if samples else [])
    if not found:
        return
    checkpoint = out_dir / "checkpoint"
    if not overwrite:
        try:
            at = f", at step {json.loads((checkpoint / 'train_state.json').read_text())['step']}"
        except (OSError, ValueError, KeyError, TypeError):
            at = ""
        raise FileExistsError(f"{out_dir} already holds a training run ({', '.join(found)}{at}); continue it with "
                              f"--resume {out_dir}, or pass --overwrite to delete its checkpoint, sample grids and "
                              "loss log and start again")
    if checkpoint.exists() and folder_kind(checkpoint) != TRAINING_KIND:
        raise FileExistsError(f"{checkpoint} is not a training checkpoint, so --overwrite leaves it (and the run "
                              "folder) untouched; choose another --out-dir")
    if not clear:
        return
    if checkpoint.exists():
        remove_folder(checkpoint)
    for png in samples:
        png.unlink()
    if (out_dir / "samples").is_dir() and not any((out_dir / "samples").iterdir()):
        (out_dir / "samples").rmdir()
    for name in ("loss.csv", "loss.png"):
        (out_dir / name).unlink(missing_ok=True)


def draw_batch(cfg: TrainConfig, data: ImageSet, order: BatchOrder, noise_gen: torch.Generator) -> tuple:
    """The global batch (x0, noise, t, labels or None). Every rank draws all of it from the same
    generators and keeps its shard, so the shards' union is exactly the single-process batch."""
    x0, labels = data.batch(order.next(cfg.batch_size))
    noise = torch.randn(x0.shape, generator=noise_gen)
    t = torch.randint(0, cfg.num_train_timesteps, (cfg.batch_size,), generator=noise_gen)
    drop = torch.rand(cfg.batch_size, generator=noise_gen) < cfg.label_dropout  # drawn even if unused: one stream
    labels = torch.where(drop, data.num_classes, labels) if cfg.class_cond else None
    return x0, noise, t, labels


@torch.no_grad()
def _update_ema(ema: UNet, model: UNet, decay: float):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def _sample_grid(pipeline: Pipeline, path: Path, steps: int, scale: int = 0):
    """40 samples from the EMA model, 4 per class (classes as columns, titled), fixed seed."""
    classes = pipeline.null_class
    labels = torch.arange(classes).repeat(max(1, 40 // classes)) if classes else None
    count = 40 if labels is None else len(labels)
    images = pipeline.generate(steps=steps, seed=1234, batch_size=count, class_labels=labels, progress=False)
    titles = class_titles(pipeline.class_names, range(classes)) if classes and classes <= 16 else None
    save_grid(images, path, nrow=classes if classes and classes <= 16 else 8, scale=scale or None,
              column_titles=titles)


# -- checkpoints --------------------------------------------------------------------------------------

def _write_checkpoint(out_dir, cfg, pipeline, model, optimizer, order, noise_gen, step, seconds, losses, loss_sum):
    """Replace out_dir/checkpoint in one rename, then refresh out_dir/loss.csv."""
    opt_state = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(optimizer_tensors(opt_state))
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    tensors.update({
        "rng.torch": torch.get_rng_state(),
        "rng.numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "rng.python": torch.tensor(python_state[1], dtype=torch.int64),
        "rng.data_order": order.generator.get_state(),
        "rng.noise": noise_gen.get_state(),
        "data.order": order.order,
    })
    meta = {
        "step": step, "seconds": seconds, "config": cfg.to_dict(), "loss_sum": loss_sum,
        "param_groups": opt_state["param_groups"], "data_pos": order.pos,
        "rng_numpy": [numpy_state[0], int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
        "rng_python": [python_state[0], python_state[2]],
    }
    pipeline.meta = {"training": {"step": step, "seconds": round(seconds, 1), "config": cfg.to_dict()}}
    csv_text = _loss_csv(losses)
    with atomic_folder(out_dir / "checkpoint", overwrite=True, kind=TRAINING_KIND, marker=True) as tmp:
        pipeline.save(tmp / "model")
        save_safetensors(tensors, tmp / "train_state.safetensors")
        save_json(meta, tmp / "train_state.json")
        (tmp / "loss.csv").write_text(csv_text)
    with atomic_path(out_dir / "loss.csv") as tmp:
        tmp.write_text(csv_text)


def optimizer_tensors(opt_state: dict) -> dict:
    """An optimizer's per-parameter slots as flat tensors `optim.{index}.{slot}` (safetensors-ready)."""
    return {f"optim.{index}.{name}": v for index, slots in opt_state["state"].items() for name, v in slots.items()}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, param_groups: list):
    """The inverse of `optimizer_tensors`, with the hyper-parameters saved beside them."""
    slots: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": param_groups})


def _loss_csv(losses) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["step", "loss", "images_per_s", "seconds"])
    writer.writerows([s, repr(float(l)), f"{r:.1f}", f"{sec:.1f}"] for s, l, r, sec in losses)
    return buffer.getvalue()


def checkpoint_dir(path) -> Path:
    """The checkpoint folder of a run's out_dir (or the folder itself); an error if it holds no training state."""
    path = Path(path)
    if (path / "checkpoint").is_dir():
        path = path / "checkpoint"
    if not (path / "train_state.json").exists():
        raise CheckpointError(f"{path} is not a training checkpoint (no train_state.json); pass the run's out_dir "
                              "or its checkpoint/ folder to --resume")
    return path


def _read_checkpoint(path, cfg: TrainConfig) -> dict:
    """The saved state, after checking it was made by the same config (up to RESUMABLE fields)."""
    path = checkpoint_dir(path)
    meta = json.loads((path / "train_state.json").read_text())
    defaults = TrainConfig().to_dict()  # fields added since the checkpoint was written held their defaults
    saved, now = {**defaults, **meta["config"]}, cfg.to_dict()
    check_same_config(path, saved, now)
    meta["tensors"] = read_state_dict(path / "train_state.safetensors")
    meta["ema"] = load(path / "model").denoiser.state_dict()
    meta["losses"] = read_losses(path / "loss.csv")
    return meta


def check_same_config(path, saved: dict, now: dict):
    """A resume must not change what the next step computes: only RESUMABLE fields may differ."""
    differing = [f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in sorted(set(saved) | set(now))
                 if k not in RESUMABLE and saved.get(k) != now.get(k)]
    if differing:
        raise ValueError(f"cannot resume from {path}: it was trained with a different config ({'; '.join(differing)})."
                         " Resume with the original settings (see its train_state.json), or start a new run")


def read_losses(path) -> list:
    """The rows (step, loss, images_per_s, seconds) of a loss.csv that `_loss_csv` wrote."""
    return [(int(r["step"]), float(r["loss"]), float(r["images_per_s"]), float(r["seconds"]))
            for r in csv.DictReader(io.StringIO(Path(path).read_text()))]


def _restore(state, model, ema, optimizer, order, noise_gen):
    tensors = state["tensors"]
    load_weights(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, "model in train_state")
    load_weights(ema, state["ema"], "EMA model")
    restore_optimizer(optimizer, tensors, state["param_groups"])
    torch.set_rng_state(tensors["rng.torch"])
    kind, pos, has_gauss, gauss = state["rng_numpy"]
    np.random.set_state((kind, tensors["rng.numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, gauss_next = state["rng_python"]
    random.setstate((version, tuple(tensors["rng.python"].tolist()), gauss_next))
    order.generator.set_state(tensors["rng.data_order"])
    order.order, order.pos = tensors["data.order"].clone(), state["data_pos"]
    noise_gen.set_state(tensors["rng.noise"])
    return state["step"], state["seconds"], state["losses"], list(state["loss_sum"])
