"""`python convert/ddpm.py ...`: the documented command; the converter is `minidiff.convert.ddpm`
(also `python -m minidiff.convert.ddpm` or `minidiff convert ddpm`)."""
import sys

from minidiff.cli import guarded
from minidiff.convert.ddpm import main

if __name__ == "__main__":
    sys.exit(guarded(main))  # any error a user can cause is one line, as in `minidiff convert ddpm`
