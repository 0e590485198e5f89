"""How similar are a U-Net's features at adjacent denoising steps? (DeepCache, Fig. 2b)

Samples the shipped digits model for 50 DDIM steps while recording every layer's output, then
prints, per layer, the mean cosine similarity between adjacent steps and the share of step pairs
above 0.95, and saves step x step heatmaps of a shallow skip, the bottleneck and the up-blocks.

    python examples/04_similarity_heatmap.py [--model weights/digits-cond] [--out out/04]
"""
import argparse
import time
from pathlib import Path

import torch

import minidiff
from minidiff import analysis, plots

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "weights" / "digits-cond"))
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--out", default="out/04")
args = parser.parse_args()
torch.set_num_threads(1)  # a small model on a CPU: one thread is fastest, and polite on a shared machine

pipe = minidiff.load(args.model)
start = time.perf_counter()
# One image of each class in turn; every layer's output at every step, kept on the CPU.
record = analysis.record_features(pipe, steps=args.steps, sampler="ddim", batch_size=args.batch, seed=0,
                                  class_labels=pipe.default_labels(args.batch))
matrices = analysis.similarity_matrices(record)  # {layer: (steps, steps) cosine similarity, batch mean}
print(f"recorded {len(matrices)} layers x {record.num_steps} steps in {time.perf_counter() - start:.1f}s\n")

roles = {name: analysis.layer_role(pipe.denoiser, name) for name in matrices}
print(analysis.format_summary(analysis.summarize(matrices), roles=roles))

# The panels DeepCache shows: shallow skips change throughout, deep features barely move.
n = len(pipe.denoiser.output_blocks)
shown = ["enc.0", "enc.1", f"enc.{n - 1}", "mid", "dec.0", f"dec.{n // 2}", f"dec.{n - 2}", f"dec.{n - 1}"]
out = Path(args.out)
analysis.save_matrices(matrices, out / "similarity.npz")
path = plots.plot_heatmaps(matrices, out / "heatmaps.png", shown,
                              title=f"step x step cosine similarity, {args.steps} DDIM steps")
print(f"\nsaved {path} and {out / 'similarity.npz'}")
