"""`minidiff explain`: write the offline page that teaches caching on a model (minidiff.explain)."""
from __future__ import annotations

import time

from .common import Parser, _threads_arg, check_output


def _explain_parser() -> Parser:
    p = Parser(prog="minidiff explain", description="Write an interactive page (open OUT/index.html from disk, no "
               "server, no network) that shows where a model's cache splits it, what that saves and what it "
               "costs, from runs precomputed over a grid of cache settings.")
    p.add_argument("--model", required=True, help="minidiff model folder")
    p.add_argument("--out", required=True, help="folder to write (index.html, data.js, explain.css, explain.js)")
    p.add_argument("--quick", action="store_true", help="a small grid (fewer steps, samples and settings), for tests")
    p.add_argument("--probes", type=int, default=0, metavar="N",
                   help="also fit linear probes on N real digits (digits models; about a minute for 300)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is an earlier explain page")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    _threads_arg(p)
    return p


def _explain(args) -> int:
    from ..writing import check_replaceable
    from ..explain import PAGE_KIND, build

    if args.probes < 0:
        raise ValueError(f"--probes takes a number of digits >= 0, got {args.probes}")
    out = check_output(args.out, "folder")
    if out.exists() and not args.overwrite and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists; pass --overwrite to replace an earlier page, or name a new folder")
    if args.overwrite:
        check_replaceable(out, PAGE_KIND)
    start = time.perf_counter()
    build(args.model, out, quick=args.quick, probes=args.probes, overwrite=True, progress=args.progress)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out / 'index.html'} ({size / 1e6:.1f} MB, {time.perf_counter() - start:.0f}s); open it in a browser")
    return 0
