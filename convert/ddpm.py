"""`python convert/ddpm.py ...`: the documented command; the converter is `minidiff.convert.ddpm`
(also `python -m minidiff.convert.ddpm` or `minidiff convert ddpm`)."""
import sys

from minidiff.convert.ddpm import main

if __name__ == "__main__":
    sys.exit(main())
