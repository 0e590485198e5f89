"""The `minidiff` command line: every front end (sample, demo, info, train, analyze, bench, toy-metric, explain,
convert, export).

Library modules do not parse arguments; each command here is a parser function and a run function
in `COMMANDS`. `run` gives every command the same edge (`common.py`): usage errors and user errors as
one line (`error: ...`, exit 2 and 1), flags named as the user typed them, the thread count set, and
output paths and optional packages checked before any work starts.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from .common import Parser, USER_ERRORS, check_output, cli_message, default_threads, one_line_warnings, require, set_threads
from .explain import _explain, _explain_parser
from .generate import _demo, _demo_parser, _info, _info_parser, _sample, _sample_many, _sample_many_parser, _sample_parser
from .measure import _analyze, _analyze_parser, _bench, _bench_parser
from .plan import _plan, _plan_parser
from .training import _toy_metric, _toy_metric_parser, _train, _train_parser

__all__ = ["main", "COMMANDS", "run", "check_output", "cli_message", "default_threads", "require", "set_threads",
           "sample_main", "sample_many_main", "demo_main", "info_main", "train_main", "toy_metric_main",
           "analyze_main", "bench_main", "convert_main", "export_main", "version"]


# -- convert -----------------------------------------------------------------------------------------

CONVERT_FORMATS = ("ddpm", "ldm", "sd15", "controlnet")


def convert_main(argv=None) -> int:
    """`minidiff convert ddpm|ldm|sd15|controlnet SRC DST ...`: the converters' own command lines, behind the same
    error edge as every command (and --threads)."""
    import importlib

    argv = list(argv or [])
    if not argv or argv[0] not in CONVERT_FORMATS:
        print(f"error: name the format first: minidiff convert {{{','.join(CONVERT_FORMATS)}}} SRC DST ... "
              "(see --help of each)", file=sys.stderr)
        return 2
    threads = None
    if "--threads" in argv[1:]:
        at = argv.index("--threads", 1)
        try:
            threads = int(argv[at + 1])
        except (IndexError, ValueError):
            print("error: --threads takes a whole number", file=sys.stderr)
            return 2
        del argv[at:at + 2]
    converter = importlib.import_module(f"minidiff.convert.{argv[0]}").main
    return guarded(lambda: (one_line_warnings(), set_threads(threads), converter(argv[1:]))[2] or 0)


def export_main(argv=None) -> int:
    """`minidiff export --format diffusers|original MODEL DST`, behind the same error edge as every command."""
    from ..export import main as export

    return guarded(lambda: export(list(argv or [])))


# -- the entry point ---------------------------------------------------------------------------------

@dataclass
class Command:
    parser: Optional[Callable[[], Parser]]  # None: the command parses its own arguments (convert)
    run: Callable
    help: str


def guarded(work: Callable, parser: Optional[argparse.ArgumentParser] = None):
    """`work()`, with a user error printed as one line `error: ...` (exit status 1) and Ctrl-C as
    exit status 130, never a traceback."""
    try:
        return work()
    except USER_ERRORS as e:
        print(f"error: {cli_message(e, parser)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        code = getattr(e, "exit_code", 130)  # training sets its own after saving a checkpoint
        if not str(e):
            print("interrupted", file=sys.stderr)
        return code


def run(name: str, argv=None):
    """Run command `name` on `argv`: parse (usage errors exit 2), set threads, then its work."""
    command = COMMANDS[name]
    argv = list(sys.argv[1:] if argv is None else argv)  # as argparse: a module's own command line
    if command.parser is None:
        return command.run(argv)
    parser = command.parser()
    args = parser.parse_args(argv)
    args.argv = argv

    def work():
        one_line_warnings()
        set_threads(getattr(args, "threads", None))
        return command.run(args)

    return guarded(work, parser)


def sample_main(argv=None):
    return run("sample", argv)


def demo_main(argv=None):
    return run("demo", argv)


def sample_many_main(argv=None):
    return run("sample-many", argv)


def info_main(argv=None):
    return run("info", argv)


def train_main(argv=None):
    """`minidiff train`; returns the training result (or an exit status when it failed)."""
    return run("train", argv)


def toy_metric_main(argv=None):
    return run("toy-metric", argv)


def analyze_main(argv=None):
    return run("analyze", argv)


def bench_main(argv=None):
    return run("bench", argv)


COMMANDS = {
    "demo": Command(_demo_parser, _demo, "the main job: sample the shipped model with and without caching"),
    "sample": Command(_sample_parser, _sample, "sample a model folder, optionally with caching"),
    "sample-many": Command(_sample_many_parser, _sample_many, "many samples as PNGs, resumable, shared across "
                           "torchrun processes"),
    "info": Command(_info_parser, _info, "what a model folder is and what it takes"),
    "train": Command(_train_parser, _train, "train a toy model (also under torchrun -m minidiff.train)"),
    "analyze": Command(_analyze_parser, _analyze, "feature similarity, depth profile, switch experiment, calibration, "
                       "linear probes"),
    "bench": Command(_bench_parser, _bench, "quality-vs-speed frontier of cache schedules; adaptive caching"),
    "plan": Command(_plan_parser, _plan, "measure the composed frontier; store the best run per MAC budget"),
    "toy-metric": Command(_toy_metric_parser, _toy_metric, "train the toy-metric classifier for a dataset"),
    "explain": Command(_explain_parser, _explain, "write an offline page that shows caching on a model"),
    "convert": Command(None, convert_main, "convert a public checkpoint (ddpm, ldm, sd15, controlnet) to a minidiff folder"),
    "export": Command(None, export_main, "write a model folder as a diffusers folder or an SD single file"),
}


def version() -> str:
    """The installed package's version, or the source tree's when it is not installed; imports no
    torch, so `minidiff --version` answers at once."""
    try:
        from importlib.metadata import PackageNotFoundError, version as installed
        return installed("minidiff")
    except (ImportError, PackageNotFoundError):
        from .. import __version__
        return __version__


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        print(f"minidiff {version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        stream = sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        print(f"usage: minidiff {{{','.join(COMMANDS)}}} ...   (minidiff COMMAND --help; minidiff --version)\n",
              file=stream)
        for name, command in COMMANDS.items():
            print(f"  {name:<10} {command.help}", file=stream)
        return 0 if argv else 2
    from ..allocator import retain_freed_memory

    retain_freed_memory()  # an application may tune its own process: large activations stay mapped
    status = run(argv[0], argv[1:])
    return status if isinstance(status, int) else 0  # some commands return their results for callers


if __name__ == "__main__":
    sys.exit(main())
