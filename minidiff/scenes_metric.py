"""The scenes model's quality metric: does a sample show what its prompt asked for?

A small attribute classifier (convolutions and a linear read-out of the 8 x 8 map, one logit group
per head of `scenes.HEADS`: object count, colour/shape of each object in picture order, the single
object's place and size, the pair's axis) is trained on real scenes, all colour x shape pairs
included. A sample follows its prompt when the heads the prompt fixes read what it says. Beside it,
a toy FID: the Frechet distance between the classifier's features of the samples and of real
training scenes (not Inception FID; compare only runs of the same count).

    minidiff toy-metric --dataset scenes --out weights/scenes-classifier
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, load_weights, read_state_dict
from .writing import atomic_folder, save_json, save_safetensors
from .config import config_from_dict
from .metrics import frechet_distance, mean_cov, read_classifier_config
from .scenes import COLOUR_NAMES, HEADS, HELD_OUT, IGNORE, IMAGE_SIZE, PLACE_WORDS, SHAPES, parse_caption, \
    picture_order, scene_batch, targets

FORMAT = "minidiff-scenes-classifier"
ATTRIBUTES = ("colour", "shape", "place", "relation", "all")  # what `SceneMetric.follows` scores
TRAIN_SEED, TEST_SEED, REFERENCE_SEED = 101, 202, 303


@dataclass
class SceneClassifierConfig:
    width: int = 16
    feature_dim: int = 32  # few dimensions: the toy FID's covariance is estimated from a few hundred samples
    num_classes: int = sum(len(classes) for classes in HEADS.values())

    @classmethod
    def from_dict(cls, d: dict) -> "SceneClassifierConfig":
        return config_from_dict(cls, d)


class SceneClassifier(nn.Module):
    """Convolutions down to 8 x 8, then a linear layer over the whole map: where things are matters
    (places, picture order), so unlike the digits' `ToyClassifier` there is no global pooling."""

    def __init__(self, config: SceneClassifierConfig):
        super().__init__()
        self.config = config
        w = config.width

        def conv(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU())

        self.stages = nn.ModuleList([conv(3, w), nn.Sequential(conv(w, 2 * w), conv(2 * w, 2 * w)),
                                     nn.Sequential(conv(2 * w, 4 * w), conv(4 * w, 4 * w))])
        self.features_proj = nn.Linear(4 * w * 8 * 8, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] (scored at 64 x 64) -> (B, feature_dim) penultimate features."""
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True,
                                   align_corners=False)
        h = images * 2 - 1
        for stage in self.stages:
            h = F.avg_pool2d(stage(h), 2)
        return F.silu(self.features_proj(h.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class SceneMetric:
    """The attribute classifier and the real scenes' feature statistics."""

    def __init__(self, classifier: SceneClassifier, ref_mean, ref_cov):
        self.classifier = classifier.eval()
        self.ref_mean, self.ref_cov = ref_mean.double(), ref_cov.double()

    def logits(self, images: torch.Tensor) -> dict:
        return split_heads(self.classifier(images.float()))

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> dict:
        """(B, 3, H, W) images in [0, 1] -> {head: predicted class index (B,)}."""
        return {name: logits.argmax(-1) for name, logits in self.logits(images).items()}

    @torch.inference_mode()
    def toy_fid(self, images: torch.Tensor) -> float:
        if images.shape[0] < 2:
            raise ValueError("the toy FID needs at least 2 images (a covariance); pass a batch")
        return frechet_distance(*mean_cov(self.classifier.features(images.float())), self.ref_mean, self.ref_cov)

    def follows(self, images: torch.Tensor, prompts) -> dict:
        """{attribute: (B,) bool}: colour, shape, place (single objects: the prompt's place, "middle"
        when it names none), relation (pairs: count, axis and both objects in picture order), and
        all (every head the prompt fixes). Size is not scored: prompts need not name it."""
        predicted = self.predict(images)
        wanted = [picture_order(parse_caption(p)) for p in prompts]
        out = {k: torch.zeros(len(wanted), dtype=torch.bool) for k in ATTRIBUTES}
        for i, want in enumerate(wanted):
            got = {name: HEADS[name][int(predicted[name][i])] for name in HEADS}
            same = {name: got[name] == want[name] for name in HEADS if want[name] is not None and name != "size"}
            out["colour"][i] = all(same[k] for k in same if k.startswith("colour"))
            out["shape"][i] = all(same[k] for k in same if k.startswith("shape"))
            out["place"][i] = same.get("place", False) and same["count"]
            out["relation"][i] = want["count"] == "two" and same["count"] and same["axis"]
            out["all"][i] = all(same.values())
        return out

    @staticmethod
    def attributes(prompt: str) -> list:
        """The attributes `follows` can be true of for this prompt: place for one object, relation for two."""
        one = parse_caption(prompt)["relation"] is None
        return [a for a in ATTRIBUTES if a != ("relation" if one else "place")]

    def save(self, dst, *, meta: dict | None = None, overwrite: bool = False):
        config = {"format": FORMAT, "classifier": asdict(self.classifier.config), "heads": HEADS,
                  "note": "toy metric: not Inception FID", **(meta or {})}
        with atomic_folder(dst, overwrite=overwrite, kind=FORMAT) as tmp:
            save_json(config, tmp / "config.json")
            save_safetensors(self.classifier.state_dict(), tmp / "model.safetensors")
            save_safetensors({"mean": self.ref_mean, "cov": self.ref_cov}, tmp / "reference.safetensors")


def following_shares(metric: SceneMetric, images: torch.Tensor, prompts) -> dict:
    """{attribute: share of samples following their prompt in it} (SceneMetric.follows): place over
    the single-object prompts, relation over the pairs, the others over all."""
    follows = metric.follows(images, prompts)
    pair = torch.tensor([parse_caption(p)["relation"] is not None for p in prompts])
    over = {"place": ~pair, "relation": pair}
    return {k: float(v[over.get(k, torch.ones_like(pair))].float().mean()) for k, v in follows.items()}


def split_heads(logits: torch.Tensor) -> dict:
    """(B, sum of head sizes) -> {head: (B, classes)} in HEADS order."""
    sizes = [len(classes) for classes in HEADS.values()]
    return dict(zip(HEADS, logits.split(sizes, dim=-1)))


def load_scene_metric(path) -> SceneMetric:
    path = Path(path)
    config_file = path / "config.json"
    config = read_classifier_config(path, FORMAT, "a scenes classifier",
                                    "minidiff toy-metric --dataset scenes --out DIR")
    if {k: tuple(v) for k, v in config.get("heads", {}).items()} != HEADS:
        raise CheckpointError(f"{config_file} was trained for other heads than this minidiff's scenes.HEADS")
    classifier = SceneClassifier(SceneClassifierConfig.from_dict(config["classifier"]))
    load_weights(classifier, read_state_dict(path / "model.safetensors"), "scenes classifier")
    reference = read_state_dict(path / "reference.safetensors")
    return SceneMetric(classifier, reference["mean"], reference["cov"])


def _real(seed: int, index: int, count: int, holdout: bool) -> tuple:
    images, scenes = scene_batch(seed, index, count, holdout=holdout)
    return images.float() / 255, targets(scenes)


def head_accuracy(metric: SceneMetric, count: int = 512, seed: int = TEST_SEED) -> dict:
    """Each head's accuracy on fresh real scenes (every pair), where the head applies."""
    images, truth = _real(seed, 0, count, holdout=False)
    predicted = metric.predict(images)
    return {name: round(float((predicted[name] == truth[name])[truth[name] != IGNORE].float().mean()), 4)
            for name in HEADS}


def train_scene_metric(*, steps: int = 1500, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                       width: int = 16, progress: bool = True) -> tuple:
    """Train the classifier on an endless stream of real scenes (held-out pairs included); returns
    (SceneMetric, {"head_accuracy": ..., "reference_fd": ...})."""
    torch.manual_seed(seed)
    classifier = SceneClassifier(SceneClassifierConfig(width=width))
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    classifier.train()
    for step in range(steps):
        images, truth = _real(TRAIN_SEED + seed, step, batch_size, holdout=False)
        logits = split_heads(classifier(images))
        loss = sum(F.cross_entropy(logits[name], truth[name], ignore_index=IGNORE) for name in HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress and (step + 1) % 50 == 0:
            print(f"step {step + 1}/{steps}: loss {loss.item():.4f}", flush=True)
    classifier.eval()
    with torch.inference_mode():
        reference = torch.cat([classifier.features(_real(REFERENCE_SEED, i, 256, holdout=True)[0]) for i in range(4)])
    metric = SceneMetric(classifier, *mean_cov(reference))
    # Real-vs-real at the sizes the evaluation uses: the floor a perfect generator would score.
    floor = {n: round(metric.toy_fid(_real(REFERENCE_SEED + 1, 0, n, holdout=True)[0]), 3) for n in (64, 200)}
    return metric, {"head_accuracy": head_accuracy(metric), "reference_fd": floor}


# -- prompt sets -----------------------------------------------------------------------------------

def single_prompts(count: int, *, held_out: bool = False, seed: int = 0) -> list:
    """`count` single-object prompts cycling through every place and every seen (or held-out) pair."""
    pairs = [(c, s) for c in COLOUR_NAMES for s in SHAPES if ((c, s) in HELD_OUT) == held_out]
    places = [None, *[w for k, w in PLACE_WORDS.items() if k != "middle"]]
    combos = [(c, s, p) for c, s in pairs for p in places]
    random.Random(seed).shuffle(combos)
    return [f"a {c} {s}" + (f" {p}" if p else "") for c, s, p in (combos * (count // len(combos) + 1))[:count]]


def pair_prompts(count: int, *, seed: int = 0) -> list:
    """`count` two-object prompts of seen pairs with every relation."""
    rng = random.Random(seed)
    seen = [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in HELD_OUT]
    relations = ("left of", "right of", "above", "below")
    out = []
    for i in range(count):
        (c1, s1), (c2, s2) = rng.sample(seen, 2)
        out.append(f"a {c1} {s1} {relations[i % 4]} a {c2} {s2}")
    return out


def demo_prompts() -> list:
    """The 16 prompts of `minidiff demo` on a text model: each seen colour x shape pair once as a single
    object, taking the places in turn (none, then each place word), then six pairs covering every relation."""
    pairs = [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in HELD_OUT]
    places = [None, *PLACE_WORDS.values()]  # None first: a middle object need not say so
    singles = [f"a {c} {s}" + (f" {places[i % len(places)]}" if places[i % len(places)] else "")
               for i, (c, s) in enumerate(pairs)]
    return singles + pair_prompts(6)


@torch.inference_mode()
def prompt_following(pipe, metric: SceneMetric, prompts: list, *, steps: int = 50, batch_size: int = 50,
                     seed: int = 0, **generate) -> dict:
    """Generate one image per prompt (DDIM unless told) and score it: {attribute: share, "toy_fid": ...}."""
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        images.append(pipe.generate(prompt=chunk, batch_size=len(chunk), steps=steps, seed=seed + start,
                                    progress=False, **generate))
    images = torch.cat(images)
    follows = metric.follows(images, prompts)
    scores = {k: round(float(v.float().mean()), 4) for k, v in follows.items()}
    scores["toy_fid"] = round(metric.toy_fid(images), 3)
    scores["count"] = len(prompts)
    return scores
