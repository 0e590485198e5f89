"""`minidiff plan`: measure the composed frontier on calibration seeds and store the plan in the model."""
from __future__ import annotations

import time
from pathlib import Path

from .common import Parser, _load, _threads_arg


def _plan_parser() -> Parser:
    from ..samplers import SAMPLERS  # in the parser, so the command line's usage errors need no torch

    p = Parser(prog="minidiff plan", description="Measure every (steps, cache schedule, forecast, branch) "
               "at equal MACs against the uncached run on calibration seeds, and store in MODEL/plan.json the "
               "best configuration for each budget (generate_within / --budget then use it).")
    p.add_argument("--model", required=True, help="minidiff model folder")
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default 1: none)")
    p.add_argument("--steps", type=int, default=50, help="the uncached reference run a budget is a fraction of")
    p.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13],
                   help="calibration noise (one image of each class per seed); check on other seeds")
    p.add_argument("--forecasts", help="forecasts the uniform schedules try, comma-separated: "
                   "0 (reuse), 1, 2 (Lagrange), foca, hermite, chebyshev, dicache (default 0,2; --quick: 0; the "
                   "adaptive schedule forecasts with 2, or 0 for noisy samplers)")
    p.add_argument("--quick", action="store_true", help="a handful of configurations (to try the command)")
    p.add_argument("--classifier", help="toy-metric classifier folder for the quality columns "
                   "(default: DATASET-classifier beside the model, if there is one)")
    p.add_argument("--overwrite", action="store_true", help="replace this sampler's and guidance's existing plan")
    _threads_arg(p)
    return p


QUICK = dict(fewer_steps=(5,), cached_steps=(), intervals=(2,), forecasts=(0,), deep_branches=(),
             adaptive_steps=(), adaptive_budgets=(0.6,))


def _metric(pipe, model, classifier):
    from ..metrics import load_metric

    if classifier is None:
        dataset = pipe.meta.get("training", {}).get("config", {}).get("dataset")
        candidate = Path(model).resolve().parent / f"{Path(str(dataset)).name}-classifier"
        if not isinstance(dataset, str) or not (candidate / "config.json").exists():
            return None
        classifier = candidate
    return load_metric(classifier)


def _plan(args) -> int:
    from .. import planner, samplers

    if args.steps < 2:
        raise ValueError(f"--steps must be at least 2, got {args.steps}")
    if args.guidance_scale is not None and args.guidance_scale <= 0:
        raise ValueError(f"--guidance-scale must be positive, got {args.guidance_scale}")
    forecasts = None if args.forecasts is None else planner.parse_forecasts(args.forecasts)
    target = planner.plan_path(args.model)
    if not Path(args.model).is_dir():
        raise ValueError(f"--model {args.model} is not a model folder")
    if not args.overwrite and planner.has_entry(target, args.sampler, args.guidance_scale, args.steps):
        raise FileExistsError(f"{target} already holds a plan for {args.sampler} at guidance "
                              f"{args.guidance_scale or 1:g} with {args.steps} steps; pass --overwrite to replace it")
    pipe = _load(args)
    metric = _metric(pipe, args.model, args.classifier)
    grid = planner.Grid(**QUICK) if args.quick else planner.Grid()
    if forecasts is not None:
        grid.forecasts = forecasts
    configs = planner.grid_configs(grid, args.steps, pipe.denoiser.num_branches,
                                   adaptive_forecast=0 if samplers.draws_noise(args.sampler) else 2)
    print(f"measuring {len(configs)} configurations ({args.sampler}, guidance {args.guidance_scale or 1:g}, "
          f"reference {args.steps} steps, seeds {args.seeds})")
    start = time.perf_counter()
    rows = planner.measure(pipe, configs, sampler=args.sampler, reference_steps=args.steps,
                           guidance_scale=args.guidance_scale, seeds=args.seeds, metric=metric, log=print)
    entry = planner.make_entry(rows, sampler=args.sampler, guidance_scale=args.guidance_scale,
                               reference_steps=args.steps, seeds=args.seeds, model=Path(args.model).name,
                               seconds=time.perf_counter() - start)
    planner.write_entry(target, entry, overwrite=args.overwrite)
    print(f"wrote {target} in {entry['seconds']:.0f}s; best configuration per budget:")
    for item in entry["budgets"]:
        row = None if item["config"] is None else rows[item["config"]]
        print(f"  {item['budget']:.2f}: " + ("nothing fits" if row is None else
              f"{planner.Config.from_dict(row).label()} (cost {row['cost']:.3f}, PSNR {row['psnr']:.2f})"))
    return 0
