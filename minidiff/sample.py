"""`python -m minidiff.sample` and `torchrun --nproc_per_node=K -m minidiff.sample`: the command
`minidiff sample-many` as a module, for torchrun. The work is in `minidiff.sample_many`."""
import sys

from .cli import sample_many_main

if __name__ == "__main__":
    sys.exit(sample_many_main())
