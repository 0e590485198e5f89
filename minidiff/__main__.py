"""`python -m minidiff ...` is the `minidiff` command."""
import sys

from .cli import main

sys.exit(main())
