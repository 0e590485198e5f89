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
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the model's, "
                   "config.json guidance_scale; none where it names none)")
    p.add_argument("--steps", type=int, default=50, help="the uncached reference run a budget is a fraction of")
    p.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13],
                   help="calibration noise (one image of each class, or of each of 16 fixed scenes prompts "
                   "on a text model, per seed); check on other seeds")
    p.add_argument("--grid", choices=sorted(GRIDS), default="full",
                   help=f"which configurations: full ({FULL_COUNT} on a U-Net), small ({SMALL_COUNT}: for slow "
                   "models, e.g. the scenes model on one core) or quick (a handful, to try the command)")
    p.add_argument("--quick", action="store_true", help="the same as --grid quick")
    p.add_argument("--classifier", help="classifier folder for the quality columns: a toy-metric classifier, or "
                   "a scenes classifier for a text model (default: DATASET-classifier beside the model, if there "
                   "is one; 'none' for no quality columns)")
    p.add_argument("--forecasts", help="forecasts the uniform schedules try, comma-separated: "
                   "0 (reuse), 1, 2 (Lagrange), foca, hermite, chebyshev, dicache (default: the grid's, 0,2 full, 2 small, 0 quick; the "
                   "adaptive schedule forecasts with 2, or 0 for noisy samplers)")
    p.add_argument("--overwrite", action="store_true", help="replace this sampler's and guidance's existing plan")
    _threads_arg(p)
    return p


QUICK = dict(fewer_steps=(5,), cached_steps=(), intervals=(2,), forecasts=(0,), deep_branches=(),
             adaptive_steps=(), adaptive_budgets=(0.6,))
# The key budgets 0.15-0.5 with the forecast that won on digits (docs/planner.md): 15 configurations.
SMALL = dict(fewer_steps=(10, 15, 20, 25), cached_steps=(20, 30), intervals=(3, 5), forecasts=(2,), deep_branches=(),
             adaptive_steps=(30,), adaptive_budgets=(0.2, 0.3, 0.5), composed_adaptive_budgets=(0.5,))
GRIDS = {"full": {}, "small": SMALL, "quick": QUICK}
FULL_COUNT, SMALL_COUNT = 58, 15  # on a U-Net at 50 steps (tests/test_frontier_text.py checks them)


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
    pipe = _load(args)
    guidance = planner.resolved_guidance(pipe, args.guidance_scale)  # what the runs use, and the plan's key
    if not args.overwrite and planner.has_entry(target, args.sampler, guidance, args.steps):
        raise FileExistsError(f"{target} already holds a plan for {args.sampler} at guidance "
                              f"{guidance:g} with {args.steps} steps; pass --overwrite to replace it")
    metric = planner.quality_metric(pipe, args.model, args.classifier)
    grid = planner.Grid(**GRIDS["quick" if args.quick else args.grid])
    if forecasts is not None:
        grid.forecasts = forecasts
    configs = planner.grid_configs(grid, args.steps, pipe.denoiser.num_branches,
                                   adaptive_forecast=0 if samplers.draws_noise(args.sampler) else 2)
    per_seed = f"{len(planner.demo_prompts())} prompts" if planner.is_text(pipe) else \
        "classes" if pipe.denoiser.config.num_classes is not None else "1 image"
    print(f"measuring {len(configs)} configurations ({args.sampler}, guidance {guidance:g}, "
          f"reference {args.steps} steps, seeds {args.seeds} x {per_seed})")
    start = time.perf_counter()
    rows = planner.measure(pipe, configs, sampler=args.sampler, reference_steps=args.steps,
                           guidance_scale=guidance, seeds=args.seeds, metric=metric, log=print)
    entry = planner.make_entry(rows, sampler=args.sampler, guidance_scale=guidance,
                               reference_steps=args.steps, seeds=args.seeds, model=Path(args.model).name,
                               seconds=time.perf_counter() - start)
    planner.write_entry(target, entry, overwrite=args.overwrite)
    print(f"wrote {target} in {entry['seconds']:.0f}s; best configuration per budget:")
    for item in entry["budgets"]:
        row = None if item["config"] is None else rows[item["config"]]
        print(f"  {item['budget']:.2f}: " + ("nothing fits" if row is None else
              f"{planner.Config.from_dict(row).label()} (cost {row['cost']:.3f}, PSNR {row['psnr']:.2f}"
              + (f"; {planner.quality_text(row)})" if planner.quality_text(row) else ")")))
    return 0
