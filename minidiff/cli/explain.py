"""`minidiff explain`: write the offline page that teaches caching on a model (minidiff.explain)."""
from __future__ import annotations

import time
from pathlib import Path

from .edge import Parser, _load, _threads_arg, check_output


def _explain_parser() -> Parser:
    p = Parser(prog="minidiff explain", description="Write an interactive page (open OUT/index.html from disk, no "
               "server, no network) that shows where a model's cache splits it, what that saves and what it "
               "costs, from runs precomputed over a grid of cache settings.")
    p.add_argument("--model", required=True, help="minidiff model folder")
    p.add_argument("--out", required=True, help="folder to write (index.html, data.js, explain.css, explain.js)")
    p.add_argument("--quick", action="store_true", help="a small grid (fewer steps, samples and settings), for tests")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is an earlier explain page")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    _threads_arg(p)
    return p


def _explain(args) -> int:
    from ..checkpoint import check_replaceable
    from ..explain import FULL, PAGE_KIND, QUICK, gather, write_page

    out = check_output(args.out, "folder")
    if out.exists() and not args.overwrite and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists; pass --overwrite to replace an earlier page, or name a new folder")
    if args.overwrite:
        check_replaceable(out, PAGE_KIND)
    start = time.perf_counter()
    pipe = _load(args)
    data = gather(pipe, QUICK if args.quick else FULL, model_dir=args.model, name=Path(args.model).resolve().name,
                  progress=args.progress)
    write_page(data, out, overwrite=True)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out / 'index.html'} ({size / 1e6:.1f} MB, {time.perf_counter() - start:.0f}s); open it in a browser")
    return 0
