"""Does the scenes model draw what its prompt says? The acceptance table of issue 24.

    python benchmarks/scenes_following.py [--model weights/scenes] [--classifier weights/scenes-classifier]
        [--count 200] [--guidance default 1 3] [--intervals 1 3] [--csv out/scenes_following.csv]

Three prompt sets, one image each, DDIM 50: single objects of colour x shape pairs seen in training
(n = --count), single objects of the held-out pairs (n = count / 4) and two-object relations
(n = count / 2). The shipped classifier (weights/scenes-classifier) reads each sample; a sample
follows its prompt for an attribute when the classifier reads what the prompt says. Guidance
"default" is the model's own (config.json "guidance_scale"), 1 turns it off; interval 1 is
uncached, N > 1 DeepCache at that interval. Also the toy FID of
the seen-pairs samples against real scenes (not Inception FID).
"""
import argparse
import time
from pathlib import Path

import torch

from minidiff import load
from minidiff.analysis import write_csv
from minidiff.scenes_metric import load_scene_metric, pair_prompts, prompt_following, single_prompts

ROOT = Path(__file__).resolve().parents[1]
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=str(ROOT / "weights" / "scenes"))
parser.add_argument("--classifier", default=str(ROOT / "weights" / "scenes-classifier"))
parser.add_argument("--count", type=int, default=200)
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--guidance", nargs="+", default=["default"],
                    help="guidance scales; 'default' is the model's own, 1 is off (default: default)")
parser.add_argument("--intervals", type=int, nargs="+", default=[1])
parser.add_argument("--sets", nargs="+", default=["seen", "held-out", "pairs"])
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--csv", default="out/scenes_following.csv")
args = parser.parse_args()
try:
    guidances = [None if g == "default" else float(g) for g in args.guidance]
except ValueError:
    parser.error(f"--guidance takes numbers or 'default', got {args.guidance}")
torch.set_num_threads(args.threads)

pipe, metric = load(args.model), load_scene_metric(args.classifier)
sets = {"seen": single_prompts(args.count), "held-out": single_prompts(max(2, args.count // 4), held_out=True),
        "pairs": pair_prompts(max(2, args.count // 2))}
rows = []
print(f"{'set':9} {'n':>4} {'guid':>4} {'N':>2} {'colour':>6} {'shape':>6} {'place':>6} {'relat.':>6} {'all':>6} "
      f"{'toyFID':>7} {'s':>6}")
for name in args.sets:
    for guidance in guidances:
        for interval in args.intervals:
            start = time.perf_counter()
            scores = prompt_following(pipe, metric, sets[name], steps=args.steps, cache_interval=interval,
                                      guidance_scale=guidance)
            guidance = pipe.default_guidance if guidance is None else guidance
            seconds = time.perf_counter() - start
            row = {"set": name, "guidance": guidance, "interval": interval, **scores, "seconds": round(seconds, 1)}
            rows.append(row)
            print(f"{name:9} {scores['count']:4d} {guidance or 0:4g} {interval:2d} {scores['colour']:6.3f} "
                  f"{scores['shape']:6.3f} {scores['place']:6.3f} {scores['relation']:6.3f} {scores['all']:6.3f} "
                  f"{scores['toy_fid']:7.2f} {seconds:6.0f}", flush=True)
write_csv(rows, args.csv)
print(f"wrote {args.csv}")
