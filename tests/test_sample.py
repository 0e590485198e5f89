"""minidiff.sample_many (`torchrun -m minidiff.sample`): many samples across processes, the same whatever the number of processes, resumable."""
import os
import subprocess
import sys

import numpy as np
import pytest

from minidiff.data import save_png
from minidiff.pipeline import load
from minidiff.sample_many import batches, rank_batches, sample_many, sample_path

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
MODEL = REPO / "weights" / "digits-cond"
OPTIONS = ["--model", str(MODEL), "--steps", "3", "--sampler", "ddpm", "--cache-interval", "2", "--batch-size", "2",
           "--guidance-scale", "2", "--seed", "7", "-n", "5"]

pytest.importorskip("PIL")


def _pixels(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


def _run(args, out):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, *args, "--out", str(out)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_batches_are_fixed_and_dealt_round_robin():
    assert batches(5, 2) == [[0, 1], [2, 3], [4]]
    assert rank_batches(5, 2, 0, 2) == [[0, 1], [4]] and rank_batches(5, 2, 1, 2) == [[2, 3]]
    assert rank_batches(5, 2, 2, 3) == [[4]] and rank_batches(2, 4, 1, 2) == []


def test_torchrun_two_processes_write_the_same_images_as_one(tmp_path):
    """DDPM draws noise inside the loop too, so this also checks the sampler's generator per batch."""
    _run(["-m", "minidiff.sample", *OPTIONS], tmp_path / "one")
    two = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "minidiff.sample",
                *OPTIONS], tmp_path / "two")
    assert "rank 0 of 2" in two.stdout
    for i in range(5):
        a, b = _pixels(sample_path(tmp_path / "one", i)), _pixels(sample_path(tmp_path / "two", i))
        assert a.shape == (16, 16) and np.array_equal(a, b), f"sample {i} differs"
    assert not np.array_equal(_pixels(sample_path(tmp_path / "one", 0)), _pixels(sample_path(tmp_path / "one", 1)))
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [f"{i:06d}.png" for i in range(5)] + ["run.json"]


@pytest.fixture(scope="module")
def pipe():
    return load(MODEL)


def test_restart_skips_finished_samples_and_completes_the_set(pipe, tmp_path):
    kwargs = dict(seed=3, batch_size=2, steps=3, guidance_scale=2.0, progress=False)
    assert sample_many(pipe, tmp_path, 5, **kwargs) == [0, 1, 2, 3, 4]
    before = {i: sample_path(tmp_path, i).read_bytes() for i in range(5)}
    sample_path(tmp_path, 3).unlink()  # as if killed before this file was written
    sample_path(tmp_path, 4).unlink()
    stamps = {i: sample_path(tmp_path, i).stat().st_mtime_ns for i in (0, 1, 2)}
    assert sample_many(pipe, tmp_path, 5, **kwargs) == [3, 4]  # batch [0, 1] skipped, 2 not rewritten
    assert {i: sample_path(tmp_path, i).stat().st_mtime_ns for i in (0, 1, 2)} == stamps
    assert {i: sample_path(tmp_path, i).read_bytes() for i in range(5)} == before
    assert sample_many(pipe, tmp_path, 5, **kwargs) == []  # complete: nothing left to do
    sample_path(tmp_path, 1).write_bytes(b"pre-created")  # an existing file counts as finished
    assert sample_many(pipe, tmp_path, 6, **kwargs) == [5]
    assert sample_path(tmp_path, 1).read_bytes() == b"pre-created"


def test_sample_i_is_generate_with_seed_base_plus_i(pipe, tmp_path):
    sample_many(pipe, tmp_path, 3, seed=10, steps=3, sampler="ddpm", progress=False)
    for i in range(3):
        image = pipe.generate(seed=10 + i, steps=3, sampler="ddpm", class_labels=[i], progress=False)
        save_png(image[0], tmp_path / "direct.png")
        assert np.array_equal(_pixels(tmp_path / "direct.png"), _pixels(sample_path(tmp_path, i)))


def test_classes_and_prompts_cycle_over_samples(pipe, tmp_path):
    from minidiff.sample_many import conditioning_for

    assert conditioning_for([0, 1, 2, 3], [7, 8], None, 10) == {"class_labels": [7, 8, 7, 8]}
    assert conditioning_for([9, 10, 11], None, None, 10) == {"class_labels": [9, 0, 1]}
    assert conditioning_for([1, 2], None, ["a", "b", "c"], None) == {"prompt": ["b", "c"]}
    assert conditioning_for([1, 2], None, None, None) == {}


def test_a_folder_made_with_other_settings_is_refused(tmp_path):
    _run(["-m", "minidiff.sample", *OPTIONS[:-2], "-n", "1"], tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    changed = [a if a != "7" else "8" for a in OPTIONS]
    result = subprocess.run([sys.executable, "-m", "minidiff.sample", *changed, "--out", str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "other settings (seed differ)" in result.stderr
