"""The command line's edge: every command answers a user's mistake with one line and an exit status,
before doing any work; conditioning defaults, `info`, `--version` and `python -m minidiff`."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minidiff.pipeline
from minidiff import cli
from minidiff.images import class_titles

from conftest import REPO, tiny_pipeline

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


@pytest.fixture
def model(tmp_path):
    """A saved tiny class model with three named classes (null class 3)."""
    pipe = tiny_pipeline()
    pipe.class_names = ["circle", "square", "star"]
    pipe.save(tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command gets as far as loading a model, a dataset or training."""
    def refuse(*args, **kwargs):
        raise AssertionError("the command started work before refusing its arguments")

    import minidiff.data
    import minidiff.demo
    import minidiff.metrics
    import minidiff.trainer

    for module, name in ((minidiff.pipeline, "load"), (minidiff.demo, "load"), (minidiff.trainer, "train"),
                         (minidiff.metrics, "train_metric"), (minidiff.data, "load_dataset")):
        monkeypatch.setattr(module, name, refuse)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# -- usage errors: exit 2, one line ------------------------------------------------------------------

USAGE = [
    ["sample", "--model", "M", "--steps", "many"],
    ["demo", "--interval", "x"],
    ["info"],
    ["train", "--channels", "2"],
    ["analyze", "similarity"],
    ["analyze", "nonsense"],
    ["bench", "frontier", "--model", "M", "--schedules", "sometimes"],
    ["toy-metric", "--epochs", "1"],
    ["sample", "--model", "M", "--sampler", "euler-ish"],
]


@pytest.mark.parametrize("argv", USAGE, ids=lambda a: " ".join(a[:2]))
def test_usage_errors_are_one_line_with_status_2(argv, no_work, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    assert f"see minidiff {argv[0]}" in one_line(capsys.readouterr().err)


def test_unknown_command_and_convert_without_format(capsys):
    assert cli.main(["smaple"]) == 2
    assert "unknown command 'smaple'" in one_line(capsys.readouterr().err)
    assert cli.main(["convert"]) == 2
    assert "ddpm,ldm,sd15" in one_line(capsys.readouterr().err)


# -- bad output paths: exit 1, one line, nothing done -----------------------------------------------

def bad_outputs(tmp_path: Path, model: Path) -> list:
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("keep me")
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep me too")
    m = ["--model", str(model)]
    return [
        (["sample", *m, "--out", str(tmp_path / "grid.gif")], "writes images as .png"),
        (["sample", *m, "--out", str(tmp_path)], "is a folder"),
        (["sample", *m, "--out", str(a_file / "grid.png")], "is a file, not a folder"),
        (["demo", *m, "--out", str(a_file)], "is a file"),
        (["train", "--out-dir", str(a_file), "--steps", "1"], "--out-dir"),
        (["toy-metric", "--out", str(full)], "not empty; pass --overwrite"),
        (["toy-metric", "--out", str(a_file)], "is a file"),
        (["analyze", "similarity", *m, "--out", str(a_file)], "is a file"),
        (["analyze", "depth", *m, "--out", str(a_file)], "is a file"),
        (["analyze", "switch", *m, "--from", "0", "--to", "1", "--out", str(a_file)], "is a file"),
        (["analyze", "calibrate", *m, "--out", str(tmp_path / "calibration.txt")], ".json"),
        (["analyze", "calibrate", *m, "--out", str(a_file.with_suffix(".json"))], None),
        (["bench", "frontier", *m, "--out", str(a_file)], "is a file"),
    ]


def test_bad_output_paths_are_refused_before_any_work(tmp_path, model, no_work, capsys):
    (tmp_path / "a_file.json").write_text("{}")  # an existing calibration target without --overwrite
    for argv, fragment in bad_outputs(tmp_path, model):
        assert cli.main(argv) == 1, argv
        line = one_line(capsys.readouterr().err)
        assert fragment is None or fragment in line, (argv, line)
    assert (tmp_path / "a_file.txt").read_text() == "keep me"
    assert (tmp_path / "full" / "notes.txt").read_text() == "keep me too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file.json", "a_file.txt", "full", "model"]


def test_missing_optional_package_is_refused_before_any_work(tmp_path, model, no_work, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "PIL" else find_spec(name, *a))
    assert cli.main(["sample", "--model", str(model), "--out", str(tmp_path / "x.png")]) == 1
    assert "pip install 'minidiff[image]'" in one_line(capsys.readouterr().err)


# -- user errors after parsing: exit 1, one line naming the flag ------------------------------------

def test_errors_name_flags_not_api_parameters(tmp_path, model, capsys):
    out = ["--out", str(tmp_path / "x.png")]
    m = ["--model", str(model)]
    cases = [
        (["sample", *m, *out, "--class", "3"], "--class 3 is the null class"),
        (["sample", *m, *out, "--class", "hexagon"], "(0: circle, 1: square, 2: star)"),
        (["sample", *m, *out, "--negative-prompt", "blurry"], "takes no prompt, so --negative-prompt"),
        (["sample", *m, *out, "--steps", "0"], "--steps must be an int"),
        (["sample", *m, *out, "--guidance-scale", "500"], "--guidance-scale must be"),
        (["sample", *m, *out, "--cache-branch", "40"], "--cache-branch must be"),
        (["sample", "--model", str(tmp_path / "nowhere"), *out], "does not exist"),
        (["demo", *m, "--classifier", "none", "--out", str(tmp_path / "d"), "--guidance", "500", "--steps", "2"],
         "--guidance must be"),
        (["demo", *m, "--classifier", "none", "--out", str(tmp_path / "d"), "--schedule", "calibrated"],
         "analyze calibrate"),
        (["info", "--model", str(tmp_path)], "not a minidiff model folder"),
        (["train", "--image-size", "0", "--out-dir", str(tmp_path / "run")], "--image-size must be"),
        (["train", "--resume", str(tmp_path / "nowhere")], "--resume"),
        (["analyze", "similarity", *m, "--layers", "nope", "--steps", "2", "--out", str(tmp_path / "s")],
         "unknown layer"),
        (["convert", "ddpm", str(tmp_path / "nowhere"), str(tmp_path / "dst")], "does not exist"),
    ]
    for argv, fragment in cases:
        assert cli.main(argv) == 1, argv
        line = one_line(capsys.readouterr().err)
        assert fragment in line, (argv, line)
        assert "class_labels" not in line and "guidance_scale" not in line and "cache_branch" not in line
    assert not (tmp_path / "d").exists() and not (tmp_path / "x.png").exists()


def test_cli_message_translates_only_this_commands_parameters():
    sample, demo = cli._sample_parser(), cli._demo_parser()
    error = ValueError("this model is class-conditional: pass class_labels; leave guidance_scale unset")
    assert cli.cli_message(error, sample) == "this model is class-conditional: pass --class; leave --guidance-scale unset"
    assert cli.cli_message(error, demo).endswith("leave --guidance unset")
    assert cli.cli_message(ValueError("cache_interval must be an int"), demo) == "--interval must be an int"
    assert cli.cli_message(ValueError("karras_sigmas=True does not apply"), sample) == "--karras-sigmas does not apply"
    kept = "train_state.json is missing; the full steps must be sorted"
    assert cli.cli_message(ValueError(kept), sample) == kept
    assert cli.cli_message(FileNotFoundError(2, "No such file or directory", "/x/y"), None) == \
        "/x/y: No such file or directory"


# -- conditioning defaults, class names, readable images --------------------------------------------

def test_sample_makes_one_image_per_class_by_default_and_takes_class_names(tmp_path, model, monkeypatch, capsys):
    seen = []
    generate = minidiff.pipeline.Pipeline.generate

    def recording(self, **kwargs):
        seen.append(kwargs["class_labels"])
        return generate(self, **kwargs)

    monkeypatch.setattr(minidiff.pipeline.Pipeline, "generate", recording)
    out = tmp_path / "grid.png"
    assert cli.main(["sample", "--model", str(model), "--steps", "2", "--out", str(out), "--scale", "3"]) == 0
    assert seen[-1] == [0, 1, 2]
    with Image.open(out) as img:  # three 8 px tiles enlarged 3x in one row, each with a caption under it
        assert img.width == 3 * (24 + 2) + 2 and img.height > 24 + 4
    assert cli.main(["sample", "--model", str(model), "--steps", "2", "--out", str(out), "--class", "square",
                     "--batch-size", "2", "--overwrite"]) == 0
    assert seen[-1] == [1, 1]
    with Image.open(out) as img:  # the default scale makes an 8 px tile 128 px
        assert img.width == 2 * (128 + 2) + 2
    assert cli.main(["sample", "--model", str(model), "--steps", "2", "--out", str(out), "--class", "2", "0",
                     "--overwrite"]) == 0
    assert seen[-1] == [2, 0]
    assert "wrote" in capsys.readouterr().out


def test_class_titles():
    assert class_titles(["0", "1", "circle"], [0, 2, 3]) == ["class 0", "2: circle", "class 3"]
    assert class_titles(None, [1]) == ["class 1"]


def test_demo_writes_one_labelled_comparison(tmp_path, model, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--model", str(model), "--classifier", "none", "--steps", "4", "--repeats", "1",
                     "--per-class", "1", "--out", str(out), "--scale", "4", "--threads", "1"]) == 0
    assert {p.name for p in out.iterdir()} == {"demo_side_by_side.png", "demo_uncached.png", "demo_cached.png"}
    with Image.open(out / "demo_uncached.png") as one, Image.open(out / "demo_side_by_side.png") as both:
        assert one.width == 3 * (32 + 2) + 2
        assert both.width > 2 * one.width and both.height > one.height  # two panels and their titles
    assert "uncached | cached N=5, branch 0" in capsys.readouterr().out


def test_info_says_what_a_model_takes(model, capsys):
    assert cli.main(["info", "--model", str(model)]) == 0
    text = capsys.readouterr().out
    assert "class-conditional pixel-space diffusion model" in text
    assert "3 (0: circle, 1: square, 2: star)" in text and "null class 3" in text
    assert "text:        no" in text and "branches:    0-" in text and "calibration: none" in text


# -- threads ----------------------------------------------------------------------------------------

def test_default_threads_backs_off_on_a_busy_machine(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (500.0, 500.0, 500.0))
    assert cli.default_threads() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    idle = cli.default_threads()
    assert 1 <= idle <= min(4, len(os.sched_getaffinity(0)))
    before = torch.get_num_threads()
    try:
        assert cli.set_threads(1) == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="--threads"):
        cli.set_threads(-1)


# -- the real process: no traceback, --version, python -m minidiff ---------------------------------

def run_minidiff(*argv):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "minidiff", *argv], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)


def test_python_dash_m_version_and_a_user_error_without_traceback(tmp_path):
    done = run_minidiff("--version")
    assert done.returncode == 0 and done.stdout.startswith("minidiff ") and done.stdout.split()[1][0].isdigit()
    done = run_minidiff("sample", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"error: model folder {tmp_path / 'nowhere'} does not exist"
    done = run_minidiff("--help")
    assert done.returncode == 0 and "info" in done.stdout


# -- examples need nothing from outside the repository -------------------------------------------------

def test_example_03_tiny_builds_its_own_tokenizer():
    import importlib.util

    spec = importlib.util.spec_from_file_location("example_03", REPO / "examples" / "03_sd15_deepcache.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    tokenizer = example.byte_tokenizer()
    ids = tokenizer(["a horse"])[0].tolist()
    words = ["a</w>", "h", "o", "r", "s", "e</w>"]  # no merges: every byte is its own token
    assert ids[:8] == [tokenizer.bos_id, *(tokenizer.vocab[w] for w in words), tokenizer.eos_id]
    assert len(ids) == 77 and max(ids) < len(tokenizer.vocab) == 514
    pipe = example.tiny_pipeline()
    image = pipe.generate(prompt="a horse", guidance_scale=7.5, sampler="plms", steps=2, height=64, width=64,
                          seed=0, progress=False)
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


@pytest.mark.parametrize("module, command", [("minidiff.train", "minidiff train"),
                                             ("minidiff.sample", "minidiff sample-many")])
def test_torchrun_entry_modules_are_the_commands(module, command, tmp_path):
    """`torchrun -m minidiff.train|sample` run the CLI commands; a bad flag is a usage error (2)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith(f"usage: {command} ")
    done = subprocess.run([sys.executable, "-m", module, "--no-such-flag"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and "error:" in done.stderr and "Traceback" not in done.stderr
