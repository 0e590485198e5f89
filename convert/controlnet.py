"""`python convert/controlnet.py SRC DST`: the documented command; the converter is
`minidiff.convert.controlnet` (also `minidiff convert controlnet`)."""
import sys

from minidiff.cli import guarded
from minidiff.convert.controlnet import main

if __name__ == "__main__":
    sys.exit(guarded(main))  # any error a user can cause is one line, as in `minidiff convert controlnet`
