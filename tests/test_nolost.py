"""Nothing lost: each everyday slip of issue 16, done as a user does it, must leave every file as it
was; half precision runs on CPU; caches, timesteps and sizes that cannot work are refused early."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import minidiff
from minidiff import pipeline as pipeline_module
from minidiff.checkpoint import read_state_dict
from minidiff.writing import OUTPUT_MARKER, atomic_folder
from minidiff.pipeline import check_dtype
from minidiff.cli import train_main as main
from minidiff.unet import FeatureCache, UNet, UNetConfig

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "weights" / "digits-cond"


def snapshot(folder) -> dict:
    """Every file under `folder` (relative path -> bytes): equal snapshots mean nothing was lost."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run(*argv, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, env=env, timeout=300,
                          **kwargs)


# -- 1. --overwrite ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ddpm_source(tmp_path_factory) -> Path:
    """A small diffusers DDPM folder (flat google/ddpm-* layout), as a user would have downloaded."""
    diffusers = pytest.importorskip("diffusers")
    src = tmp_path_factory.mktemp("download") / "ddpm-tiny"
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(sample_size=8, block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8,
                                  down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    model.save_pretrained(src)
    (src / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler", "beta_schedule": "linear",
                                                           "num_train_timesteps": 1000}))
    (src / "README.md").write_text("notes about where this came from\n")
    return src


def convert(*argv):
    return run(REPO / "convert" / "ddpm.py", *argv)


def test_converting_onto_the_source_refuses_and_keeps_it(ddpm_source):
    before = snapshot(ddpm_source)
    for dst in (ddpm_source, ddpm_source / ".", ddpm_source / ".." / ddpm_source.name):
        done = convert(ddpm_source, dst, "--overwrite")
        assert done.returncode == 1 and "is the source itself" in done.stderr, done.stderr
    assert snapshot(ddpm_source) == before


def test_converting_into_the_source_refuses(ddpm_source):
    before = snapshot(ddpm_source)
    done = convert(ddpm_source, ddpm_source / "native", "--overwrite")
    assert done.returncode == 1 and "lies inside the source" in done.stderr, done.stderr
    assert snapshot(ddpm_source) == before


def test_a_parent_folder_holding_the_source_is_never_replaced(tmp_path, ddpm_source):
    models = tmp_path / "models"
    shutil.copytree(ddpm_source, models / "ddpm-tiny")
    (models / "notes.txt").write_text("which model was best")
    before = snapshot(models)
    done = convert(models / "ddpm-tiny", models, "--overwrite")
    assert done.returncode == 1 and "lies inside the destination" in done.stderr, done.stderr
    assert snapshot(models) == before


def test_a_parent_folder_of_other_things_is_never_replaced(tmp_path, ddpm_source):
    """`convert SRC models/ --overwrite`: models/ holds other models and notes, not this output."""
    models = tmp_path / "models"
    minidiff.load(SHIPPED).save(models / "digits")
    (models / "notes.txt").write_text("which model was best")
    before = snapshot(models)
    done = convert(ddpm_source, models, "--overwrite")
    assert done.returncode == 1, done.stdout
    assert "is not a minidiff model but holds 2 other entries (digits, notes.txt)" in done.stderr, done.stderr
    assert "nothing was touched" in done.stderr
    assert snapshot(models) == before


def test_overwrite_still_replaces_a_previous_model_or_an_empty_folder(tmp_path, ddpm_source):
    (tmp_path / "empty").mkdir()
    assert convert(ddpm_source, tmp_path / "empty", "--overwrite").returncode == 0
    minidiff.load(SHIPPED).save(tmp_path / "old")
    done = convert(ddpm_source, tmp_path / "old", "--overwrite")
    assert done.returncode == 0, done.stderr
    assert minidiff.load(tmp_path / "old").unet.config.in_channels == 3  # the DDPM, not the digits model


def test_pipeline_save_overwrite_follows_the_same_rule(tmp_path):
    pipe = minidiff.load(SHIPPED)
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "train.csv").write_text("1,2,3\n")
    before = snapshot(project)
    with pytest.raises(FileExistsError, match="is not a minidiff model but holds 1 other entries"):
        pipe.save(project, overwrite=True)
    assert snapshot(project) == before
    with pytest.raises(FileExistsError, match="is not a minidiff model but holds a minidiff-toy-classifier folder"):
        pipe.save(REPO / "weights" / "digits-classifier", overwrite=True)
    pipe.save(tmp_path / "model")
    pipe.save(tmp_path / "model", overwrite=True)  # a model replaces a model
    with pytest.raises(FileExistsError, match="minidiff training checkpoint"):  # outputs of another kind are refused
        with atomic_folder(tmp_path / "model", overwrite=True, kind="training checkpoint", marker=True):
            pass
    with atomic_folder(tmp_path / "run", kind="training checkpoint", marker=True) as tmp:
        (tmp / "step.txt").write_text("1")
    assert (tmp_path / "run" / OUTPUT_MARKER).read_text() == "training checkpoint\n"
    with atomic_folder(tmp_path / "run", overwrite=True, kind="training checkpoint", marker=True) as tmp:
        (tmp / "step.txt").write_text("2")
    assert (tmp_path / "run" / "step.txt").read_text() == "2"


# -- 2-4. training ------------------------------------------------------------------------------------

TINY = ["--dataset", "digits", "--image-size", "8", "--model-channels", "8", "--channel-mult", "1,2",
        "--num-res-blocks", "1", "--attention-levels", "1", "--no-mid-attention", "--norm-groups", "4",
        "--batch-size", "4", "--warmup-steps", "2", "--log-every", "1", "--ckpt-every", "2", "--sample-every", "0",
        "--no-progress"]


def step_of(run_dir) -> int:
    return json.loads((Path(run_dir) / "checkpoint" / "train_state.json").read_text())["step"]


def test_a_fresh_run_into_a_used_folder_refuses_and_overwrite_clears_only_training_outputs(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "a"
    main(TINY + ["--steps", "2", "--sample-every", "2", "--sample-steps", "2", "--out-dir", str(run_dir)])
    (run_dir / "notes.md").write_text("lr 5e-4 looked fine")
    (run_dir / "samples" / "favourite.png").write_bytes(b"mine")
    before = snapshot(run_dir)
    assert "samples/step_000002.png" in before and "loss.csv" in before
    capsys.readouterr()
    assert main(TINY + ["--steps", "4", "--out-dir", str(run_dir)]) == 1  # the CLI says it in one line
    assert re.match(r"error: .* already holds a training run \(checkpoint, loss.csv, loss.png, samples/, at step 2\); "
                    r"continue it with --resume", capsys.readouterr().err)
    assert snapshot(run_dir) == before

    main(TINY + ["--steps", "1", "--out-dir", str(run_dir), "--overwrite"])
    after = snapshot(run_dir)
    assert step_of(run_dir) == 1
    assert after["notes.md"] == before["notes.md"] and after["samples/favourite.png"] == b"mine"
    assert "samples/step_000002.png" not in after and "loss.png" not in after  # the old run's outputs went


def test_resume_continues_in_the_folder_it_was_given(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(TINY + ["--steps", "2", "--out-dir", "runs/a"])
    os.rename("runs/a", "runs/b")
    capsys.readouterr()
    assert main(["--resume", "runs/b", "--steps", "4"]).step == 4
    assert capsys.readouterr().out.splitlines()[0] == "writing to runs/b (resuming the run there)"
    assert not Path("runs/a").exists()
    assert step_of("runs/b") == 4
    assert json.loads(Path("runs/b/checkpoint/train_state.json").read_text())["config"]["out_dir"] == "runs/b"

    shutil.copytree("runs/b", "runs/c")
    original = snapshot("runs/b")
    main(["--resume", "runs/c/checkpoint", "--steps", "6"])  # the checkpoint folder itself names the run too
    assert step_of("runs/c") == 6
    assert snapshot("runs/b") == original  # resuming a copy never touches the original
    capsys.readouterr()
    assert main(["--resume", "runs/c", "--steps", "8", "--out-dir", "runs/elsewhere"]) == 1
    assert "resuming continues in runs/c, but --out-dir asks for runs/elsewhere" in capsys.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_run_saves_the_step_reached_and_resume_continues_exactly(tmp_path, sig):
    """Ctrl-C (or a scheduler's SIGTERM) between periodic saves: the checkpoint holds the step reached."""
    run_dir, straight = tmp_path / "run", tmp_path / "straight"
    no_periodic = TINY + ["--ckpt-every", "1000000", "--steps", "1000000"]
    script = "import sys; from minidiff.cli import train_main; train_main(sys.argv[1:])"
    proc = subprocess.Popen([sys.executable, "-c", script, *no_periodic, "--out-dir", str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    try:
        assert proc.stdout.readline() == f"writing to {run_dir} (a new run)\n"
        assert proc.stdout.readline().startswith("training ")
        time.sleep(1.0)  # some steps, and no periodic checkpoint
        assert not (run_dir / "checkpoint").exists()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    reached = step_of(run_dir)
    assert reached >= 1
    assert f"stopped at step {reached} of 1000000" in out and f"Continue with: minidiff train --resume {run_dir}" in out
    assert "Traceback" not in err

    resumed = main(["--resume", str(run_dir), "--steps", str(reached + 2)])
    main(no_periodic[:-2] + ["--steps", str(reached + 2), "--out-dir", str(straight)])
    assert resumed.step == step_of(straight) == reached + 2
    a = read_state_dict(run_dir / "checkpoint" / "train_state.safetensors")
    b = read_state_dict(straight / "checkpoint" / "train_state.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- 5. half precision ---------------------------------------------------------------------------------

def psnr(a, b) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


@pytest.mark.parametrize("dtype, max_error, min_psnr", [(torch.float16, 0.02, 55.0), (torch.bfloat16, 0.05, 45.0)])
def test_half_precision_generates_on_cpu_close_to_float32(dtype, max_error, min_psnr):
    """Measured on 10 digits, 10 DDIM steps: float16 max 0.0031 / PSNR 66.5 dB, bfloat16 0.012 / 55.1 dB."""
    settings = dict(steps=10, class_labels=list(range(10)), seed=0, progress=False)
    for extra in (dict(), dict(cache_interval=3, cache_branch=1), dict(guidance_scale=2.0)):
        reference = minidiff.load(SHIPPED).generate(**settings, **extra)
        half = minidiff.load(SHIPPED, dtype=dtype)
        assert half.dtype == dtype
        images = half.generate(**settings, **extra)
        assert images.dtype == torch.float32 and images.shape == reference.shape
        error = float((images - reference).abs().max())
        assert error < max_error and psnr(images, reference) > min_psnr, (extra, error, psnr(images, reference))
        assert error > 0  # it really ran in half precision


def test_a_dtype_that_cannot_run_is_refused_up_front(monkeypatch):
    with pytest.raises(ValueError, match="dtype must be torch.float32, torch.float16"):
        minidiff.load(SHIPPED, dtype=torch.int8)

    def no_half_kernels(*args, **kwargs):
        raise RuntimeError('"slow_conv2d_cpu" not implemented for \'Half\'')

    check_dtype.cache_clear()
    monkeypatch.setattr(torch.nn.functional, "conv2d", no_half_kernels)
    try:
        with pytest.raises(ValueError, match=r"torch.float16 does not run on cpu with this torch \(\"slow_conv2d_cpu\""
                                             r" not implemented for 'Half'\); use torch.float32 there"):
            minidiff.load(SHIPPED, dtype=torch.float16)
    finally:
        monkeypatch.undo()
        check_dtype.cache_clear()


# -- 8. damaged calibration, caches, timesteps, sizes -----------------------------------------------------

def test_a_damaged_calibration_warns_and_the_model_still_works(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(SHIPPED, model)
    (model / "calibration.json").write_text('{"format": "minidiff-calibration", "segm')
    with pytest.warns(UserWarning, match=r"calibration.json \(the calibrated cache schedule\) is unreadable.*"
                                         r"cache_schedule='calibrated' is unavailable"):
        pipe = minidiff.load(model)
    images = pipe.generate(steps=4, class_labels=[3], cache_interval=2, seed=0, progress=False)
    assert images.shape == (1, 1, 16, 16)
    with pytest.raises(ValueError, match="calibration.json .* is unreadable"):
        pipe.generate(steps=4, class_labels=[3], cache_interval=2, cache_schedule="calibrated", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert minidiff.load(SHIPPED).calibration is not None  # an intact one loads silently


@pytest.fixture(scope="module")
def unet() -> UNet:
    return minidiff.load(SHIPPED).unet


def test_shallow_steps_refuse_caches_that_cannot_belong_to_them(unet):
    x, labels = torch.randn(2, 1, 16, 16), torch.tensor([1, 2])
    with torch.no_grad():
        _, cache0 = unet.forward_full(x, 500, labels, branch=0)
        _, cache3 = unet.forward_full(x, 500, labels, branch=3)
        assert torch.equal(unet.forward_shallow(x, 400, labels, cache=cache3, branch=3),
                           unet.forward_shallow(x, 400, labels, cache=cache3))
    bad = {
        "branch asked": (dict(cache=cache0, branch=3), "taken at branch 0, this shallow step asks for branch 3"),
        "another branch's tensor": (dict(cache=FeatureCache(3, cache0.hidden)), "made for another branch"),
        "another size": (dict(cache=cache0, x=torch.randn(2, 1, 32, 32)), "needs (32, 32, 32)"),
        "another batch": (dict(cache=cache0, x=x[:1], cond=labels[:1]), "made for batch 2, this step has batch 1"),
        "another dtype": (dict(cache=FeatureCache(0, cache0.hidden.double())), "torch.float64 on cpu, the input "
                                                                                "torch.float32"),
        "not a tensor": (dict(cache=FeatureCache(0, [1, 2])), "must be a (B, C, H, W) tensor"),
    }
    for name, (kwargs, fragment) in bad.items():
        call = dict(x=x, t=400, cond=labels) | kwargs
        with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            unet.forward_shallow(call.pop("x"), call.pop("t"), call.pop("cond"), **call)


@pytest.mark.parametrize("t", [float("nan"), -1, 1000, 10 ** 6, torch.tensor([5, 1000]), torch.tensor(-3.0),
                               float("inf")])
def test_timesteps_outside_the_schedule_are_refused(unet, t):
    x, labels = torch.randn(2, 1, 16, 16), torch.tensor([1, 2])
    for call in (lambda: unet(x, t, labels), lambda: unet.forward_full(x, t, labels)):
        with pytest.raises(ValueError, match=r"lies outside the noise schedule \[0, 1000\)"):
            call()


def test_timesteps_inside_the_schedule_run(unet):
    x, labels = torch.randn(2, 1, 16, 16), torch.tensor([1, 2])
    with torch.no_grad():
        for t in (0, 999, 999.5, torch.tensor([0, 999])):
            assert torch.isfinite(unet(x, t, labels)).all()
    bare = UNet(UNetConfig(in_channels=1, out_channels=1, model_channels=8, channel_mult=(1,), attention_levels=(),
                           norm_groups=4))
    with torch.no_grad():
        bare(torch.randn(1, 1, 8, 8), 5000)  # no schedule known: only NaN and negatives are refused
        with pytest.raises(ValueError, match="outside the noise schedule"):
            bare(torch.randn(1, 1, 8, 8), -1)


def test_sizes_far_beyond_training_warn_with_memory_and_refuse_what_cannot_fit(monkeypatch):
    pipe = minidiff.load(SHIPPED)
    calls = []
    real_forward = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: calls.append(1) or real_forward(*a, **k))
    settings = dict(steps=1, class_labels=[1], seed=0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.generate(height=128, width=128, **settings)  # 8x the trained 16 px: no warning
    with pytest.warns(UserWarning, match=r"136x136 is over 8x the 16 px this model was trained at: expect about "
                                         r"0.03 GiB of activations per U-Net call"):
        pipe.generate(height=136, width=136, **settings)
    assert len(calls) == 2
    # 4096 px reached 14 GB within 20 s: estimated at 29.6 GiB (1 image), refused against 8 GiB free, before any step
    monkeypatch.setattr(pipeline_module, "available_memory", lambda device: 8 * 2 ** 30)
    with pytest.raises(ValueError, match=r"4096x4096 is over 8x the 16 px .* about 29.6 GiB for activations, more "
                                         r"than the 8.0 GiB free on cpu; lower height/width or batch_size"):
        pipe.generate(height=4096, width=4096, **settings)
    with pytest.raises(ValueError, match="about 59.2 GiB"):  # guidance runs two copies of the batch
        pipe.generate(height=4096, width=4096, guidance_scale=2.0, **settings)
    assert len(calls) == 2
