"""`python convert/sd15.py ...`: the documented command; the converter is `minidiff.convert.sd15`
(also `python -m minidiff.convert.sd15` or `minidiff convert sd15`)."""
import sys

from minidiff.cli import guarded
from minidiff.convert.sd15 import main

if __name__ == "__main__":
    sys.exit(guarded(main))  # any error a user can cause is one line, as in `minidiff convert sd15`
