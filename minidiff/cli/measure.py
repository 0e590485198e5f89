"""Command lines of the measurement tools: `analyze` and `bench`."""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from .common import check_fractions, check_ints, check_output, _load, Parser, require, resolve_classes, _threads_arg

MAX_BATCH = 4096  # generate's limit on one batch
# Ranges every analyze and bench option shares, checked before the model is loaded (the model's own
# limits, such as --steps against its noise levels, right after).
LIMITS = {"--batch": ("batch", 1, MAX_BATCH), "--calibration-batch": ("calibration_batch", 1, MAX_BATCH),
          "--seed": ("seed", 0, 2 ** 64 - 1), "--seeds": ("seeds", 0, 2 ** 64 - 1),
          "--calibration-seed": ("calibration_seed", 0, 2 ** 64 - 1), "--branch": ("branch", 0, 10_000),
          "--branches": ("branches", 0, 10_000), "--intervals": ("intervals", 1, 10_000),
          "--repeats": ("repeats", 0, 100), "--pool": ("pool", 1, 16384), "--project": ("project", 0, 2 ** 31),
          "--at": ("at", 0, 10_000), "--per-class": ("per_class", 1, MAX_BATCH), "--every": ("every", 1, 10_000),
          "--cache-interval": ("cache_interval", 1, 10_000), "--cache-branch": ("cache_branch", 0, 10_000)}


def _check_args(args):
    check_ints(args, LIMITS)
    check_fractions(args, {"--budgets": ("budgets", 0, 1), "--cache-budget": ("cache_budget", 0, 1)})
    if hasattr(args, "default_batch"):
        _resolve_prompts(args)


def _resolve_prompts(args):
    """Several --prompt values are one batch, one image each (varied conditions in one run); a single
    prompt is repeated over --batch images."""
    prompts = args.prompt
    if prompts and len(prompts) > 1:
        if args.batch is not None and args.batch != len(prompts):
            raise ValueError(f"--batch {args.batch} does not match the {len(prompts)} prompts given (one image "
                             "each); drop --batch, or give one prompt to repeat")
        args.batch = len(prompts)
    else:
        args.batch = args.default_batch if args.batch is None else args.batch
        args.prompt = prompts[0] if prompts else None


def _check_steps(pipe, args):
    from ..checks import check_steps

    if getattr(args, "steps", None) is not None:
        check_steps(args.steps, pipe.scheduler.num_train_timesteps)


# -- analyze -----------------------------------------------------------------------------------------

def _model_args(p: argparse.ArgumentParser, batch: int = 8):
    from ..samplers import SAMPLERS

    p.add_argument("--model", required=True, help="minidiff model folder")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--batch", type=int, help=f"images per run (default {batch}; with several prompts, one each)")
    p.set_defaults(default_batch=batch)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class", dest="class_label", help="class number or name (default: one of each class)")
    p.add_argument("--prompt", nargs="+", help="prompt(s) for text-conditioned models: one is repeated over "
                   "--batch, several make the batch (one image each)")
    p.add_argument("--guidance-scale", type=float)
    _threads_arg(p)


def _sampler_option_args(p: argparse.ArgumentParser):
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (ddim only; > 0 draws noise every step)")
    p.add_argument("--karras-sigmas", action="store_true", help="Karras et al. 2022 noise levels "
                   "(euler, heun, dpmpp_2m, unipc)")


def _classifier_arg(p: argparse.ArgumentParser):
    p.add_argument("--classifier", help="toy-metric classifier folder (default: DATASET-classifier beside the model)")


def _add_recording(sub, name: str, text: str):
    q = sub.add_parser(name, help=text, description=text)
    _model_args(q)
    q.add_argument("--layers", nargs="+", help="layer names (enc.i, mid, dec.i); default all")
    q.add_argument("--pool", type=int, help="average-pool each map to POOL x POOL first")
    q.add_argument("--project", type=int, default=4096, help="hash features to at most this many dims "
                   "(bounds memory; 0 keeps them whole)")
    q.add_argument("--out", default=f"out/{name}", help="folder for the outputs")


def _add_switch(sub):
    from .generate import add_cache_arguments

    q = sub.add_parser("switch", help="change the class/prompt at step k and measure what follows")
    _model_args(q)
    q.add_argument("--classifier", help="classifier folder scoring the final images, or 'none' (default: the "
                   "model's DATASET-classifier; for prompts, weights/scenes-classifier where the prompts are "
                   "scenes captions)")
    add_cache_arguments(q)
    q.add_argument("--from", dest="old", required=True, help="class (number or name) or prompt before the switch")
    q.add_argument("--to", dest="new", required=True, help="class (number or name) or prompt after the switch")
    q.add_argument("--at", type=int, nargs="+", help="switch steps (default 0, S/10, 2S/10, ...)")
    q.add_argument("--layers", nargs="+", help="deep layers to follow (default mid and a middle cached feature)")
    q.add_argument("--out", default="out/switch", help="folder for switch.csv, switch.png and summary.txt")


def _add_calibrate(sub):
    from ..calibration import COSTS

    q = sub.add_parser("calibrate", help="measure cache reuse costs; write calibration.json into the model folder")
    _model_args(q)
    q.add_argument("--branch", type=int, default=0, help="the branch --cache-schedule calibrated uses by default")
    q.add_argument("--branches", type=int, nargs="+", help="all branches to measure (default 0 1 2 3)")
    _sampler_option_args(q)
    q.add_argument("--cost", default="output", choices=sorted(COSTS),
                   help="output: how far the final sample moves when a segment reuses the cache, measured by "
                        "rolling the sampler out (default); feature: the cached feature's own drift")
    q.add_argument("--out", help="where to write (default: MODEL/calibration.json, which the model then uses)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing calibration")


def _analyze_parser() -> Parser:
    p = Parser(prog="minidiff analyze", description="Measure how a model's features change "
               "between denoising steps (DeepCache's premise) and calibrate cache schedules.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_recording(sub, "similarity", "step x step cosine similarity of layer outputs (heatmaps, .npz, summary)")
    _add_recording(sub, "depth", "adjacent-step similarity against depth: skip 0 .. bottleneck .. back up")
    _add_switch(sub)
    _add_calibrate(sub)
    _add_probe(sub)
    return p


def _add_probe(sub):
    q = sub.add_parser("probe", help="linear probes of the class label (or a text model's scene attributes) at "
                       "every layer and timestep",
                       description="Linear probes from every recorded layer at every timestep, with the model "
                                   "conditioned on the null class (digits: the class label, on real digits noised "
                                   "to x_t and along sampling runs) or on the empty prompt (text models: colour, "
                                   "shape, place, relation and count of real scenes and of runs from grammar "
                                   "captions; minidiff.scene_probe).")
    q.add_argument("--model", required=True, help="class-conditional model with a null class, or a latent "
                   "text-to-image scenes model")
    q.add_argument("--out", default="out/probe", help="folder for probe.csv, heatmaps and summary.txt")
    q.add_argument("--timesteps", type=int, nargs="+", default=[999, 900, 800, 700, 600, 500, 400, 300, 200, 100,
                                                                  50, 0])
    q.add_argument("--count", type=int, help="real digits to use, class-balanced (default all 1,797); text "
                   "models: real scenes (default 1000)")
    q.add_argument("--per-class", type=int, help="sampling runs per class for trajectory probes (default 20; "
                   "class models only)")
    q.add_argument("--steps", type=int, default=50, help="DDIM steps of the trajectories")
    q.add_argument("--every", type=int, default=5, help="probe every N-th trajectory step")
    q.add_argument("--no-trajectories", action="store_true")
    q.add_argument("--seed", type=int, default=0)
    text = q.add_argument_group("text models only")
    text.add_argument("--prompts", type=int, help="sampling runs from grammar captions (default 200)")
    text.add_argument("--grid", type=int, help="pool each layer to GRID x GRID before probing (default 2; 1 is "
                      "the global mean, which loses place)")
    text.add_argument("--level", type=float, help="readable = from then on >= LEVEL x the attribute's best "
                      "accuracy (default 0.9)")
    text.add_argument("--guidance-scale", type=float, help="guidance of the trajectories (default: the model's)")
    _threads_arg(q)


TEXT_PROBE_OPTIONS = {"--prompts": "prompts", "--grid": "grid", "--level": "level",
                      "--guidance-scale": "guidance_scale"}


def _probe_checks(args):
    check_output(args.out, "folder")
    require("matplotlib", "the probe heatmaps")


def _probe_cmd(pipe, args) -> int:
    if pipe.text_encoder is not None:
        return _scene_probe_cmd(pipe, args)
    given = [flag for flag, dest in TEXT_PROBE_OPTIONS.items() if getattr(args, dest) is not None]
    if given:
        raise ValueError(f"{given[0]} applies only to text models; this model is class-conditional")
    from ..probe import check_probe, run

    require("sklearn", "the real digits")
    per_class = 20 if args.per_class is None else args.per_class
    check_probe(pipe, timesteps=args.timesteps, count=args.count, per_class=per_class,
                trajectories=not args.no_trajectories)
    run(pipe, args.out, timesteps=args.timesteps, count=args.count, per_class=per_class, steps=args.steps,
        every=args.every, seed=args.seed, trajectories=not args.no_trajectories)
    return 0


def _scene_probe_cmd(pipe, args) -> int:
    from ..scene_probe import check_scene_probe, run

    if args.per_class is not None:
        raise ValueError("--per-class applies only to class-conditional models; a text model's trajectories "
                         "take --prompts")
    options = dict(count=1000 if args.count is None else args.count,
                   prompts=200 if args.prompts is None else args.prompts,
                   grid=2 if args.grid is None else args.grid,
                   fraction=0.9 if args.level is None else args.level)
    check_scene_probe(pipe, timesteps=args.timesteps, steps=args.steps, every=args.every,
                      guidance_scale=args.guidance_scale, trajectories=not args.no_trajectories, **options)
    run(pipe, args.out, timesteps=args.timesteps, steps=args.steps, every=args.every, seed=args.seed,
        guidance_scale=args.guidance_scale, trajectories=not args.no_trajectories, **options)
    return 0


def _analyze(args) -> int:
    """`minidiff analyze similarity|depth|switch|calibrate|probe ...`"""
    checks = {"similarity": _plot_folder_checks, "depth": _plot_folder_checks, "switch": _plot_folder_checks,
              "calibrate": _calibrate_checks, "probe": _probe_checks}
    commands = {"similarity": _similarity_cmd, "depth": _depth_cmd, "switch": _switch_cmd,
                "calibrate": _calibrate_cmd, "probe": _probe_cmd}
    _check_args(args)
    checks[args.command](args)
    pipe = _load(args)
    _check_steps(pipe, args)
    return commands[args.command](pipe, args)


def _plot_folder_checks(args):
    check_output(args.out, "folder")
    require("matplotlib", "the analysis plots")


def _calibrate_checks(args):
    target = check_output(_calibration_target(args), "json")
    if target.exists() and not args.overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it, or --out FILE.json to write "
                              "elsewhere")


def _calibration_target(args) -> Path:
    return Path(args.out) if args.out else Path(args.model) / "calibration.json"


def _labels_from(args, pipe, batch=None):
    batch = batch or args.batch
    if args.class_label is None:
        return None if pipe.denoiser.config.num_classes is None else pipe.default_labels(batch)
    return resolve_classes(pipe, [args.class_label]) * batch


def _record_from(args, pipe):
    from .. import analysis

    start = time.perf_counter()
    record = analysis.record_features(pipe, steps=args.steps, sampler=args.sampler, layers=args.layers, pool=args.pool,
                                      project=args.project or None, seed=args.seed, batch_size=args.batch,
                                      class_labels=_labels_from(args, pipe), prompt=args.prompt,
                                      guidance_scale=args.guidance_scale)
    rows = next(iter(record.features.values())).shape[1]
    guided = f" ({rows} rows: unconditional and conditional, both in every mean)" if rows != args.batch else ""
    print(f"recorded {len(record.features)} layers x {record.num_steps} steps x {args.batch} images{guided} "
          f"({record.nbytes / 2 ** 20:.0f} MiB) in {time.perf_counter() - start:.1f}s")
    return record


def _similarity_cmd(pipe, args) -> int:
    from .. import analysis, plots

    out = Path(args.out)
    record = _record_from(args, pipe)
    matrices = analysis.similarity_matrices(record)
    summary = analysis.summarize(matrices)
    roles = {name: analysis.layer_role(pipe.denoiser, name) for name in matrices}
    print(analysis.format_summary(summary, roles=roles))
    analysis.save_matrices(matrices, out / "similarity.npz")
    analysis.write_csv([{"layer": k, **v, "role": roles[k]} for k, v in summary.items()], out / "summary.csv")
    plots.plot_heatmaps(matrices, out / "heatmaps.png", title=f"{args.model}: {args.sampler}, {args.steps} steps")
    print(f"wrote {out / 'similarity.npz'}, {out / 'summary.csv'}, {out / 'heatmaps.png'}")
    return 0


def _depth_cmd(pipe, args) -> int:
    from .. import analysis, plots

    out = Path(args.out)
    record = _record_from(args, pipe)
    rows = analysis.depth_profile(analysis.similarity_matrices(record), pipe.denoiser, record.shapes)
    print(analysis.format_depth(rows))
    analysis.write_csv(rows, out / "depth.csv")
    plots.plot_depth(rows, out / "depth.png", title=f"{args.model}: feature change per step vs depth "
                     f"({args.sampler}, {args.steps} steps)")
    print(f"wrote {out / 'depth.csv'}, {out / 'depth.png'}")
    return 0


def _switch_cmd(pipe, args) -> int:
    from .. import analysis, plots
    from ..frontier import format_rows
    from ..writing import atomic_path
    from .generate import given_cache_options

    out = Path(args.out)
    text = pipe.denoiser.config.num_classes is None
    old, new = (args.old, args.new) if text else (*resolve_classes(pipe, [args.old], "--from"),
                                                  *resolve_classes(pipe, [args.new], "--to"))
    classifier = _switch_classifier(pipe, args, text)
    cache = given_cache_options(args) or None
    start = time.perf_counter()
    layers = args.layers or ["mid", analysis.cached_layer(pipe.denoiser, pipe.denoiser.num_branches // 2)]
    result = analysis.switch_experiment(pipe, old=old, new=new, steps=args.steps, sampler=args.sampler,
                                        at_steps=args.at, batch_size=args.batch, seed=args.seed, layers=layers,
                                        guidance_scale=args.guidance_scale, classifier=classifier, cache=cache)
    rows = result.rows
    columns = sorted({c for r in rows for c in r}, key=_column_order)
    deep = [c for c in columns if c.startswith(tuple(f"{name}_" for name in layers))]
    print(format_rows(rows, [c for c in columns if c not in deep]))
    print(format_rows(rows, ["switch_at"] + [c for c in deep if not c.endswith("_final_cos_old")]))
    calls = max(r["switch_at"] for r in rows)
    summary = analysis.format_decided(rows, calls) or ["no classifier scored the final images"]
    print("\n".join(summary))
    print(f"{len(rows)} runs{' and as many cached' if cache else ''} in {time.perf_counter() - start:.1f}s")
    analysis.write_csv([{c: r.get(c) for c in columns} for r in rows], out / "switch.csv")
    with atomic_path(out / "summary.txt") as tmp:
        tmp.write_text("\n".join(summary) + "\n")
    plots.plot_switch(result, out / "switch.png", layers, title=f"{args.model}: switch {old} -> {new} at step k")
    print(f"wrote {out / 'switch.csv'}, {out / 'summary.txt'}, {out / 'switch.png'}")
    return 0


def _switch_classifier(pipe, args, text: bool):
    """What scores the final images: the digits' toy classifier, or for prompts the scenes metric
    (weights/scenes-classifier unless told, used only where both prompts are scenes captions)."""
    from .. import metrics

    if args.classifier == "none":
        return None
    if not text:
        return metrics.toy_classifier(pipe, args.model, args.classifier)
    from ..data import find_weights
    from ..scenes import parse_caption
    from ..scenes_metric import load_scene_metric

    folder = args.classifier
    if folder is None:
        try:
            folder = find_weights("scenes-classifier")
        except FileNotFoundError:
            print("no prompt-following columns: weights/scenes-classifier not found (pass --classifier DIR)")
            return None
    for flag, prompt in (("--from", args.old), ("--to", args.new)):
        try:
            parse_caption(prompt)
        except ValueError as e:
            if args.classifier is not None:
                raise ValueError(f"{flag}: {e}; the scenes classifier scores scenes captions only "
                                 "(--classifier none to go without)") from None
            print(f"no prompt-following columns: {flag} is not a scenes caption")
            return None
    return load_scene_metric(folder)


def _column_order(column: str):
    from ..scenes_metric import ATTRIBUTES

    first = ["switch_at", "step_k", "psnr_vs_old", "psnr_vs_new", "psnr_cached_vs_uncached", "reads_as_old",
             "reads_as_new", "reads_as_new_cached"]
    first += [f"{a}_{which}" for a in ATTRIBUTES for which in ("old", "new", "new_cached")]
    return (first.index(column), "") if column in first else (len(first), column)


def _calibrate_cmd(pipe, args) -> int:
    from .. import cache
    from ..calibration import calibrate

    target = _calibration_target(args)
    branches = args.branches or [b for b in (0, 1, 2, 3) if b < pipe.denoiser.num_branches]
    calibration = calibrate(pipe, steps=args.steps, sampler=args.sampler, branch=args.branch, branches=branches,
                            cost=args.cost, batch_size=args.batch, seed=args.seed,
                            class_labels=_labels_from(args, pipe), prompt=args.prompt,
                            guidance_scale=args.guidance_scale, eta=args.eta, karras_sigmas=args.karras_sigmas,
                            progress=True)
    cache.save_calibrated(target, calibration)
    calls = calibration["model_calls"]
    print(f"measured the {args.cost} cost of branches {branches} over {calls} model calls ({args.sampler}, "
          f"{args.steps} steps{', noise drawn from seed ' + str(args.seed) if calibration['draws_noise'] else ''}) "
          f"in {calibration['seconds']:.1f}s; wrote {target}")
    for n in (2, 3, 5, 10):
        if n < calls:
            print(f"  1:{n:<2} ({math.ceil(calls / n)} full steps): "
                  f"{cache.calibrated_full_steps(calibration, calls, n)}")
    return 0


# -- bench -------------------------------------------------------------------------------------------

def _add_frontier(sub):
    from ..frontier import SCHEDULES

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
    q.add_argument("--out", default="out/frontier", help="folder for frontier.csv, budgets.md and the plots")


def _add_adaptive(sub):
    from ..samplers import SAMPLERS

    q = sub.add_parser("adaptive", help="cached sampling at equal MACs: DeepCache reuse, forecast orders, fixed "
                       "and adaptive schedules, and fewer steps (PSNR vs uncached)")
    q.add_argument("--model", required=True)
    q.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    q.add_argument("--steps", type=int, default=50)
    q.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    q.add_argument("--batch", type=int, default=8)
    q.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    q.add_argument("--branch", type=int, default=0)
    q.add_argument("--plot", help="also draw where the adaptive schedule refreshes (PNG path)")
    _threads_arg(q)


def _bench_parser() -> Parser:
    p = Parser(prog="minidiff bench", description="Benchmarks of cached sampling.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_frontier(sub)
    _add_adaptive(sub)
    return p


FRONTIER_COLUMNS = ["schedule", "branch", "interval", "full_steps", "seconds", "uncached_seconds", "speedup",
                    "mac_speedup", "psnr", "accuracy", "steps"]


def _bench(args) -> int:
    """`minidiff bench frontier|adaptive --model DIR ...`"""
    return {"frontier": _frontier_cmd, "adaptive": _adaptive_cmd}[args.command](args)


def _frontier_cmd(args) -> int:
    """One frontier per sampler, each with its own calibration; rows are printed as they finish."""
    from .. import analysis, metrics, plots
    from ..writing import atomic_path
    from ..checks import check_steps
    from ..frontier import format_budgets, format_rows, frontier, parse_samplers
    from ..samplers import SAMPLER_OPTIONS, num_model_calls, sampler_options

    _check_args(args)
    check_output(args.out, "folder")
    require("matplotlib", "the frontier plots")
    runs = parse_samplers(args.samplers, args.steps) if args.samplers else [(args.sampler, args.steps)]
    pipe = _load(args)
    for _, steps in runs:
        check_steps(steps, pipe.scheduler.num_train_timesteps)
    labels = _labels_from(args, pipe)
    classifier = metrics.toy_classifier(pipe, args.model, args.classifier)
    branches = [b for b in args.branches if 0 <= b < pipe.denoiser.num_branches]
    if not branches:
        raise ValueError(f"none of the branches {args.branches} exists; this U-Net has branches "
                         f"0-{pipe.denoiser.num_branches - 1}")
    rows = []
    for sampler, steps in runs:
        given = dict(eta=args.eta, karras_sigmas=args.karras_sigmas)
        if args.samplers:  # several samplers: each takes the options that apply to it
            given = {k: v for k, v in given.items() if k in SAMPLER_OPTIONS[sampler]}
        options = sampler_options(sampler, **given)
        calibration = _frontier_calibration(pipe, args, sampler, steps, options, branches,
                                            num_model_calls(sampler, steps))
        print(f"{sampler}, {steps} steps ({num_model_calls(sampler, steps)} model calls): measuring", flush=True)
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
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _frontier_calibration(pipe, args, sampler, steps, options, branches, calls):
    """The model's calibration where it was measured for this sampler, options and step count at these
    branches; otherwise a fresh one on --calibration-seed (None when no calibrated schedule is asked)."""
    from ..calibration import calibrate
    from ..samplers import changed_options

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


def _adaptive_cmd(args) -> int:
    """Reuse vs forecast, fixed vs adaptive, against fewer steps (minidiff.forecast_bench)."""
    import torch

    from .. import forecast_bench
    from ..frontier import format_rows

    _check_args(args)
    if args.plot:
        check_output(args.plot, "image", "--plot")
        require("matplotlib", "the refresh plot")
    pipe = _load(args)
    _check_steps(pipe, args)
    measured = []

    def progress(_row_text):  # a count as rows finish; the aligned table follows once, at the end
        measured.append(1)
        print(f"\r  measured {len(measured)} rows", end="", file=sys.stderr, flush=True)

    rows = forecast_bench.compare(pipe, sampler=args.sampler, steps=args.steps, seeds=args.seeds,
                                  batch=args.batch, budgets=args.budgets, branch=args.branch, log=progress)
    print(file=sys.stderr)
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
        print(f"wrote {path}")
    return 0
