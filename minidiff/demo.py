"""`minidiff demo`: the shipped digits model sampled with and without DeepCache-style caching.

Same noise, same labels, DDIM 50 steps: once running the whole U-Net every step, once running it
in full only every N-th step and the shallow branch in between. Prints U-Net calls, wall time,
speedup, the MAC bound, the toy metrics of both (a small classifier's confidence and accuracy and a
Frechet distance in its feature space; not Inception FID) and the PSNR of cached vs uncached.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from .data import save_grid
from .pipeline import Pipeline, load
from .unet import mac_bound

DEFAULT_MODEL = "digits-cond"
DEFAULT_CLASSIFIER = "digits-classifier"


def find_weights(name: str) -> Path:
    """A folder under weights/, looked for beside the installed package, in the repository, then here."""
    package = Path(__file__).resolve().parent
    candidates = [package / "weights" / name, package.parent / "weights" / name, Path.cwd() / "weights" / name]
    for path in candidates:
        if (path / "config.json").exists():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"cannot find the shipped weights {name!r} (looked in {tried}); run from a minidiff "
                            "checkout or pass the folder with --model / --classifier")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]; inf when identical."""
    mse = float((a.float() - b.float()).square().mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def run(pipe: Pipeline, noise, labels, *, steps, interval=1, branch=0, schedule="uniform", guidance=None) -> dict:
    """One sampling run; returns the images and what it cost."""
    start = time.perf_counter()
    images = pipe.generate(steps=steps, noise=noise, class_labels=labels, cache_interval=interval,
                           cache_branch=branch, cache_schedule=schedule, guidance_scale=guidance,
                           batch_size=noise.shape[0], progress=False)
    stats = pipe.last_run
    return {"images": images, "seconds": time.perf_counter() - start, "full": stats.full_calls,
            "shallow": stats.shallow_calls, "steps": stats.steps}


def mac_speedup(full_calls: int, shallow_calls: int, macs: dict) -> float:
    """Compute-only speedup of a run over running every call in full (the MAC bound of its schedule)."""
    calls = full_calls + shallow_calls
    return calls * macs["full"] / (full_calls * macs["full"] + shallow_calls * macs["shallow"])


def table(rows: list) -> str:
    header = ["run", "steps", "full", "shallow", "wall s", "speedup", "MAC bound", "confident", "class acc",
              "toy FID", "PSNR dB"]
    lines = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def fmt(line):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))

    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(line) for line in lines[1:]])


def main(argv=None):
    p = argparse.ArgumentParser(prog="minidiff demo", description=__doc__.splitlines()[0])
    p.add_argument("--model", help=f"native model folder (default: the shipped weights/{DEFAULT_MODEL})")
    p.add_argument("--classifier", help=f"toy-metric classifier folder (default: weights/{DEFAULT_CLASSIFIER}); "
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
    if args.threads:
        torch.set_num_threads(args.threads)

    model_path = Path(args.model) if args.model else find_weights(DEFAULT_MODEL)
    pipe = load(model_path)
    metric = None
    if args.classifier != "none":
        from .toy_metric import load_metric

        metric = load_metric(args.classifier or find_weights(DEFAULT_CLASSIFIER))
    cfg = pipe.unet.config
    classes = 0 if not cfg.num_classes else cfg.num_classes - (pipe.null_class == cfg.num_classes - 1)
    count = args.per_class * max(classes, 1)
    labels = torch.arange(classes).repeat(args.per_class) if classes else None
    size = pipe.default_size
    noise = torch.randn(count, cfg.in_channels, size, size, generator=torch.Generator().manual_seed(args.seed))
    n_params = sum(param.numel() for param in pipe.unet.parameters())
    print(f"model {model_path} ({size}x{size}, {n_params / 1e6:.2f}M parameters), DDIM {args.steps} steps, "
          f"{count} samples, seed {args.seed}, {torch.get_num_threads()} CPU thread(s)")

    macs = pipe.unet.macs(noise[:1], 500, None if labels is None else labels[:1], branch=args.branch)
    print(f"U-Net MACs per image: full {macs['full'] / 1e6:.1f}M, shallow (branch {args.branch}) "
          f"{macs['shallow'] / 1e6:.1f}M ({macs['shallow'] / macs['full']:.3f} of full)")

    run(pipe, noise[:2], None if labels is None else labels[:2], steps=2, guidance=args.guidance)  # warm-up
    plans = [("uncached", 1, "uniform"), (f"N={args.interval} {args.schedule} b={args.branch}", args.interval,
                                          args.schedule)]
    if args.sweep:  # N=1 is the uncached run itself
        plans += [(f"N={n} {s} b={args.branch}", n, s) for s in ("uniform", "nonuniform") for n in (2, 3, 5, 10)
                  if (n, s) != (args.interval, args.schedule)]
    results: dict = {}
    for _ in range(args.repeats):  # interleaved, so a change in machine load hits every setting alike
        for name, interval, schedule in plans:
            r = run(pipe, noise, labels, steps=args.steps, interval=interval, branch=args.branch, schedule=schedule,
                    guidance=args.guidance)
            if name not in results or r["seconds"] < results[name]["seconds"]:
                results[name] = r
    base = results["uncached"]

    rows = []
    for name, r in results.items():
        scores = metric.score(r["images"], labels) if metric is not None else None
        rows.append([name, r["steps"], r["full"], r["shallow"], f"{r['seconds']:.2f}",
                     f"{base['seconds'] / r['seconds']:.2f}x", f"{mac_speedup(r['full'], r['shallow'], macs):.2f}x",
                     "-" if scores is None else f"{scores.confident:.3f}",
                     "-" if scores is None or scores.accuracy is None else f"{scores.accuracy:.3f}",
                     "-" if scores is None else f"{scores.toy_fid:.2f}",
                     "-" if r is base else f"{psnr(r['images'], base['images']):.1f}"])
    print(table(rows))
    if args.schedule == "uniform":
        print(f"MAC bound of uniform N={args.interval}: mac_bound({args.interval}, "
              f"{macs['shallow'] / macs['full']:.3f}) = {mac_bound(args.interval, macs['shallow'] / macs['full']):.2f}x "
              "(compute only; wall time also pays per-call overhead)")
    if metric is not None:
        print("confident: max softmax >= 0.9; class acc: vs the requested label; toy FID: Frechet distance in a "
              "small digit classifier's features, NOT Inception FID (biased upwards at small n)")

    out = Path(args.out)
    nrow = classes if 0 < classes <= 16 else 8
    cached = results[plans[1][0]]["images"]
    save_grid(base["images"], out / "demo_uncached.png", nrow=nrow)
    save_grid(cached, out / "demo_cached.png", nrow=nrow)
    save_grid(_side_by_side(base["images"], cached, nrow), out / "demo_side_by_side.png", nrow=2 * nrow)
    print(f"wrote {out / 'demo_uncached.png'}, {out / 'demo_cached.png'}, {out / 'demo_side_by_side.png'} "
          "(left half uncached, right half cached)")
    return rows


def _side_by_side(left: torch.Tensor, right: torch.Tensor, nrow: int) -> torch.Tensor:
    """Interleave rows of two grids so each printed row shows nrow uncached then nrow cached images."""
    rows = []
    for start in range(0, left.shape[0], nrow):
        rows += [left[start: start + nrow], right[start: start + nrow]]
    return torch.cat(rows)


if __name__ == "__main__":
    main()
