"""The scenes prompt-following metric: its scoring logic on ground truth, its prompt sets, the
shipped classifier on real scenes, and the shipped model on colour prompts."""
from pathlib import Path

import pytest
import torch

from minidiff.scenes import HELD_OUT, HEADS, IGNORE, parse_caption, scene_batch, targets
from minidiff.scenes_metric import SceneClassifier, SceneClassifierConfig, SceneMetric, head_accuracy, \
    load_scene_metric, pair_prompts, single_prompts, split_heads

pytestmark = pytest.mark.usefixtures("one_thread")
WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


class Oracle(SceneMetric):
    """Reads every picture as its scene's ground truth (a classifier that is always right)."""

    def __init__(self, scenes):
        super().__init__(SceneClassifier(SceneClassifierConfig()), torch.zeros(32), torch.eye(32))
        self.truth = targets(scenes)

    def predict(self, images):
        return {name: t.clamp(min=0) for name, t in self.truth.items()}  # IGNORE heads read as class 0


def test_follows_scores_each_attribute_of_the_prompt():
    images, scenes = scene_batch(5, 0, 48, holdout=False)
    oracle = Oracle(scenes)
    captions = [s.caption for s in scenes]
    right = oracle.follows(images.float() / 255, captions)
    assert right["all"].all() and right["colour"].all() and right["shape"].all()
    single = torch.tensor([s.relation is None for s in scenes])
    assert torch.equal(right["place"], single) and torch.equal(right["relation"], ~single)

    def swap(caption):  # the first colour word replaced by another colour
        for a, b in (("red", "blue"), ("green", "yellow"), ("blue", "red"), ("yellow", "green")):
            if f"{a} " in caption:
                return caption.replace(f"{a} ", f"{b} ", 1)

    wrong = oracle.follows(images.float() / 255, [swap(c) for c in captions])
    assert not wrong["colour"].any() and not wrong["all"].any() and wrong["shape"].all()
    moved = [c.replace("on the left", "on the right") if "on the left" in c else c for c in captions]
    moved_scores = oracle.follows(images.float() / 255, moved)
    changed = torch.tensor([m != c for m, c in zip(moved, captions)])
    assert changed.any() and not moved_scores["place"][changed].any() and moved_scores["place"][~changed & single].all()


def test_prompt_sets():
    seen = single_prompts(200)
    assert len(seen) == 200 and len(set(seen)) == 50  # 10 seen pairs x 5 places, each 4 times
    for prompt in seen:
        parsed = parse_caption(prompt)
        assert (parsed["objects"][0]["colour"], parsed["objects"][0]["shape"]) not in HELD_OUT
    held = single_prompts(20, held_out=True)
    assert all((parse_caption(p)["objects"][0]["colour"], parse_caption(p)["objects"][0]["shape"]) in HELD_OUT
               for p in held)
    pairs = pair_prompts(40)
    assert {parse_caption(p)["relation"] for p in pairs} == {"left of", "right of", "above", "below"}
    assert split_heads(torch.zeros(3, sum(len(c) for c in HEADS.values())))["place"].shape == (3, 5)


def test_shipped_classifier_reads_real_scenes():
    metric = load_scene_metric(WEIGHTS / "scenes-classifier")
    accuracy = head_accuracy(metric, count=128, seed=77)
    assert min(accuracy.values()) >= 0.9, accuracy
    images, scenes = scene_batch(78, 0, 64, holdout=True)
    assert metric.toy_fid(images.float() / 255) < 5 * metric.toy_fid(torch.rand(64, 3, 64, 64))
    assert (targets(scenes)["count"] != IGNORE).all()


def test_shipped_model_follows_colour_prompts():
    """A cheap check without the classifier: the strongly coloured pixels of each sample are nearest
    the colour its prompt names."""
    import minidiff
    from minidiff.scenes import COLOURS

    pipe = minidiff.load(WEIGHTS / "scenes")
    names = list(COLOURS)
    prompts = [f"a big {c} square" for c in names] + [f"a big {c} circle on the left" for c in names[:2]]
    images = pipe.generate(prompt=prompts, steps=20, seed=0, progress=False)
    palette = torch.tensor([COLOURS[c] for c in names])
    hits = 0
    for image, prompt in zip(images, prompts):
        pixels = image.flatten(1).T
        coloured = pixels[(pixels.max(1).values - pixels.min(1).values) > 0.35]
        if len(coloured):
            hits += names[int((coloured.mean(0) - palette).norm(dim=1).argmin())] in prompt
    assert hits >= len(prompts) - 1, hits
