"""The examples run as a user runs them: as scripts, in a subprocess, briefly."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(args, cwd, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_train_toy_example_trains_across_sample_grids_and_checkpoints(tmp_path):
    out = tmp_path / "toy"
    done = _run([str(REPO / "examples" / "02_train_toy.py"), "--steps", "3", "--per-class", "1", "--out", str(out)],
                cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    # A grid at every step of a 3-step run: steps 2 and 3 trained after a grid was sampled.
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == [f"step_00000{i}.png" for i in (1, 2, 3)]
    assert json.loads((out / "checkpoint" / "train_state.json").read_text())["step"] == 3
    assert (out / "checkpoint" / "model" / "model.safetensors").stat().st_size > 1_000_000
    assert {p.name for p in out.glob("final_guidance_*.png")} == {"final_guidance_off.png", "final_guidance_3.0.png"}
    assert "loss (mean squared error of the predicted noise)" in done.stdout


def test_sd15_example_writes_under_out_not_beside_the_user(tmp_path):
    done = _run([str(REPO / "examples" / "03_sd15_deepcache.py"), "--tiny", "--steps", "2", "--size", "32"],
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["out", "out/sd15_deepcache.png"]
