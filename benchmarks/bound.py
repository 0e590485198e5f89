"""How close a shallow step's wall time comes to its share of the arithmetic.

    python benchmarks/bound.py [--models cifar10 church sd15 cin256] [--branches 0 1 3] [--repeats 5]

For each model family (full-size architecture, random weights) and branch: the shallow/full ratio
of wall time next to the shallow/full ratio of multiply-accumulates. Their quotient is the overhead
left to remove (1.0 = a shallow step costs exactly its arithmetic share). Full and shallow steps
alternate so machine noise hits both alike; medians are reported.
"""
import argparse
import statistics
import time

import torch

from minidiff.allocator import retain_freed_memory
from minidiff.convert.architectures import architecture
from minidiff.unet import UNet

MODELS = {
    "cifar10": (architecture("ddpm-cifar10"), (1, 3, 32, 32), None),
    "church": (architecture("ddpm-church"), (1, 3, 256, 256), None),
    "sd15": (architecture("sd15"), (2, 4, 64, 64), "text"),
    "cin256": (architecture("cin256-v2"), (2, 3, 64, 64), "class"),
}


def main():
    retain_freed_memory()  # as minidiff's CLI does; in vs_reference.py both implementations share it
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cifar10", "church", "sd15"], choices=sorted(MODELS))
    parser.add_argument("--branches", type=int, nargs="+", default=[0, 1, 3])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sd-latent", type=int, default=64, help="SD1.5 latent size (64 = 512 px)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {args.repeats}")
    print(f"{'model':<8} {'branch':>6} {'full s':>8} {'shallow s':>9} {'time ratio':>10} {'MAC ratio':>9} "
          f"{'time/MAC':>8}")
    for name in args.models:
        config, shape, cond_kind = MODELS[name]
        if name == "sd15":
            shape = (shape[0], shape[1], args.sd_latent, args.sd_latent)
        unet = UNet(config).eval()
        x = torch.randn(shape)
        cond = {"text": torch.randn(shape[0], 77, 768), "class": torch.arange(shape[0]), None: None}[cond_kind]
        with torch.inference_mode():
            for branch in args.branches:
                macs = unet.macs(x, 500, cond, branch=branch)
                _, cache = unet.forward_full(x, 500, cond, branch=branch)
                unet.forward_shallow(x, 500, cond, cache=cache)  # warm-up
                full, shallow = [], []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    _, cache = unet.forward_full(x, 500, cond, branch=branch)
                    full.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    unet.forward_shallow(x, 500, cond, cache=cache)
                    shallow.append(time.perf_counter() - start)
                f, s = statistics.median(full), statistics.median(shallow)
                mac_ratio = macs["shallow"] / macs["full"]
                print(f"{name:<8} {branch:>6} {f:>8.3f} {s:>9.4f} {s / f:>10.4f} {mac_ratio:>9.4f} "
                      f"{s / f / mac_ratio:>8.2f}", flush=True)
        del unet


if __name__ == "__main__":
    main()
