"""Per-sample decisions across conditions (minidiff.decisions): the spread measures on hand-built sets,
and the runs that compare the signal with the pacer and a sample's schedule with another's, on a
tiny random guided text-to-image pipeline."""
import math

import numpy as np
import pytest
import torch
from conftest import randomize, randomize_near_unit_norms
from test_text_cli import TEXT, UNET, VAE

from minidiff import decisions
from minidiff.adaptive import full_step_allowance
from minidiff.autoencoder import Autoencoder
from minidiff.pipeline import Pipeline
from minidiff.schedules import SchedulerConfig
from minidiff.text import CLIPTextEncoder, CLIPTokenizer
from minidiff.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, BUDGET = 12, 0.4


# -- hand-built decision sets ----------------------------------------------------------------------

def test_jaccard_and_spread_of_hand_built_sets():
    a, b, c = [0, 2, 4], [0, 4, 6], [0]
    assert decisions.jaccard_distance(a, b) == 0.5  # {0, 4} of {0, 2, 4, 6}
    assert decisions.jaccard_distance(a, c) == pytest.approx(2 / 3)
    assert decisions.jaccard_distance([], []) == 0.0 and decisions.jaccard_distance(a, a) == 0.0
    got = decisions.spread([a, b, c])
    assert got["mean_jaccard"] == pytest.approx((1 / 2 + 2 / 3 + 2 / 3) / 3)
    assert got["mean_full"] == pytest.approx(7 / 3)
    assert got["std_full"] == pytest.approx(math.sqrt(8) / 3)  # counts 3, 3, 1: variance 8/9
    assert got["distinct"] == 3
    same = decisions.spread([a, list(reversed(a))])
    assert same == {"mean_jaccard": 0.0, "mean_full": 3.0, "std_full": 0.0, "distinct": 1}


def test_mean_schedule_averages_each_refresh_and_refuses_unequal_counts():
    sets = [[0, 7, 20, 45], [0, 9, 20, 47], [0, 8, 21, 46]]
    assert decisions.mean_schedule(sets) == [0, 8, 20, 46]  # 20.33 -> 20
    assert decisions.mean_schedule([[0, 1, 2], [0, 2, 3]]) == [0, 2, 3]  # 1.5 and 2.5 round up
    with pytest.raises(ValueError, match=r"different numbers of full steps \(\[2, 3\]\)"):
        decisions.mean_schedule([[0, 1, 2], [0, 3]])
    assert decisions.rotate([[0], [0, 1], [0, 2]], 1) == [[0, 1], [0, 2], [0]]
    assert decisions.rotate([[0], [0, 1], [0, 2]], 2) == [[0, 2], [0], [0, 1]]


def test_feature_change_is_relative_l1_per_step_and_the_larger_of_a_samples_two_rows():
    # 2 samples, guided: rows [uncond 0, uncond 1, cond 0, cond 1]
    step0 = torch.tensor([[1.0, 1.0], [2.0, 2.0], [1.0, 1.0], [4.0, 4.0]])
    step1 = torch.tensor([[1.0, 3.0], [2.0, 2.0], [1.0, 1.5], [4.0, 2.0]])
    features = torch.stack([step0, step1, 2 * step1])
    got = decisions.feature_change(features, samples=2)
    # row changes step 0 -> 1: 1/1, 0, 0.25/1, 1/4; sample 0 = max(1, 0.25), sample 1 = max(0, 0.25)
    np.testing.assert_allclose(got, [[1.0, 0.25], [1.0, 1.0]], rtol=1e-12)
    with pytest.raises(ValueError, match="3 rows cannot hold 2 samples"):
        decisions.feature_change(features[:, :3], samples=2)


def test_change_summary_of_a_hand_built_array():
    change = np.array([[1, 2], [1, 2], [2, 2], [2, 4], [3, 0], [9, 0]], dtype=float)
    got = decisions.change_summary(change)
    assert got["mean"] == pytest.approx(28 / 12)
    assert (got["early"], got["middle"], got["late"]) == pytest.approx((1.5, 2.5, 3.0))
    per_sample = np.array([3.0, 10 / 6])
    assert got["between_samples_cv"] == pytest.approx(per_sample.std() / per_sample.mean())
    assert (got["peak_step"], got["peak_min"], got["peak_max"]) == (4, 3, 5)  # argmax 5 and 3


def test_text_conditions_interleave_singles_and_pairs():
    prompts = decisions.scenes_conditions(10)
    pairs = [" of " in p or " above " in p or " below " in p for p in prompts]
    assert len(prompts) == len(set(prompts)) == 10 and sum(pairs) == 4
    assert pairs[:8] == [False, True] * 4


# -- runs on a tiny text model -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    return Pipeline(randomize_near_unit_norms(UNet(UNET), seed=1), SchedulerConfig(),
                    autoencoder=randomize(Autoencoder(VAE), seed=2),
                    text_encoder=randomize_near_unit_norms(CLIPTextEncoder(TEXT), seed=3),
                    tokenizer=CLIPTokenizer.default(), meta={"guidance_scale": 3.0})


@pytest.fixture(scope="module")
def batch(pipe):
    return decisions.prepare(pipe, decisions.conditions(pipe, 4), steps=STEPS, seed=0)


@pytest.fixture(scope="module")
def result(batch):
    return decisions.measure(batch, budget=BUDGET, swaps=2)


def test_every_run_spends_exactly_the_adaptive_runs_macs(batch, result):
    runs = result["runs"]
    allowed = full_step_allowance(BUDGET, STEPS, batch.ratio)
    assert result["allowed"] == allowed and batch.guidance == 3.0 and batch.uncond is not None
    for name in ("adaptive", "pacer only"):
        assert [len(s) for s in runs[name]["full_steps_per_sample"]] == [allowed] * 4, name
    # the signal moved the refreshes, yet the pacer alone spent the same
    assert runs["adaptive"]["full_steps_per_sample"] != runs["pacer only"]["full_steps_per_sample"]
    spent = runs["adaptive"]["mac_fraction"]
    assert spent == pytest.approx((allowed + (STEPS - allowed) * batch.ratio) / STEPS, abs=1e-12)
    assert sorted(runs) == ["adaptive", "batch mean", "own (replayed)", "pacer only", "rotated 1", "rotated 2"]
    assert all(run["mac_fraction"] == spent for run in runs.values())


def test_the_adaptive_run_is_the_pipelines_and_replaying_it_gives_its_images(pipe, batch, result):
    runs = result["runs"]
    images = pipe.generate(prompt=batch.values, noise=batch.noise, steps=STEPS, seed=0, cache_schedule="adaptive",
                           cache_budget=BUDGET, progress=False)
    torch.testing.assert_close(runs["adaptive"]["images"], images, rtol=0, atol=1e-6)
    assert runs["adaptive"]["full_steps_per_sample"] == pipe.last_run.full_steps_per_sample
    torch.testing.assert_close(runs["own (replayed)"]["images"], images, rtol=0, atol=1e-5)
    uncached = pipe.generate(prompt=batch.values, noise=batch.noise, steps=STEPS, seed=0, progress=False)
    assert torch.equal(batch.reference, uncached)
    assert result["runs"]["adaptive"]["psnr"][1] == pytest.approx(
        10 * math.log10(1 / float(((images[1].double() - uncached[1].double()) ** 2).mean())), abs=1e-6)


def test_a_swapped_schedule_is_each_sample_run_alone_on_that_list(pipe, batch):
    hand = [[0, 3, 7], [0, 1, 2, 9], [0, 5], [0, 4, 8, 10, 11]]  # different sets, different sizes
    swapped = decisions.rotate(hand, 1)
    got = decisions.run(batch, decisions.PerSampleSchedule(STEPS, swapped))
    assert got["full_steps_per_sample"] == swapped
    for i, full_steps in enumerate(swapped):
        alone = pipe.generate(prompt=batch.values[i], noise=batch.noise[i:i + 1], steps=STEPS, seed=0,
                              cache_schedule=full_steps, cache_forecast=batch.order, progress=False)
        torch.testing.assert_close(got["images"][i:i + 1], alone, rtol=0, atol=1e-5, msg=f"sample {i}")
    own = decisions.run(batch, decisions.PerSampleSchedule(STEPS, hand))
    assert (own["images"] - got["images"]).abs().amax() > 1e-4  # the swap changed the images


def test_format_result_prints_every_run(result):
    text = decisions.format_result(result, "tiny")
    for name in result["runs"]:
        assert name in text
    assert "own vs neighbour's schedule" in text and "(a) decisions" in text
