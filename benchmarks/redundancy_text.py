"""Do per-sample cache decisions matter more on a text model than on digits? Issue 25, item 3.

    python benchmarks/redundancy_text.py [--models weights/digits-cond weights/scenes] [--n 10]
        [--steps 50] [--budget 0.3] [--seeds 1 2 3] [--swaps 2] [--json out/redundancy_text.json]

For each model, a batch of varied conditions (digits: one per class; text: scenes prompts, singles
with places and two-object relations interleaved) from each seed's noise, DDIM, the adaptive cache
schedule at --budget of the uncached MACs (minidiff.decisions): (a) how far the samples' full-step
sets spread, (b) how much the cached deep feature changes per step and where, (c) the adaptive run
against the pacer alone (signal ignored) and the batch-mean schedule, at the same MACs, and (d) each
sample's own schedule against its neighbour's. PSNR is per image against the uncached run, pooled over
seeds. A text model runs at its stored default guidance unless --guidance says otherwise.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from minidiff import load
from minidiff.decisions import conditions, format_result, measure, merge, prepare
from minidiff.writing import atomic_path

ROOT = Path(__file__).resolve().parents[1]
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--models", nargs="+", default=[str(ROOT / "weights" / "digits-cond")])
parser.add_argument("--n", type=int, help="conditions per batch (default: every class; 10 prompts)")
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--budget", type=float, default=0.3, help="MACs per sample, a fraction of the uncached run's")
parser.add_argument("--threshold", type=float, help="adaptive signal threshold (default: the library's, 0.03)")
parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
parser.add_argument("--swaps", type=int, default=2, help="rotations of the schedules across the batch to run")
parser.add_argument("--guidance", type=float, help="guidance scale (default: each model's own)")
parser.add_argument("--prompt-seed", type=int, default=0, help="which scenes prompts a text model gets")
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--json", help="also write the numbers here")
args = parser.parse_args()
torch.set_num_threads(args.threads)
if args.swaps < 1 or (args.n is not None and args.n < 2):
    sys.exit("error: --swaps must be >= 1 and --n >= 2: the neighbour's schedule is the comparison of (d)")
for model in args.models:
    if not Path(model).is_dir():
        sys.exit(f"error: no model folder {model}")

summary = {}
for model in args.models:
    pipe = load(model)
    condition = conditions(pipe, args.n, seed=args.prompt_seed)
    start = time.perf_counter()
    results = [measure(prepare(pipe, condition, steps=args.steps, seed=seed, guidance_scale=args.guidance),
                       budget=args.budget, threshold=args.threshold, swaps=args.swaps) for seed in args.seeds]
    result = merge(results)
    seconds = time.perf_counter() - start
    print(format_result(result, f"== {model}: DDIM {args.steps}, budget {args.budget}, seeds {args.seeds} "
                                f"({seconds:.0f} s)"))
    print("conditions: " + "; ".join(map(str, result["conditions"])) + "\n", flush=True)
    psnr = {name: float(np.mean(run["psnr"])) for name, run in result["runs"].items()}
    own, other = np.array(result["runs"]["own (replayed)"]["psnr"]), np.array(result["runs"]["rotated 1"]["psnr"])
    differs = np.array(result["differs"])
    summary[model] = {"spread": result["spread"], "pacer_spread": result["pacer_spread"],
                      "change": result["change_summary"], "psnr": psnr,
                      "psnr_worst": {name: float(np.min(run["psnr"])) for name, run in result["runs"].items()},
                      "mac_fraction": {name: run["mac_fraction"] for name, run in result["runs"].items()},
                      "own_vs_neighbour": {"differ": int(differs.sum()), "of": len(differs),
                                           "own_wins": int((own[differs] > other[differs]).sum()),
                                           "gain_db": float((own[differs] - other[differs]).mean())
                                           if differs.any() else 0.0},
                      "conditions": result["conditions"], "allowed": result["allowed"], "seconds": seconds,
                      "full_steps_per_sample_first_seed": results[0]["runs"]["adaptive"]["full_steps_per_sample"]}

print("| model | Jaccard | distinct | change early / middle / late | between-sample std/mean | adaptive | "
      "pacer only | batch mean | neighbour's | own wins |")
print("|---|---|---|---|---|---|---|---|---|---|")
for model, s in summary.items():
    p, c, o = s["psnr"], s["change"], s["own_vs_neighbour"]
    mean = f"{p['batch mean']:.2f}" if "batch mean" in p else "-"
    print(f"| {model} | {s['spread']['mean_jaccard']:.3f} | {s['spread']['distinct']:.1f} | "
          f"{c['early']:.4f} / {c['middle']:.4f} / {c['late']:.4f} | {c['between_samples_cv']:.3f} | "
          f"{p['adaptive']:.2f} | {p['pacer only']:.2f} | {mean} | {p['rotated 1']:.2f} | "
          f"{o['own_wins']} of {o['differ']} ({o['gain_db']:+.2f} dB) |")
if args.json:
    with atomic_path(Path(args.json)) as tmp:
        tmp.write_text(json.dumps({"args": vars(args), "models": summary}, indent=1))
    print(f"wrote {args.json}")
