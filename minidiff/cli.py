"""The `minidiff` command line: every front end (sample, demo, train, analyze, bench, toy-metric).

Library modules do not parse arguments; each command here parses its flags and calls them.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from .calibration import COSTS, calibrate
from . import analysis, cache, metrics, plots
from .checkpoint import CheckpointError, atomic_path
from .frontier import SCHEDULES, format_budgets, format_rows, frontier
from .samplers import SAMPLERS


# -- sample ----------------------------------------------------------------------------------------

def sample_main(argv=None) -> int:
    from .samplers import SAMPLERS

    parser = argparse.ArgumentParser(prog="minidiff sample", description="Sample a model, optionally with caching.")
    parser.add_argument("--model", required=True, help="minidiff model folder (see convert/ for public checkpoints)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise (ddim only)")
    parser.add_argument("--karras-sigmas", action="store_true", help="Karras et al. 2022 noise levels "
                        "(euler, heun, dpmpp_2m, unipc)")
    parser.add_argument("--cache-interval", type=int, default=1, help="N: one full U-Net step every N steps")
    parser.add_argument("--cache-branch", type=int, default=0, help="skip connection the shallow path keeps")
    parser.add_argument("--cache-schedule", default="uniform",
                        choices=["uniform", "nonuniform", "calibrated", "adaptive"])
    parser.add_argument("--cache-forecast", default=None, choices=[0, 1, 2, "auto"],
                        type=lambda v: v if v == "auto" else int(v) if v.isdigit() else v,
                        help="0: reuse the cached deep feature; 1, 2: extrapolate it through the last 2 or 3 full "
                             "steps; auto: 2 for deterministic samplers, 0 for noisy ones (default: 0; auto if "
                             "adaptive)")
    parser.add_argument("--cache-threshold", type=float, help="adaptive: relative L1 staleness that triggers a refresh")
    parser.add_argument("--cache-budget", type=float, help="adaptive: most MACs per sample, as a fraction of uncached")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--class", dest="class_labels", type=int, nargs="+", help="class label(s)")
    parser.add_argument("--prompt", nargs="+", help="text prompt(s) for text-conditioned models")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", default="out/sample.png")
    parser.add_argument("--allow-nan", action="store_true", help="load weights even if they contain NaN/Inf")
    args = parser.parse_args(argv)

    import torch

    from .checkpoint import CheckpointError
    from .pipeline import load
    from .cache import mac_bound

    try:
        pipe = load(args.model, device=args.device, dtype=getattr(torch, args.dtype), allow_nan=args.allow_nan)
        labels = args.class_labels
        batch = args.batch_size or (len(labels) if labels else len(args.prompt) if args.prompt else 4)
        if labels and len(labels) == 1:
            labels = labels * batch
        prompt = args.prompt[0] if args.prompt and len(args.prompt) == 1 else args.prompt
        images = pipe.generate(steps=args.steps, sampler=args.sampler, eta=args.eta, karras_sigmas=args.karras_sigmas,
                               cache_interval=args.cache_interval, cache_branch=args.cache_branch,
                               cache_schedule=args.cache_schedule, cache_forecast=args.cache_forecast,
                               cache_threshold=args.cache_threshold, cache_budget=args.cache_budget,
                               seed=args.seed, batch_size=batch,
                               class_labels=labels, prompt=prompt, negative_prompt=args.negative_prompt,
                               guidance_scale=args.guidance_scale, height=args.height, width=args.width)
    except (CheckpointError, ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import math

    from .data import save_grid

    save_grid(images, args.out, nrow=math.ceil(math.sqrt(images.shape[0])))
    run = pipe.last_run
    ratio = run.shallow_ratio
    print(f"wrote {args.out}: {run.model_calls} U-Net calls ({run.full_calls} full, {run.shallow_calls} shallow "
          f"at branch {args.cache_branch}), {run.seconds:.2f} s; shallow/full MACs {ratio:.3f}, "
          f"MAC bound on speedup {1 / run.mac_fraction:.2f}x (uniform N={args.cache_interval}: "
          f"{mac_bound(1, args.cache_interval - 1, ratio):.2f}x)")
    print(f"MACs {run.mac_fraction:.3f} of the uncached run, forecast order {run.forecast}; full steps per sample: "
          + "; ".join(f"{i}: {steps}" for i, steps in enumerate(run.full_steps_per_sample)))
    return 0



# -- demo ------------------------------------------------------------------------------------------

def demo_main(argv=None) -> int:
    from . import demo

    p = argparse.ArgumentParser(prog="minidiff demo", description=demo.__doc__.splitlines()[0])
    p.add_argument("--model", help=f"native model folder (default: the shipped weights/{demo.DEFAULT_MODEL})")
    p.add_argument("--classifier", help=f"toy-metric classifier folder (default: weights/{demo.DEFAULT_CLASSIFIER}); "
                                        "'none' skips the metrics")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--interval", type=int, default=5, help="cache interval N: a full U-Net call every N steps")
    p.add_argument("--branch", type=int, default=0, help="cache branch (0: shallowest skip, the cheapest)")
    p.add_argument("--schedule", default="uniform", choices=("uniform", "nonuniform"))
    p.add_argument("--per-class", type=int, default=4, help="samples per class (default 4: a 40-image grid)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="time each setting this many times (interleaved), keep the "
                                                            "fastest (default 3: a shared machine is noisy)")
    p.add_argument("--sweep", action="store_true", help="also run N = 2, 3, 5, 10, uniform and non-uniform "
                                                         "(N = 1 is the uncached run)")
    p.add_argument("--out", default="out", help="folder for the PNG grids (default out/)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these small batches gain little from more, and on a busy "
                        "machine OpenMP threads waiting for each other were measured 50x slower); 0: torch's choice")
    args = p.parse_args(argv)
    for name in ("per_class", "repeats", "interval"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.threads < 0:
        p.error(f"--threads must be 0 (torch's choice) or more, got {args.threads}")
    demo.demo(**vars(args))
    return 0


# -- train -----------------------------------------------------------------------------------------

TRAIN_FLAG_HELP = {
    "dataset": "'digits', 'shapes' or a folder of images with one sub-folder per class (default digits)",
    "image_size": "training resolution in pixels (default 32)",
    "channels": "1 or 3 (default: the dataset's own)",
    "batch_size": "global batch, split across torchrun processes (default 64)",
    "label_dropout": "probability a label becomes the null class, for classifier-free guidance (default 0.1)",
    "steps": "train until this step; may grow on --resume (default 4000)",
    "sample_every": "write a sample grid and the loss plot every N steps, 0 for never (default 500)",
    "out_dir": "run folder: checkpoint/, samples/, loss.csv, loss.png (default runs/digits)",
}


def _train_parser() -> argparse.ArgumentParser:
    from dataclasses import fields

    from .train import PRESETS, TrainConfig

    p = argparse.ArgumentParser(prog="minidiff train", description="Train a small diffusion U-Net (DDPM epsilon loss).",
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
    return p


def _int_tuple(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,2, got {text!r}") from None


def train_main(argv=None):
    """`minidiff train`: flags mirror TrainConfig; with --resume, unspecified flags come from the checkpoint."""
    from .config import config_from_dict
    from .train import PRESETS, TrainConfig, TrainingInterrupted, checkpoint_dir, train

    args = vars(_train_parser().parse_args(argv))
    resume = args.pop("resume", None)
    overwrite = args.pop("overwrite", False)
    settings: dict = {}
    if resume is not None:
        settings = json.loads((checkpoint_dir(resume) / "train_state.json").read_text())["config"]
    settings.update(PRESETS.get(args.pop("preset", None), {}))
    settings.update(args)
    try:
        return train(config_from_dict(TrainConfig, settings), resume=resume, overwrite=overwrite)
    except TrainingInterrupted as stopped:  # already said where the checkpoint is and how to resume
        raise SystemExit(stopped.exit_code) from None


# -- toy metric ------------------------------------------------------------------------------------

def toy_metric_main(argv=None):
    """Train the toy classifier for a dataset and save it (weights, config, reference statistics)."""
    from .data import load_dataset
    from .metrics import train_metric

    p = argparse.ArgumentParser(prog="minidiff toy-metric",
                                description="Train the toy-metric classifier (not Inception FID) for a dataset.")
    p.add_argument("--dataset", default="digits", help="'digits', 'shapes' or a folder (default digits)")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--channels", type=int, choices=(1, 3), default=None)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors, "
                                                "reference.safetensors)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    data = load_dataset(args.dataset, args.image_size, args.channels)
    metric, info = train_metric(data, epochs=args.epochs, seed=args.seed)
    command = "minidiff toy-metric " + " ".join(argv if argv is not None else sys.argv[1:])
    metric.save(args.out, overwrite=args.overwrite,
                meta={"dataset": data.source, "trained_by": command, **info})
    print(f"test accuracy {info['test_accuracy']:.4f}; real-vs-real toy FID (class-balanced sets of n) "
          f"{info['reference_fd_balanced']}; saved {args.out}")
    return metric


def probe_main(argv=None) -> int:
    """`minidiff analyze probe`: linear probes of the class at every layer and timestep (minidiff.probe)."""
    parser = argparse.ArgumentParser(prog="minidiff analyze probe", description="Linear probes of the class label "
                                     "from every recorded layer at every timestep, on real digits noised to x_t and "
                                     "along sampling runs, with the model conditioned on the null class.")
    parser.add_argument("--model", required=True, help="class-conditional minidiff model folder with a null class")
    parser.add_argument("--out", default="out/probe", help="folder for probe.csv, heatmaps and summary.txt")
    parser.add_argument("--timesteps", type=int, nargs="+",
                        default=[999, 900, 800, 700, 600, 500, 400, 300, 200, 100, 50, 0])
    parser.add_argument("--count", type=int, help="real digits to use, class-balanced (default all 1,797)")
    parser.add_argument("--per-class", type=int, default=20, help="sampling runs per class for trajectory probes")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the trajectories")
    parser.add_argument("--every", type=int, default=5, help="probe every N-th trajectory step")
    parser.add_argument("--no-trajectories", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)

    import torch

    from .checkpoint import CheckpointError
    from .pipeline import load
    from .probe import run

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run(load(args.model), args.out, timesteps=args.timesteps, count=args.count, per_class=args.per_class,
            steps=args.steps, every=args.every, seed=args.seed, trajectories=not args.no_trajectories)
    except (CheckpointError, ValueError, ImportError) as e:
        print(f"minidiff analyze probe: {e}", file=sys.stderr)
        return 2
    return 0


# -- analyze and bench -----------------------------------------------------------------------------

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


def _sampler_option_args(p: argparse.ArgumentParser):
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (ddim only; > 0 draws noise every step)")
    p.add_argument("--karras-sigmas", action="store_true", help="Karras et al. 2022 noise levels "
                   "(euler, heun, dpmpp_2m, unipc)")


def _classifier_arg(p: argparse.ArgumentParser):
    p.add_argument("--classifier", help="toy-metric classifier folder (default: DATASET-classifier beside the model)")


def _analyze_parser() -> argparse.ArgumentParser:
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
    _sampler_option_args(q)
    q.add_argument("--cost", default="output", choices=sorted(COSTS))
    q.add_argument("--out", help="where to write (default: MODEL/calibration.json)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing calibration")
    return p


def analyze_main(argv=None) -> int:
    """`minidiff analyze similarity|depth|switch|calibrate ...`"""
    args = _analyze_parser().parse_args(argv)
    try:
        pipe = _load(args)
        return {"similarity": _similarity_cmd, "depth": _depth_cmd, "switch": _switch_cmd,
                "calibrate": _calibrate_cmd}[args.command](pipe, args)
    except (CheckpointError, ValueError, FileExistsError, ImportError) as e:
        print(f"minidiff analyze {args.command}: {e}", file=sys.stderr)
        return 2


def _load(args):
    """The model named on the command line, after setting the thread count asked for."""
    import torch

    from .pipeline import load

    if args.threads:
        torch.set_num_threads(args.threads)
    return load(args.model)


def _labels_from(args, pipe, batch=None):
    batch = batch or args.batch
    if args.class_label is None:
        return None if pipe.unet.config.num_classes is None else pipe.default_labels(batch)
    return [args.class_label] * batch


def _record_from(args, pipe):
    start = time.perf_counter()
    record = analysis.record_features(pipe, steps=args.steps, sampler=args.sampler, layers=args.layers, pool=args.pool,
                             project=args.project or None, seed=args.seed, batch_size=args.batch,
                             class_labels=_labels_from(args, pipe), prompt=args.prompt,
                             guidance_scale=args.guidance_scale)
    print(f"recorded {len(record.features)} layers x {record.num_steps} steps x {args.batch} images "
          f"({record.nbytes / 2 ** 20:.0f} MiB) in {time.perf_counter() - start:.1f}s")
    return record


def _similarity_cmd(pipe, args) -> int:
    out = Path(args.out)
    record = _record_from(args, pipe)
    matrices = analysis.similarity_matrices(record)
    summary = analysis.summarize(matrices)
    roles = {name: analysis.layer_role(pipe.unet, name) for name in matrices}
    print(analysis.format_summary(summary, roles=roles))
    analysis.save_matrices(matrices, out / "similarity.npz")
    analysis.write_csv([{"layer": k, **v, "role": roles[k]} for k, v in summary.items()], out / "summary.csv")
    plots.plot_heatmaps(matrices, out / "heatmaps.png", title=f"{args.model}: {args.sampler}, {args.steps} steps")
    print(f"wrote {out / 'similarity.npz'}, {out / 'summary.csv'}, {out / 'heatmaps.png'}")
    return 0


def _depth_cmd(pipe, args) -> int:
    out = Path(args.out)
    record = _record_from(args, pipe)
    rows = analysis.depth_profile(analysis.similarity_matrices(record), pipe.unet, record.shapes)
    print(analysis.format_depth(rows))
    analysis.write_csv(rows, out / "depth.csv")
    plots.plot_depth(rows, out / "depth.png", title=f"{args.model}: feature change per step vs depth "
               f"({args.sampler}, {args.steps} steps)")
    print(f"wrote {out / 'depth.csv'}, {out / 'depth.png'}")
    return 0


def _switch_cmd(pipe, args) -> int:
    out = Path(args.out)
    text = pipe.unet.config.num_classes is None
    old, new = (args.old, args.new) if text else (int(args.old), int(args.new))
    classifier = None if text else metrics.toy_classifier(pipe, args.model, args.classifier)
    start = time.perf_counter()
    layers = args.layers or ["mid", analysis.cached_layer(pipe.unet, pipe.unet.num_branches // 2)]
    result = analysis.switch_experiment(pipe, old=old, new=new, steps=args.steps, sampler=args.sampler, at_steps=args.at,
                               batch_size=args.batch, seed=args.seed, layers=layers,
                               guidance_scale=args.guidance_scale, classifier=classifier)
    rows = result.rows
    columns = sorted({c for r in rows for c in r}, key=_column_order)
    print(format_rows(rows, [c for c in columns if not c.endswith("_final_cos_old")]))
    print(f"{len(rows)} runs in {time.perf_counter() - start:.1f}s")
    analysis.write_csv([{c: r.get(c) for c in columns} for r in rows], out / "switch.csv")
    plots.plot_switch(result, out / "switch.png", layers, title=f"{args.model}: switch {old} -> {new} at step k")
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
                            guidance_scale=args.guidance_scale, eta=args.eta, karras_sigmas=args.karras_sigmas)
    cache.save_calibrated(target, calibration)
    calls = calibration["model_calls"]
    print(f"measured {args.cost} costs of branches {branches} over {calls} model calls ({args.sampler}, "
          f"{args.steps} steps{', noise drawn from seed ' + str(args.seed) if calibration['draws_noise'] else ''}) in "
          f"{calibration['seconds']:.1f}s; wrote {target}")
    for n in (2, 3, 5, 10):
        if n < calls:
            print(f"  1:{n:<2} ({math.ceil(calls / n)} full steps): "
                  f"{cache.calibrated_full_steps(calibration, calls, n)}")
    return 0


def _bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minidiff bench", description="Benchmarks of cached sampling.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("frontier", help="speedup, MAC bound and quality of cache schedules at several budgets, "
                       "against fewer uncached steps at the same MACs")
    _model_args(q)
    _classifier_arg(q)
    _sampler_option_args(q)
    q.set_defaults(seed=1)
    q.add_argument("--samplers", help="several samplers, each NAME or NAME:STEPS (default steps: --steps), e.g. "
                   "ddim:50,dpmpp_2m:20,euler_a:30,plms:50; replaces --sampler. --eta/--karras-sigmas apply to "
                   "those that take them")
    q.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5, 10], help="N: ceil(steps/N) full steps")
    q.add_argument("--branches", type=int, nargs="+", default=[0, 1, 3])
    q.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    q.add_argument("--no-fewer-steps", dest="fewer_steps", action="store_false",
                   help="leave out the baseline rows (fewer uncached steps at each schedule's MACs)")
    q.add_argument("--repeats", type=int, default=2,
                   help="time every run this many times, alternating with the uncached run; keep the best "
                        "(0: no timing, quality only)")
    q.add_argument("--calibration-seed", type=int, default=0,
                   help="noise for calibrating when the model has no calibration.json for a branch")
    q.add_argument("--calibration-batch", type=int, help="images in that calibration run (default: --batch)")
    q.add_argument("--out", default="out/frontier")
    return p


FRONTIER_COLUMNS = ["schedule", "branch", "interval", "full_steps", "seconds", "uncached_seconds", "speedup",
                    "mac_speedup", "psnr", "accuracy", "steps"]


def bench_main(argv=None) -> int:
    """`minidiff bench frontier --model DIR ...` (or `bench adaptive ...`)"""
    if argv and argv[0] == "adaptive":
        return bench_adaptive_main(argv[1:])
    from .frontier import parse_samplers
    from .samplers import SAMPLER_OPTIONS, num_model_calls, sampler_options

    args = _bench_parser().parse_args(argv)
    try:
        if args.repeats < 0:
            raise ValueError(f"--repeats must be 0 (no timing) or more, got {args.repeats}")
        runs = parse_samplers(args.samplers, args.steps) if args.samplers else [(args.sampler, args.steps)]
        pipe = _load(args)
        labels = _labels_from(args, pipe)
        classifier = metrics.toy_classifier(pipe, args.model, args.classifier)
        branches = [b for b in args.branches if 0 <= b < pipe.unet.num_branches]
        if not branches:
            raise ValueError(f"none of the branches {args.branches} exists; this U-Net has branches "
                             f"0-{pipe.unet.num_branches - 1}")
        rows = []
        for sampler, steps in runs:
            given = dict(eta=args.eta, karras_sigmas=args.karras_sigmas)
            if args.samplers:  # several samplers: each takes the options that apply to it
                given = {k: v for k, v in given.items() if k in SAMPLER_OPTIONS[sampler]}
            options = sampler_options(sampler, **given)
            calibration = _frontier_calibration(pipe, args, sampler, steps, options, branches,
                                                num_model_calls(sampler, steps))
            print(f"{sampler}, {steps} steps ({num_model_calls(sampler, steps)} model calls): measuring")
            rows += frontier(pipe, steps=steps, sampler=sampler, intervals=args.intervals, branches=args.branches,
                             schedules=args.schedules, batch_size=args.batch, seed=args.seed, class_labels=labels,
                             prompt=args.prompt, guidance_scale=args.guidance_scale, classifier=classifier,
                             calibration=calibration, repeats=args.repeats, baseline=args.fewer_steps,
                             on_row=_progress, **options)
        out = Path(args.out)
        columns = (["sampler"] if args.samplers else []) + FRONTIER_COLUMNS
        print(format_rows(rows, columns))
        analysis.write_csv(rows, out / "frontier.csv")
        written = [out / "frontier.csv"]
        if args.fewer_steps:
            budgets = format_budgets(rows)
            print("\nPSNR (dB) against the uncached run at each budget:\n" + budgets)
            with atomic_path(out / "budgets.md") as tmp:
                tmp.write_text(budgets)
            written.append(out / "budgets.md")
        if not args.samplers:
            written.append(plots.plot_frontier(rows, out / "frontier.png", title=f"{args.model}: {args.sampler}, "
                                               f"{args.steps} steps, batch {args.batch}"))
        written.append(plots.plot_psnr_vs_macs(rows, out / "psnr_vs_macs.png",
                                               title=f"{args.model}: batch {args.batch}, seed {args.seed}"))
    except (CheckpointError, ValueError, ImportError) as e:
        print(f"minidiff bench {args.command}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _frontier_calibration(pipe, args, sampler, steps, options, branches, calls):
    """The model's calibration where it was measured for this sampler, options and step count at these
    branches; otherwise a fresh one on --calibration-seed (None when no calibrated schedule is asked)."""
    from .samplers import changed_options

    if "calibrated" not in args.schedules:
        return None
    calibration = pipe.calibration
    if calibration is not None and calibration.get("sampler", sampler) == sampler \
            and calibration.get("sampler_options", {}) == changed_options(options) \
            and calibration.get("model_calls") == calls \
            and all(str(b) in calibration.get("segments", {}) for b in branches):
        if calibration.get("seed") == args.seed:
            print(f"note: the calibration was measured on seed {args.seed}, the noise this bench uses; pass another "
                  "--seed for an honest comparison")
        return calibration
    batch = args.calibration_batch or args.batch
    print(f"the model's calibration does not cover {sampler} at {steps} steps on branches {branches}: calibrating "
          f"them on seed {args.calibration_seed}, {batch} images (the bench uses seed {args.seed})")
    start = time.perf_counter()
    calibration = calibrate(pipe, steps=steps, sampler=sampler, branch=branches[0], branches=branches,
                            batch_size=batch, seed=args.calibration_seed, class_labels=_labels_from(args, pipe, batch),
                            prompt=args.prompt, guidance_scale=args.guidance_scale, **options)
    print(f"  calibrated in {time.perf_counter() - start:.1f}s")
    return calibration


def _progress(row):
    """One line per measured frontier row, as it finishes."""
    where = "uncached" if row["schedule"] == "none" else f"{row['schedule']}, branch {row['branch']}, 1:{row['interval']}"
    quality = "" if row["psnr"] == float("inf") else f", PSNR {row['psnr']:.2f} dB"
    accuracy = "" if row["accuracy"] is None else f", toy accuracy {row['accuracy']:.3f}"
    speed = "" if row["speedup"] is None or row["schedule"] == "none" else f", measured {row['speedup']:.2f}x"
    print(f"  {row['sampler']}-{row['steps']} {where}: {row['full_steps']} full calls, MACs "
          f"{row['mac_fraction']:.1%}{quality}{accuracy}{speed}", flush=True)


# -- convert -------------------------------------------------------------------------------------

def convert_main(argv=None) -> int:
    """`minidiff convert ddpm|ldm|sd15 SRC DST ...`: the converters' own command lines."""
    import importlib

    argv = list(argv or [])
    formats = ("ddpm", "ldm", "sd15")
    if not argv or argv[0] not in formats:
        print(f"usage: minidiff convert {{{','.join(formats)}}} SRC DST ... (see --help of each)", file=sys.stderr)
        return 2
    return importlib.import_module(f"minidiff.convert.{argv[0]}").main(argv[1:]) or 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: minidiff {" + ",".join(COMMANDS) + "} ...\n")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<10} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    from .allocator import retain_freed_memory

    retain_freed_memory()  # an application may tune its own process: large activations stay mapped
    if command == "analyze" and rest[:1] == ["probe"]:
        return probe_main(rest[1:])
    status = COMMANDS[command][0](rest)
    return status if isinstance(status, int) else 0  # some mains return their results for callers


def bench_adaptive_main(argv=None) -> int:
    """`minidiff bench adaptive --model DIR ...`: reuse vs forecast, fixed vs adaptive, vs fewer steps."""
    import torch

    from . import forecast_bench
    from .pipeline import load

    p = argparse.ArgumentParser(prog="minidiff bench adaptive",
                                description="Cached sampling at equal MACs: DeepCache reuse, forecast orders, "
                                            "fixed and adaptive schedules, and fewer steps (PSNR vs uncached).")
    p.add_argument("--model", required=True)
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    p.add_argument("--branch", type=int, default=0)
    p.add_argument("--plot", help="also draw where the adaptive schedule refreshes (PNG path)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        pipe = load(args.model)
        rows = forecast_bench.compare(pipe, sampler=args.sampler, steps=args.steps, seeds=args.seeds,
                                      batch=args.batch, budgets=args.budgets, branch=args.branch)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_rows(rows, ["budget", "method", "mac_fraction", "psnr", "psnr_min", "seconds",
                             "distinct_schedules"]))
    if args.plot:
        budget = args.budgets[math.ceil(len(args.budgets) / 2) - 1]
        labels = (torch.arange(args.batch) % pipe.num_real_classes()).tolist()
        pipe.generate(steps=args.steps, sampler=args.sampler, seed=args.seeds[0], class_labels=labels,
                      cache_schedule="adaptive", cache_budget=budget, cache_branch=args.branch, progress=False)
        chosen = pipe.last_run.full_steps_per_sample  # before the uncached recording run replaces last_run
        similarity = forecast_bench.adjacent_similarity(pipe, sampler=args.sampler, steps=args.steps,
                                                        branch=args.branch, seed=args.seeds[0], batch=args.batch)
        path = forecast_bench.plot_refreshes(chosen, similarity, args.plot, f"{args.sampler} {args.steps}, "
                                             f"budget {budget}: adaptive full steps per sample")
        print(f"wrote {path}" if path else "matplotlib is not installed: no plot")
    return 0


COMMANDS = {
    "sample": (sample_main, "sample a model folder, optionally with caching"),
    "demo": (demo_main, "the main job: sample the shipped model with and without caching"),
    "train": (train_main, "train a toy model (also under torchrun -m minidiff.train)"),
    "analyze": (analyze_main, "feature similarity, depth profile, switch experiment, calibration"),
    "bench": (bench_main, "quality-vs-speed frontier of cache schedules"),
    "toy-metric": (toy_metric_main, "train the toy-metric classifier for a dataset"),
    "convert": (convert_main, "convert a public checkpoint (ddpm, ldm, sd15) to a minidiff folder"),
}


if __name__ == "__main__":
    sys.exit(main())
