"""The docs hold: every ```python block in the README, weights/README.md and docs/*.md runs, and every
`minidiff ...` command the README names exists.

A block runs from the repository root in a fresh namespace, compiled under its markdown file's name
and line numbers, so a failure points at the line of the page. A fence written ```python no-run marks
an illustrative fragment that is not meant to run; keep those rare.
"""
import contextlib
import io
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "weights" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python(?P<rest>.*)$")


def python_blocks(path: Path) -> list:
    """(first line number of the code, code, runnable) for each top-level ```python block of `path`."""
    blocks, lines, at = [], path.read_text().splitlines(), 0
    while at < len(lines):
        opened = FENCE.match(lines[at])
        at += 1
        if not opened:
            continue
        start = at
        while at < len(lines) and lines[at].strip() != "```":
            at += 1
        if at == len(lines):
            raise AssertionError(f"{path.relative_to(REPO)}:{start}: a ```python block is never closed")
        blocks.append((start + 1, "\n".join(lines[start:at]), "no-run" not in opened["rest"]))
        at += 1
    return blocks


BLOCKS = [(path, line, code) for path in PAGES for line, code, runnable in python_blocks(path) if runnable]


def test_the_pages_hold_python_blocks_and_few_are_exempt():
    exempt = [(p, line) for p in PAGES for line, _, runnable in python_blocks(p) if not runnable]
    assert len(BLOCKS) >= 6
    assert len(exempt) <= 1, f"more ```python no-run blocks than expected: {exempt}"


@pytest.mark.parametrize("path, line, code", BLOCKS,
                         ids=[f"{p.relative_to(REPO)}:{line}" for p, line, _ in BLOCKS])
def test_python_block_runs(path, line, code, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # Padding with blank lines keeps the page's own line numbers in any traceback.
    compiled = compile("\n" * (line - 1) + code, str(path.relative_to(REPO)), "exec")
    try:
        exec(compiled, {"__name__": "__doc_snippet__"})
    except Exception as e:
        where, tb = line, e.__traceback__
        while tb is not None:  # the deepest frame in the block: the page's line that failed
            if tb.tb_frame.f_code.co_filename == compiled.co_filename:
                where = tb.tb_lineno
            tb = tb.tb_next
        pytest.fail(f"{path.relative_to(REPO)}:{where}: the block starting at line {line} fails: "
                    f"{type(e).__name__}: {e}")


# -- the commands the README names ----------------------------------------------------------------

def _help(argv) -> str:
    from minidiff.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    assert code in (0, None), f"`minidiff {' '.join(argv)}` exited with {code}"
    return out.getvalue()


def readme_commands() -> set:
    """("sample",), ("analyze", "depth"), ... for every `minidiff WORD [WORD|WORD...]` in the README."""
    found = set()
    # In inline code (`minidiff ...`) or at the start of a line of a shell block; not prose ("minidiff with").
    for first, second in re.findall(r"(?:^|`)minidiff ([a-z][a-z-]+)(?: ([a-z0-9_]+(?:\|[a-z0-9_]+)*))?",
                                    (REPO / "README.md").read_text(), re.M):
        found.add((first,))
        if first in ("analyze", "bench", "convert") and second:
            found.update((first, name) for name in second.split("|"))
    return found


def test_every_command_the_readme_names_exists():
    commands = readme_commands()
    assert ("demo",) in commands and ("analyze", "calibrate") in commands
    top = _help(["--help"])
    for command in sorted(commands):
        assert re.search(rf"\b{command[0]}\b", top), f"README names `minidiff {command[0]}`, not in --help"
        if len(command) == 2 and command[0] != "convert":
            assert command[1] in _help([command[0], "--help"]).split("usage:")[-1], \
                f"README names `minidiff {' '.join(command)}`, not in `minidiff {command[0]} --help`"
        elif len(command) == 2:
            _help(["convert", command[1], "--help"])
