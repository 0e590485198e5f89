"""`python convert/ldm.py ...`: the documented command; the converter is `minidiff.convert.ldm`
(also `python -m minidiff.convert.ldm` or `minidiff convert ldm`)."""
import sys

from minidiff.cli import guarded
from minidiff.convert.ldm import main

if __name__ == "__main__":
    sys.exit(guarded(main))  # any error a user can cause is one line, as in `minidiff convert ldm`
