"""What forecasting and the adaptive decision add to a shallow step, on full-size architectures.

    python benchmarks/forecast_overhead.py [--models sd15 church] [--size 32] [--repeats 20]

Random weights, the architectures of benchmarks/bound.py at a small latent/image size. For each
branch: the median time of a shallow step next to the median time of the work the adaptive
schedule adds to it (the order-2 forecast of the deep feature, the order-2 forecast of the cut
feature, its relative-L1 error, and the per-sample decision), and their ratio. Both are timed
alternately so machine noise hits both alike. The goal is under 2%.
"""
import argparse
import statistics
import time

import torch
from bound import MODELS

from minidiff.adaptive import AdaptiveUNet, relative_l1
from minidiff.unet import UNet


def primed(unet, x, cond, branch, samples):
    """An AdaptiveUNet with three full steps of history, as in the middle of a run."""
    model = AdaptiveUNet(unet, 50, branch, samples, forecast=2, threshold=1e9)
    for t in (981, 961, 941):
        state = unet.forward_cut(x, t, cond, branch=branch)
        _, cache = unet.forward_rest(state)
        rows = torch.arange(x.shape[0])
        model.deep.push(rows, t, cache.hidden, x.shape[0])
        model.cut.push(rows, t, state.skips[-1], x.shape[0])
    return model


def extra_work(model, skip, t, copies):
    """Everything a shallow step of the adaptive schedule does beyond forward_shallow."""
    hidden = model.deep.forecast(None, t)
    signal = relative_l1(skip, model.cut.forecast(None, t)).float().cpu()
    model.pacer.decide(signal.view(copies, model.samples).amax(0) > model.threshold)
    return hidden


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sd15", "church"], choices=sorted(MODELS))
    parser.add_argument("--branches", type=int, nargs="+", default=[0, 1, 3])
    parser.add_argument("--size", type=int, default=32, help="latent (SD) or image (church) side")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {args.repeats}, "
          f"size {args.size}")
    print(f"{'model':<8} {'branch':>6} {'batch':>5} {'shallow s':>10} {'extra s':>9} {'extra/shallow':>13}")
    for name in args.models:
        config, shape, cond_kind = MODELS[name]
        batch = shape[0]
        unet = UNet(config).eval()
        x = torch.randn(batch, shape[1], args.size, args.size)
        cond = {"text": torch.randn(batch, 77, 768), "class": torch.arange(batch), None: None}[cond_kind]
        copies = 2 if cond_kind == "text" else 1  # SD runs guided: two rows per sample
        with torch.inference_mode():
            for branch in args.branches:
                model = primed(unet, x, cond, branch, batch // copies)
                _, cache = unet.forward_full(x, 500, cond, branch=branch)
                skip = unet.forward_cut(x, 921, cond, branch=branch).skips[-1]
                shallow, extra = [], []
                for _ in range(args.repeats + 1):
                    start = time.perf_counter()
                    unet.forward_shallow(x, 921, cond, cache=cache)
                    shallow.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    extra_work(model, skip, 921.0, copies)
                    extra.append(time.perf_counter() - start)
                s, e = statistics.median(shallow[1:]), statistics.median(extra[1:])
                print(f"{name:<8} {branch:>6} {batch:>5} {s:>10.4f} {e:>9.5f} {e / s:>13.2%}", flush=True)
        del unet




if __name__ == "__main__":
    main()
