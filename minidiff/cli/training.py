"""Command lines that train: `train` and `toy-metric`."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


from .common import check_ints, check_output, Parser, require, _threads_arg

IMAGE_SIZES = (4, 1024)  # what the datasets resize to (minidiff.data refuses others)


# -- train -------------------------------------------------------------------------------------------

TRAIN_FLAG_HELP = {
    "dataset": "'digits', 'shapes' or a folder of images with one sub-folder per class (default digits)",
    "image_size": "training resolution in pixels (default 32)",
    "channels": "1 or 3 (default: the dataset's own)",
    "batch_size": "global batch, split across torchrun processes (default 64)",
    "label_dropout": "probability a label becomes the null class, for classifier-free guidance (default 0.1)",
    "steps": "train until this step; may grow on --resume (default 4000)",
    "sample_every": "write a sample grid and the loss plot every N steps, 0 for never (default 500)",
    "grid_scale": "enlarge the sample grids' images this many times (default 0: tiles of at least 128 px)",
    "out_dir": "run folder: checkpoint/, samples/, loss.csv, loss.png (default runs/digits)",
}


def _train_parser() -> Parser:
    from dataclasses import fields

    from ..trainer import PRESETS, TrainConfig

    p = Parser(prog="minidiff train", description="Train a small diffusion U-Net (DDPM epsilon loss).",
               argument_default=argparse.SUPPRESS)
    p.add_argument("--preset", choices=sorted(PRESETS), help="model size; explicit model flags override it")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR (a run's out_dir or its checkpoint/)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an out_dir holding a run, deleting "
                   "its checkpoint, sample grids and loss log")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        text = TRAIN_FLAG_HELP.get(f.name, f"default {f.default}")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        elif isinstance(f.default, tuple):
            p.add_argument(flag, type=_int_tuple, metavar="N,N,...", help=f"default {','.join(map(str, f.default))}")
        elif f.name == "channels":
            p.add_argument(flag, type=int, choices=(1, 3), help=text)
        else:
            p.add_argument(flag, type=type(f.default), help=text)
    _latent_flags(p, {f.name for f in fields(TrainConfig)})
    _threads_arg(p, default=argparse.SUPPRESS)
    return p


def _latent_flags(p: Parser, taken: set):
    """The flags of the latent stages (minidiff.latent_trainer) that the pixel trainer lacks."""
    from dataclasses import fields

    from ..latent_trainer import STAGES, LatentTrainConfig

    p.add_argument("--stage", choices=STAGES, help="train a Stable Diffusion part on the procedural scenes: the "
                   "autoencoder, then text2image (text encoder + U-Net on its latents; needs --autoencoder)")
    for f in fields(LatentTrainConfig):
        if f.name in taken or f.name == "stage":
            continue
        kind = _int_tuple if isinstance(f.default, tuple) else type(f.default)
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, help=f"with --stage: default {f.default or None}")


def _int_tuple(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,2, got {text!r}") from None


def _train(args):
    """Flags mirror TrainConfig; with --resume, unspecified flags come from the checkpoint."""
    from ..config import config_from_dict
    from ..trainer import PRESETS, TrainConfig, TrainingInterrupted, checkpoint_dir, train

    args = {k: v for k, v in vars(args).items() if k not in ("threads", "argv")}
    resume = args.pop("resume", None)
    overwrite = args.pop("overwrite", False)
    settings: dict = {}
    if resume is not None:
        settings = json.loads((checkpoint_dir(resume) / "train_state.json").read_text())["config"]
    if "stage" in args or "stage" in settings:
        return _train_latent({**settings, **args}, resume, overwrite)
    settings.update(PRESETS.get(args.pop("preset", None), {}))
    settings.update(args)
    check_ints(argparse.Namespace(**settings), {"--image-size": ("image_size", *IMAGE_SIZES)})
    config = config_from_dict(TrainConfig, settings)
    if resume is not None:
        check_output(resume, "folder", "--resume")  # a resumed run writes where it was resumed from
    else:
        check_output(config.out_dir, "folder", "--out-dir")
    if config.sample_every:
        require("PIL", "writing sample grids (pass --sample-every 0 to skip them)")
    if config.dataset == "digits":
        require("sklearn", "the digits dataset")
    try:
        result = train(config, resume=resume, overwrite=overwrite)
    except TrainingInterrupted as stopped:  # already said where the checkpoint is and how to resume
        raise SystemExit(stopped.exit_code) from None
    if os.environ.get("RANK", "0") == "0":
        where = checkpoint_dir(resume) if resume is not None else Path(config.out_dir) / "checkpoint"
        print(f"done: step {result.step}, checkpoint in {where}", flush=True)
    return result


def _train_latent(settings: dict, resume, overwrite: bool):
    from ..latent_trainer import latent_config_from, train_latent
    from ..trainer import TrainingInterrupted

    if "preset" in settings:
        raise ValueError("--preset sizes the pixel U-Net; the --stage runs take their own size flags")
    config = latent_config_from(settings)
    check_output(resume if resume is not None else config.out_dir, "folder", "--resume" if resume else "--out-dir")
    require("PIL", "writing sample grids")
    try:
        return train_latent(config, resume=resume, overwrite=overwrite)
    except TrainingInterrupted as stopped:
        raise SystemExit(stopped.exit_code) from None


# -- toy metric --------------------------------------------------------------------------------------

def _toy_metric_parser() -> Parser:
    p = Parser(prog="minidiff toy-metric",
               description="Train the toy-metric classifier (not Inception FID) for a dataset.")
    p.add_argument("--dataset", default="digits", help="'digits', 'shapes' or a folder (default digits)")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--channels", type=int, choices=(1, 3), default=None)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--steps", type=int, default=1500, help="--dataset scenes: training steps on fresh scenes "
                   "(batch 32; default 1500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors, "
                                                "reference.safetensors)")
    p.add_argument("--overwrite", action="store_true")
    _threads_arg(p)
    return p


def _toy_metric(args):
    """Train the toy classifier for a dataset and save it (weights, config, reference statistics)."""
    check_ints(args, {"--image-size": ("image_size", *IMAGE_SIZES), "--epochs": ("epochs", 1, 10_000)})
    out = check_output(args.out, "folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    if args.dataset == "scenes":
        return _scenes_metric(args)
    if args.dataset == "digits":
        require("sklearn", "the digits dataset")
    from ..data import load_dataset
    from ..metrics import train_metric

    data = load_dataset(args.dataset, args.image_size, args.channels)
    metric, info = train_metric(data, epochs=args.epochs, seed=args.seed)
    command = "minidiff toy-metric " + " ".join(args.argv)
    metric.save(args.out, overwrite=args.overwrite, meta={"dataset": data.source, "trained_by": command, **info})
    print(f"test accuracy {info['test_accuracy']:.4f}; real-vs-real toy FID (class-balanced sets of n) "
          f"{info['reference_fd_balanced']}; saved {args.out}")
    return metric


def _scenes_metric(args):
    """The scenes attribute classifier (minidiff.scenes_metric), trained on fresh procedural scenes."""
    from ..scenes_metric import train_scene_metric

    if args.steps < 1:
        raise ValueError(f"--steps must be positive, got {args.steps}")
    metric, info = train_scene_metric(steps=args.steps, seed=args.seed)
    command = "minidiff toy-metric " + " ".join(args.argv)
    metric.save(args.out, overwrite=args.overwrite, meta={"dataset": "scenes", "trained_by": command, **info})
    print(f"head accuracy on fresh scenes {info['head_accuracy']}; real-vs-real toy FID {info['reference_fd']}; "
          f"saved {args.out}")
    return metric
