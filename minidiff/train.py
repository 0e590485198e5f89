"""`python -m minidiff.train` and `torchrun --nproc_per_node=K -m minidiff.train`: the command
`minidiff train` as a module, for torchrun. The training loop is in `minidiff.trainer`."""
import sys

from .cli import train_main

if __name__ == "__main__":
    status = train_main()
    sys.exit(status if isinstance(status, int) else 0)
