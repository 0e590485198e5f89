"""Where a U-Net's skip branch and main branch part, and what a shallow step costs at each cut.

    python examples/01_unet_split.py                    # the DDPM CIFAR-10 architecture
    python examples/01_unet_split.py --model weights/digits-cond

Every encoder layer produces a skip connection; the decoder consumes them in reverse. Caching at
branch b keeps only skips 0..b fresh: a shallow step runs the first b+1 encoder layers and the last
b+1 decoder layers and reuses the deeper ("main branch") decoder state from the last full step.
"""
import argparse

import torch

from minidiff import UNet, load
from minidiff.cache import mac_bound
from minidiff.convert.architectures import architecture

# The architecture of google/ddpm-cifar10-32 (Ho et al. 2020), random weights: MACs do not depend on them.
CIFAR10 = architecture("ddpm-cifar10")


def describe(layer) -> str:
    return " + ".join(type(block).__name__ for block in layer)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a minidiff model folder (default: the DDPM CIFAR-10 architecture)")
    parser.add_argument("--interval", type=int, default=5, help="N for the printed MAC bound")
    args = parser.parse_args()

    # Progress goes out at once: building the CIFAR-10 network and counting its MACs take up to a minute.
    print(f"loading {args.model} ..." if args.model else "building the DDPM CIFAR-10 architecture (random weights) ...",
          flush=True)
    unet = load(args.model, pack=False).denoiser if args.model else UNet(CIFAR10).eval()  # pack=False: plain layers
    cfg = unet.config
    size = cfg.sample_size or 32
    x = torch.zeros(1, cfg.in_channels, size, size)
    cond = torch.zeros(1, dtype=torch.long) if cfg.num_classes else None
    if cfg.context_dim and not cfg.num_classes:
        cond = torch.zeros(1, 77, cfg.context_dim)
    n = len(unet.output_blocks)
    print(f"U-Net: {sum(p.numel() for p in unet.parameters()):,} parameters, input {tuple(x.shape[1:])}, "
          f"{unet.num_branches} skip connections; counting a full and a shallow step's MACs at each\n", flush=True)
    print(f"{'skip':>4}  {'shape (C,H,W)':<16} {'produced by':<42} {'consumed by':<52} "
          f"{'shallow MACs':>13} {'ratio':>6} {'bound N=' + str(args.interval):>10}", flush=True)
    with torch.inference_mode():
        full = None
        for b, shape in enumerate(unet.skip_shapes(size, size)):
            macs = unet.macs(x, 500, cond, branch=b)
            full = macs["full"]
            ratio = macs["shallow"] / full
            print(f"{b:>4}  {str(shape):<16} {f'input_blocks[{b}] ' + describe(unet.input_blocks[b]):<42} "
                  f"{f'output_blocks[{n - 1 - b}] ' + describe(unet.output_blocks[n - 1 - b]):<52} "
                  f"{macs['shallow'] / 1e6:>11.1f} M {ratio:>6.3f} {mac_bound(1, args.interval - 1, ratio):>9.2f}x", flush=True)
    print(f"\nA full step costs {full / 1e9:.2f} GMACs. The middle block and everything between the deepest "
          "skips is the main branch: a shallow step at branch b never runs it.")


if __name__ == "__main__":
    main()
