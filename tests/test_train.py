"""Trainer: exact resume, crash-safe checkpoints, config checks, and 2-process DDP equal to 1 process."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

import copy

from minidiff import packing as packing_module
from minidiff import trainer as train_module
from minidiff.checkpoint import CheckpointError, read_state_dict
from minidiff.pipeline import Pipeline, load
from minidiff.cli import train_main as main
from minidiff.trainer import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


def tiny(out_dir, **overrides) -> TrainConfig:
    """8x8 digits, a two-level 8-channel U-Net: a step takes milliseconds."""
    settings = dict(dataset="digits", image_size=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                    attention_levels=(1,), mid_attention=False, norm_groups=4, batch_size=8, steps=4,
                    warmup_steps=2, log_every=1, ckpt_every=2, sample_every=0, progress=False,
                    out_dir=str(out_dir))
    settings.update(overrides)
    return TrainConfig(**settings)


def state(out_dir) -> dict:
    return read_state_dict(Path(out_dir) / "checkpoint" / "train_state.safetensors")


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ after resume: {different[:5]}"


def test_resume_continues_bit_for_bit(tmp_path):
    straight = train(tiny(tmp_path / "a", steps=4))
    train(tiny(tmp_path / "b", steps=2))
    resumed = train(tiny(tmp_path / "b", steps=4), resume=tmp_path / "b")
    assert resumed.step == straight.step == 4
    assert_same_state(state(tmp_path / "a"), state(tmp_path / "b"))  # weights, Adam moments, every RNG
    ema_a = load(tmp_path / "a" / "checkpoint" / "model").unet.state_dict()
    ema_b = load(tmp_path / "b" / "checkpoint" / "model").unet.state_dict()
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert [row[1] for row in straight.losses] == [row[1] for row in resumed.losses]


@pytest.mark.parametrize("packing", ["available", "unavailable"])
def test_training_continues_across_sample_grids_and_resumes_bit_for_bit(tmp_path, monkeypatch, packing):
    """Grids at steps 2, 4 and 6 sample the live EMA model; each later EMA update must still work, and a
    run stopped at step 3 (after one grid) and resumed equals the straight run exactly."""
    if packing == "unavailable":
        monkeypatch.setattr(packing_module, "available", lambda *args, **kwargs: False)
    grids = dict(sample_every=2, sample_steps=2, ckpt_every=3)
    straight = train(tiny(tmp_path / "a", steps=6, **grids))
    train(tiny(tmp_path / "b", steps=3, **grids))
    resumed = train(tiny(tmp_path / "b", steps=6, **grids), resume=tmp_path / "b")
    assert straight.step == resumed.step == 6
    grids_written = {run: sorted(p.name for p in (tmp_path / run / "samples").glob("*.png")) for run in "ab"}
    assert grids_written["a"] == ["step_000002.png", "step_000004.png", "step_000006.png"]
    assert grids_written["b"] == ["step_000002.png", "step_000003.png", "step_000004.png", "step_000006.png"]
    assert_same_state(state(tmp_path / "a"), state(tmp_path / "b"))
    assert packing_module.packed_layers(straight.pipeline.unet) == 0  # the EMA is never packed
    assert [row[1] for row in straight.losses] == [row[1] for row in resumed.losses]


@pytest.mark.parametrize("compiled", [False, True])
def test_sampling_a_model_still_in_training_sees_each_ema_update(tmp_path, compiled):
    """The trainer's pipeline samples its live EMA between updates, eager or through compiled paths:
    after an in-place update the next sample uses the new weights, and equals a fresh model's."""
    result = train(tiny(tmp_path, steps=2, sample_every=2, sample_steps=2))
    pipe, model = result.pipeline, result.model
    if compiled:
        pipe.unet.compile_paths(backend="eager", pack=False)
    args = dict(steps=3, batch_size=2, class_labels=[1, 2], seed=0, output="latent", progress=False)
    before = pipe.generate(**args)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    train_module._update_ema(pipe.unet, model, 0.5)
    after = pipe.generate(**args, cache_interval=2)
    fresh = copy.deepcopy(pipe.unet)
    fresh.__dict__.pop("_full", None), fresh.__dict__.pop("_shallow", None)  # the eager paths
    expected = Pipeline(fresh, pipe.scheduler, null_class=pipe.null_class, pack=False).generate(**args,
                                                                                                cache_interval=2)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-5)


def test_cli_resume_takes_saved_config_and_extends_steps(tmp_path):
    train(tiny(tmp_path / "run", steps=2))
    result = main(["--resume", str(tmp_path / "run"), "--steps", "3", "--no-progress"])
    assert result.step == 3
    meta = json.loads((tmp_path / "run" / "checkpoint" / "train_state.json").read_text())
    assert meta["step"] == 3 and meta["config"]["model_channels"] == 8


def test_checkpoint_is_a_loadable_pipeline_with_null_class(tmp_path):
    train(tiny(tmp_path, steps=2, sample_every=2, sample_steps=2))
    assert (tmp_path / "loss.png").exists()
    pipe = load(tmp_path / "checkpoint" / "model")
    assert pipe.unet.config.num_classes == 11 and pipe.null_class == 10
    assert pipe.class_names == [str(d) for d in range(10)]
    images = pipe.generate(steps=2, batch_size=2, class_labels=[3, 4], guidance_scale=2.0, seed=0, progress=False)
    assert images.shape == (2, 1, 8, 8)
    assert (tmp_path / "samples" / "step_000002.png").exists()
    assert (tmp_path / "loss.csv").read_text().startswith("step,loss")


def test_failed_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    """A writer dying midway (here: raising after the model folder is written) leaves step 2 intact."""
    real_save = train_module.save_safetensors
    calls = []

    def dies_second_time(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("simulated crash while writing train_state.safetensors")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(train_module, "save_safetensors", dies_second_time)
    with pytest.raises(OSError, match="simulated crash"):
        train(tiny(tmp_path / "b", steps=4))
    monkeypatch.undo()
    leftovers = [p.name for p in (tmp_path / "b").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert json.loads((tmp_path / "b" / "checkpoint" / "train_state.json").read_text())["step"] == 2
    load(tmp_path / "b" / "checkpoint" / "model")
    train(tiny(tmp_path / "b", steps=4), resume=tmp_path / "b")
    train(tiny(tmp_path / "a", steps=4))
    assert_same_state(state(tmp_path / "a"), state(tmp_path / "b"))


def test_sigkill_during_training_leaves_loadable_checkpoint(tmp_path):
    """Kill -9 a run that checkpoints every step; whatever moment it died, the checkpoint loads."""
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(REPO)!r})
        from minidiff.cli import train_main as main
        main(["--dataset", "digits", "--image-size", "8", "--model-channels", "8", "--channel-mult", "1,2",
              "--num-res-blocks", "1", "--attention-levels", "", "--no-mid-attention", "--norm-groups", "4",
              "--batch-size", "4", "--steps", "100000", "--ckpt-every", "1", "--sample-every", "0",
              "--no-progress", "--out-dir", {str(tmp_path)!r}])
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "checkpoint" / "train_state.json").exists():
            assert proc.poll() is None and time.time() < deadline, "the training subprocess did not checkpoint"
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    step = json.loads((tmp_path / "checkpoint" / "train_state.json").read_text())["step"]
    assert step >= 1
    load(tmp_path / "checkpoint" / "model")
    read_state_dict(tmp_path / "checkpoint" / "train_state.safetensors")


def test_resume_with_other_config_names_the_fields(tmp_path):
    train(tiny(tmp_path, steps=2))
    with pytest.raises(ValueError, match=r"lr: checkpoint 0.0005, now 0.001.*model_channels: checkpoint 8, now 16"):
        train(tiny(tmp_path, steps=4, lr=1e-3, model_channels=16), resume=tmp_path)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        train(tiny(tmp_path / "x", steps=4), resume=tmp_path / "samples")


def test_bad_config_values_are_clear():
    with pytest.raises(ValueError, match="label_dropout must be in"):
        TrainConfig(label_dropout=1.5)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        TrainConfig(batch_size=0)


# Runs the CLI entry point under torchrun, then saves each rank's weights (training writes rank 0's only).
WORKER = """
import os, sys
from minidiff.writing import save_safetensors
from minidiff.cli import train_main as main
result = main(sys.argv[2:])
save_safetensors(result.model.state_dict(), f"{sys.argv[1]}/rank{os.environ['RANK']}.safetensors")
"""


def test_torchrun_two_processes_match_one(tmp_path):
    """2 gloo ranks x 4 images == 1 process x 8 images.

    Ranks are bitwise identical (DDP all-reduces the same gradients into both). Against one process
    only the summation order differs: gradients agree to ~1e-7 and after 3 AdamW steps the weights to
    within 1e-6 (measured 6e-8). The model has no attention: a key bias has an identically zero
    true gradient (softmax ignores a per-row constant), so its gradient is pure rounding noise, which
    Adam's normalisation turns into steps of +-lr that differ between any two summation orders."""
    (tmp_path / "worker.py").write_text(WORKER)
    config = tiny(tmp_path / "ddp", steps=3, ckpt_every=3, attention_levels=())
    argv = ["--dataset", "digits", "--image-size", "8", "--model-channels", "8", "--channel-mult", "1,2",
            "--num-res-blocks", "1", "--attention-levels", "", "--no-mid-attention", "--norm-groups", "4",
            "--batch-size", "8", "--steps", "3", "--warmup-steps", "2", "--ckpt-every", "3", "--log-every", "1",
            "--sample-every", "0", "--no-progress", "--out-dir", str(tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "worker.py"), str(tmp_path)] + argv
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (read_state_dict(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    single = train(replace(config, out_dir=str(tmp_path / "single"))).model.state_dict()
    worst = max((rank0[k] - single[k]).abs().max().item() for k in single)
    print(f"largest |DDP - single-process| weight difference: {worst:.2e}")
    assert worst <= 1e-6, f"DDP and single-process weights differ by {worst}"
    saved = state(tmp_path / "ddp")  # only rank 0 wrote, and it wrote its weights
    assert all(torch.equal(saved[f"model.{k}"], rank0[k]) for k in rank0)
