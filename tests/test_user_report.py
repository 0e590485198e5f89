"""Issue 22's new-user and hostile-tester findings, each done as the user did it: nothing a user owns
is lost, a mistake is one line naming the flag with exit status 1 before any work, and what the
commands print says what happened."""
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import minidiff
import minidiff.pipeline
from minidiff import cli

from conftest import REPO, tiny_pipeline

pytest.importorskip("PIL")

SHIPPED = REPO / "weights" / "digits-cond"
DIT = REPO / "weights" / "digits-dit"
PNG = b"\x89PNG\r\n\x1a\n"


def snapshot(folder) -> dict:
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def model(tmp_path):
    """A saved tiny class model (classes 0-2, null class 3)."""
    tiny_pipeline().save(tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def refuse_work(monkeypatch):
    """Fail the test if a command starts sampling, training, probing or calibrating."""
    def refuse(*args, **kwargs):
        raise AssertionError("the command started work before refusing its arguments")

    import minidiff.calibration
    import minidiff.demo
    import minidiff.forecast_bench
    import minidiff.probe
    import minidiff.sample_many
    import minidiff.trainer

    for module, name in ((minidiff.pipeline.Pipeline, "generate"), (minidiff.sample_many, "sample_many"),
                         (minidiff.trainer, "train"), (minidiff.probe, "run"),
                         (minidiff.calibration, "calibrate"), (minidiff.forecast_bench, "compare")):
        monkeypatch.setattr(module, name, refuse)


# -- D8: --overwrite replaces a model's own files only; save never replaces its source ---------------

def add_user_files(folder: Path):
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "grids").mkdir()
    (folder / "grids" / "a.png").write_bytes(PNG + b"grid")


def user_files(folder: Path) -> dict:
    return {k: v for k, v in snapshot(folder).items() if k in ("notes.txt", "grids/a.png")}


def test_pipeline_save_overwrite_keeps_user_files_and_drops_the_old_models(tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(SHIPPED, dst)  # a model with calibration.json
    add_user_files(dst)
    tiny_pipeline().save(dst, overwrite=True)  # a model without calibration replaces it
    assert user_files(dst) == {"notes.txt": b"my notes\n", "grids/a.png": PNG + b"grid"}
    assert not (dst / "calibration.json").exists()  # the old model's calibration went with it
    assert minidiff.load(dst).unet.config.sample_size == 8


def test_pipeline_save_refuses_its_own_source(tmp_path):
    src = tmp_path / "dc_copy"
    shutil.copytree(SHIPPED, src)
    (src / "NOTES.md").write_text("mine\n")
    before = snapshot(src)
    pipe = minidiff.load(src)
    for dst in (src, src / ".", src.parent):
        with pytest.raises(ValueError, match="source"):
            pipe.save(dst, overwrite=True)
    assert snapshot(src) == before


def test_converter_overwrite_keeps_user_files(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    from minidiff.convert.ddpm import main as convert_ddpm

    src = tmp_path / "src_ddpm"
    torch.manual_seed(0)
    diffusers.UNet2DModel(sample_size=8, block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8,
                          down_block_types=("DownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(src)
    (src / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}))
    dst = tmp_path / "conv1"
    assert convert_ddpm([str(src), str(dst)]) == 0
    add_user_files(dst)
    assert convert_ddpm([str(src), str(dst), "--overwrite"]) == 0
    assert user_files(dst) == {"notes.txt": b"my notes\n", "grids/a.png": PNG + b"grid"}
    assert minidiff.load(dst).unet.config.sample_size == 8
    capsys.readouterr()
    assert cli.main(["convert", "ddpm", str(src), "/proc/nonexistent/conv"]) == 1  # unwritable: refused up front
    assert "cannot be written" in one_line(capsys.readouterr().err)


# -- U2: an existing --out is replaced only with --overwrite, and only if it is an image -------------

def test_sample_refuses_an_existing_out_and_never_replaces_a_non_image(tmp_path, model, refuse_work, capsys):
    text = tmp_path / "afile.png"
    text.write_text("a user's text, named .png")
    image = tmp_path / "old.png"
    image.write_bytes(PNG + b"old")
    cases = [(["--out", str(text)], "is not an image"), (["--out", str(text), "--overwrite"], "is not an image"),
             (["--out", str(image)], "pass --overwrite")]
    for extra, fragment in cases:
        assert cli.main(["sample", "--model", str(model), *extra]) == 1
        assert fragment in one_line(capsys.readouterr().err)
    assert text.read_text() == "a user's text, named .png" and image.read_bytes() == PNG + b"old"


def test_demo_replaces_its_own_pictures_but_not_a_foreign_file(tmp_path, model, refuse_work, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "demo_uncached.png").write_bytes(PNG + b"last run")
    (out / "demo_cached.png").write_text("not a picture")
    assert cli.main(["demo", "--model", str(model), "--classifier", "none", "--out", str(out)]) == 1
    assert "demo_cached.png exists and is not an image" in one_line(capsys.readouterr().err)
    assert (out / "demo_cached.png").read_text() == "not a picture"


# -- D4, D11, U11: a damaged calibration.json is named, said once, and `info` reports it ---------------

def damage_nan(d):
    d["segments"]["0"][3][10] = float("nan")


def damage_negative(d):
    d["segments"]["0"] = [[-v for v in row] for row in d["segments"]["0"]]


def damage_schema(d):
    d["segments"] = "oops"


@pytest.mark.parametrize("damage", [damage_nan, damage_negative, damage_schema], ids=["nan", "negative", "schema"])
def test_a_damaged_calibration_is_refused_once_naming_the_file(tmp_path, damage, capsys):
    model = tmp_path / "copy"
    shutil.copytree(SHIPPED, model)
    path = model / "calibration.json"
    data = json.loads(path.read_text())
    damage(data)
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="calibration.json is damaged"):
        assert minidiff.load(model).calibration is None
    argv = ["sample", "--model", str(model), "--steps", "4", "--cache-interval", "2", "--cache-schedule", "calibrated",
            "--out", str(tmp_path / "x.png")]
    assert cli.main(argv) == 1
    line = one_line(capsys.readouterr().err)  # one line: no UserWarning with a source line before it
    assert str(path) in line and "delete it or rerun `minidiff analyze calibrate --overwrite`" in line
    assert not (tmp_path / "x.png").exists()
    if damage is damage_schema:  # `info` said "calibration: none" and then failed half-way
        assert cli.main(["info", "--model", str(model), "--threads", "1"]) == 0
        out, err = capsys.readouterr()
        assert "calibration: damaged" in out and "is damaged" in out and err == ""
        assert cli.main(["demo", "--model", str(model), "--schedule", "calibrated", "--classifier", "none",
                         "--out", str(tmp_path / "d"), "--threads", "1"]) == 1
        assert "delete it or rerun" in one_line(capsys.readouterr().err)


def test_an_intact_calibration_loads_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert minidiff.load(SHIPPED).calibration is not None


# -- D2, D5-D7, D9, D10, D12, D13, M6: refused before any work, one line naming the flag -------------

def refused_before_work(tmp_path: Path, model: Path) -> list:
    a_file = tmp_path / "afile"
    a_file.write_text("keep")
    m = ["--model", str(model)]
    png = ["--out", str(tmp_path / "b.png")]
    cases = [
        (["sample", *m, *png, "--scale", "0"], "--scale must be an int in [1, 64], got 0"),
        (["sample", *m, *png, "--scale", "-1"], "--scale must be"),
        (["sample", *m, *png, "--scale", "100000"], "--scale must be"),
        (["sample", *m, *png, "--scale", "64", "--batch-size", "4096"], "--scale must be lower"),
        (["sample", *m, *png, "--batch-size", "0"], "--batch-size must be an int in [1, 4096], got 0"),
        (["sample", *m, *png, "--batch-size", "1000000000"], "--batch-size must be"),
        (["sample", *m, *png, "--device", "banana"], "--device 'banana' is not a device"),
        (["sample", *m, *png, "--height", "100000"], "--height must be"),
        (["sample", *m, *png, "--steps", "10000"], "--steps must be an int in [1, 1000] (this model's noise levels)"),
        (["sample", *m, *png, "--steps", "100000000"], "--steps must be an int in [1, 1000] (this model's noise"),
        (["sample-many", *m, "-n", "100000000000", "--out", str(tmp_path / "sm")], "-n must be an int in"),
        (["sample-many", *m, "-n", "3", "--batch-size", "-1", "--out", str(tmp_path / "sm")], "--batch-size must be"),
        (["sample-many", *m, "-n", "3", "--out", str(a_file)], "must name a folder"),
        (["sample-many", *m, "-n", "3", "--class", "3", "--out", str(tmp_path / "sm")], "--class 3 is the null class"),
        (["sample-many", *m, "-n", "3", "--device", "banana", "--out", str(tmp_path / "sm")], "--device"),
        (["sample-many", *m, "-n", "3", "--height", "1", "--out", str(tmp_path / "sm")], "--height must be"),
        (["demo", *m, "--scale", "0", "--out", str(tmp_path / "d")], "--scale must be"),
        (["demo", *m, "--per-class", "100000000", "--out", str(tmp_path / "d")], "--per-class must be"),
        (["demo", *m, "--per-class", "2000", "--classifier", "none", "--out", str(tmp_path / "d")],
         "--per-class 2000 makes 6000 samples"),
        (["bench", "frontier", *m, "--batch", "-1", "--out", str(tmp_path / "fr")], "--batch must be"),
        (["bench", "adaptive", *m, "--budgets", "2"], "--budgets must be a number in (0, 1]"),
        (["analyze", "probe", *m, "--count", "3", "--out", str(tmp_path / "pr")], "--count must be an int >= 20"),
        (["analyze", "probe", *m, "--timesteps", "5000", "--out", str(tmp_path / "pr")], "--timesteps must be"),
        (["analyze", "probe", *m, "--timesteps", "-1", "--out", str(tmp_path / "pr")], "--timesteps must be"),
        (["train", "--image-size", "2", "--out-dir", str(tmp_path / "run")], "--image-size must be"),
        (["train", "--lr", "0", "--out-dir", str(tmp_path / "run")], "--lr and --grad-clip must be > 0"),
    ]
    if not torch.cuda.is_available():
        cases.append((["sample", *m, *png, "--device", "cuda"], "--device cuda: no CUDA GPU is available"))
    unwritable = Path("/proc/nonexistent")
    if Path("/proc/version").exists():  # /proc takes no new files, even for root
        cases += [
            (["sample", *m, "--out", "/proc/version.png"], "--out /proc/version.png cannot be written"),
            (["sample", *m, "--out", str(unwritable / "b.png")], f"--out {unwritable / 'b.png'} cannot be written"),
            (["demo", *m, "--out", str(unwritable)], "cannot be written"),
            (["analyze", "calibrate", *m, "--out", str(unwritable / "c.json")], "cannot be written"),
            (["train", "--out-dir", str(unwritable), "--steps", "2"], "--out-dir /proc/nonexistent cannot be"),
            (["sample-many", *m, "-n", "2", "--out", str(unwritable)], "cannot be written"),
        ]
    return cases


def test_bad_arguments_are_refused_before_any_work(tmp_path, model, refuse_work, capsys):
    for argv, fragment in refused_before_work(tmp_path, model):
        assert cli.main([*argv, "--threads", "1"]) == 1, argv
        line = one_line(capsys.readouterr().err)
        assert fragment in line, (argv, line)
        assert ".tmp" not in line  # the user's path, not a temporary's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "model"]  # nothing written, run.json included


def test_probe_of_an_unconditional_model_is_refused_before_work(tmp_path, refuse_work, capsys):
    pipe = tiny_pipeline()
    pipe.unet.config.num_classes, pipe.null_class = None, None
    torch.manual_seed(0)
    unconditional = minidiff.Pipeline(minidiff.UNet(pipe.unet.config), pipe.scheduler)
    unconditional.save(tmp_path / "uncond")
    assert cli.main(["analyze", "probe", "--model", str(tmp_path / "uncond"), "--out", str(tmp_path / "pr")]) == 1
    assert "--no-trajectories" in one_line(capsys.readouterr().err)


def test_threads_beyond_the_cpus_are_capped_with_a_warning(capsys):
    from minidiff.cli.common import usable_cpus

    before = torch.get_num_threads()
    try:
        assert cli.set_threads(1000) == usable_cpus()
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"warning: --threads 1000 is more than the {usable_cpus()} CPU(s) this process may use; "
                       f"using {usable_cpus()}"]
    finally:
        torch.set_num_threads(before)


def test_a_run_json_beside_no_samples_does_not_block_a_corrected_rerun(tmp_path, model, capsys):
    out = tmp_path / "sm"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"batch_size": -1}))  # left by a refused run of an older version
    argv = ["sample-many", "--model", str(model), "-n", "2", "--steps", "2", "--out", str(out), "--threads", "1"]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "run.json"]
    assert json.loads((out / "run.json").read_text())["batch_size"] == 1
    capsys.readouterr()
    assert cli.main([*argv, "--seed", "5"]) == 1  # samples made otherwise are still protected
    assert "holds samples made with other settings (seed differ)" in one_line(capsys.readouterr().err)


def test_sample_many_takes_the_cache_options_of_sample(tmp_path, model, capsys):
    """M5: one definition of the generate options; sample i of sample-many is `sample --seed i`."""
    options = ["--steps", "6", "--cache-schedule", "adaptive", "--cache-budget", "0.6", "--cache-forecast", "1",
               "--cache-threshold", "0.05", "--sampler", "euler", "--karras-sigmas", "--class", "1"]
    base = ["--model", str(model), "--threads", "1", *options]
    assert cli.main(["sample-many", *base, "-n", "2", "--out", str(tmp_path / "sm")]) == 0
    assert cli.main(["sample", *base, "--seed", "1", "--scale", "1", "--out", str(tmp_path / "one.png")]) == 0
    from PIL import Image

    with Image.open(tmp_path / "sm" / "000001.png") as many, Image.open(tmp_path / "one.png") as one:
        tile = one.crop((2, 2, 10, 10)).convert("RGB")  # the grid's single 8 px tile at scale 1
        assert list(many.convert("RGB").getdata()) == list(tile.getdata())
    recorded = json.loads((tmp_path / "sm" / "run.json").read_text())
    assert recorded["cache_schedule"] == "adaptive" and recorded["cache_budget"] == 0.6


# -- M4, M10, U1: output that says what happened ----------------------------------------------------------

def test_info_names_the_dit(capsys):
    assert cli.main(["info", "--model", str(DIT), "--threads", "1"]) == 0
    assert "parameters:  DiT 0.61M" in capsys.readouterr().out


def test_demo_on_the_dit(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["demo", "--model", str(DIT), "--classifier", "none", "--steps", "7", "--interval", "3", "--per-class",
            "1", "--repeats", "1", "--out", str(out), "--threads", "1"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "DiT MACs per image" in text and "U-Net" not in text
    row = next(line for line in text.splitlines() if line.startswith("N=3"))
    footer = next(line for line in text.splitlines() if line.startswith("MAC bound of"))
    assert "mac_bound(3, 4, 0.251)" in footer  # 7 steps at N=3: 3 full, 4 shallow, as the table counts
    assert footer.split(" = ")[1].split("x")[0] + "x" in row.split()
    assert cli.main(argv) == 0  # a second run replaces its own pictures


def test_adaptive_sample_reports_per_sample_full_steps_and_spent_macs(tmp_path, model, capsys):
    argv = ["sample", "--model", str(model), "--steps", "10", "--cache-schedule", "adaptive", "--cache-budget", "0.6",
            "--out", str(tmp_path / "a.png"), "--threads", "1"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    line = next(line for line in text.splitlines() if line.startswith("full steps per sample:"))
    assert " of 10" in line and "MACs spent 0." in line and "of uncached" in line
    assert "uniform N=1" not in text and "full," not in text  # no union count of full calls across samples


# -- U5-U9, U13, --version ------------------------------------------------------------------------------

def test_every_sample_option_says_what_it_does_and_its_default():
    parser = cli._sample_parser()
    for action in parser._actions:
        if action.dest in ("help", "model"):
            continue
        text = action.help or ""
        switch = action.nargs == 0
        assert text and (switch or "default" in text or action.required), (action.dest, text)


def test_bench_adaptive_prints_its_table_once(tmp_path, model, monkeypatch, capsys):
    import minidiff.forecast_bench

    rows = [{"budget": 0.5, "method": f"method {i}", "mac_fraction": 0.5, "psnr": 30.0 + i, "psnr_min": 29.0,
             "seconds": 1.0, "distinct_schedules": 1} for i in range(3)]

    def compare(pipe, log=print, **kwargs):
        for i in range(len(rows)):
            log(f"streamed row {i}")
        return rows

    monkeypatch.setattr(minidiff.forecast_bench, "compare", compare)
    assert cli.main(["bench", "adaptive", "--model", str(model), "--budgets", "0.5", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("method 1") == 1 and out.count("budget") == 1 and "streamed" not in out


def test_probe_calls_the_noise_control_noise():
    from minidiff.probe import probe_real

    pipe = tiny_pipeline()
    images = torch.rand(20, 3, 8, 8) * 2 - 1
    lines = []
    probe_real(pipe, images, torch.arange(20) % 3, [10], layers=["mid"], log=lines.append)
    assert [line.split(":")[0].strip() for line in lines] == ["t=10", "noise"]


def test_train_without_progress_ends_with_a_summary(tmp_path, capsys):
    tiny = ["--dataset", "digits", "--image-size", "8", "--model-channels", "8", "--channel-mult", "1,2",
            "--num-res-blocks", "1", "--attention-levels", "1", "--no-mid-attention", "--norm-groups", "4",
            "--batch-size", "4", "--steps", "2", "--sample-every", "0", "--no-progress", "--threads", "1"]
    pytest.importorskip("sklearn")
    assert cli.main(["train", *tiny, "--out-dir", str(tmp_path / "run")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"done: step 2, checkpoint in {tmp_path / 'run' / 'checkpoint'}"


def test_convert_ldm_without_config_suggests_it(tmp_path, capsys):
    state = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 3, 3, 3),
             "cond_stage_model.embedding.weight": torch.randn(5, 8),
             "first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3)}
    torch.save({"state_dict": state}, tmp_path / "small.ckpt")
    assert cli.main(["convert", "ldm", str(tmp_path / "small.ckpt"), str(tmp_path / "out")]) == 1
    line = one_line(capsys.readouterr().err)
    assert "--config model.yaml" in line and len(line) < 300
    assert not (tmp_path / "out").exists()


def test_version_answers_without_importing_torch():
    script = ("import sys; from minidiff.cli import main; assert main(['--version']) == 0; "
              "assert 'torch' not in sys.modules, 'torch imported'")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("minidiff ")


def test_calibration_damage_is_one_function_next_to_the_loader():
    from minidiff.cache import calibration_damage

    good = json.loads((SHIPPED / "calibration.json").read_text())
    assert calibration_damage(good) is None
    assert "not a finite number" in calibration_damage({**good, "segments": {"0": [[float("inf")]]}})
    assert "default branch" in calibration_damage({**good, "branch": 7})
    tiny_negative = {**good, "segments": {"0": [[-1e-7, 0.5], [0.25]]}, "branch": 0}
    assert calibration_damage(tiny_negative) is None  # 1 - cos(h, h) rounded below zero is a zero cost
