"""Image metrics: PSNR (one definition) and a toy quality metric for small generated images, a small
CNN classifier trained on the real data.

For a batch of generated images it reports
  - confident: the fraction the classifier assigns to some class with max softmax >= 0.9,
  - accuracy:  for class-conditional samples, the fraction classified as the requested class,
  - toy FID:   the Frechet distance between Gaussians fitted to the classifier's penultimate
               features of the samples and of the real data (the reference mean/covariance ship
               with the classifier, so no data is needed at run time).
This is NOT Inception FID: the feature space is a 64-d toy classifier's, numbers are not comparable
to any published FID, and like FID it is biased upwards for small sample counts (compare runs at
the same count; `reference_fd_balanced` in the classifier's config.json gives real-vs-real values
for class-balanced sets of 20, 40 and 100 images).

    minidiff toy-metric --dataset digits --image-size 16 --out weights/digits-classifier
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, load_weights, read_state_dict
from .writing import atomic_folder, save_json, save_safetensors
from .config import config_from_dict
from .data import ImageSet

FORMAT = "minidiff-toy-classifier"


def psnr(a: torch.Tensor, b: torch.Tensor, *, per_image: bool = False) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1].

    Default: one MSE over the whole batch, inf when identical (the demo's table). per_image=True:
    the mean over the batch of each image's PSNR, capped at 100 dB (the analysis tables); by Jensen
    it is at least the batch number, so the two are never compared with each other.
    """
    if per_image:
        mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
        return float((10 * torch.log10(1 / mse)).mean())
    mse = float((a.float() - b.float()).square().mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


@dataclass
class ClassifierConfig:
    channels: int = 1
    image_size: int = 16
    num_classes: int = 10
    width: int = 32
    feature_dim: int = 64

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        return config_from_dict(cls, d)


class ToyClassifier(nn.Module):
    """Three conv stages, global average pool, a feature layer (the metric's space), a linear head."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        w = config.width

        def stage(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU())

        self.stages = nn.ModuleList([stage(config.channels, w), stage(w, 2 * w), stage(2 * w, 4 * w)])
        self.features_proj = nn.Linear(4 * w, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images in [0, 1] -> (B, feature_dim) penultimate features."""
        size = self.config.image_size
        if images.shape[-2:] != (size, size):  # score other resolutions at the classifier's own
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        h = images * 2 - 1
        for i, stage in enumerate(self.stages):
            h = stage(h)
            if i < len(self.stages) - 1:
                h = F.avg_pool2d(h, 2)
        return F.silu(self.features_proj(h.mean(dim=(2, 3))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def frechet_distance(mean1, cov1, mean2, cov2) -> float:
    """||m1 - m2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)), in float64; the trace of the root via the
    symmetric form (C1^(1/2) C2 C1^(1/2))^(1/2), whose eigenvalues are real and non-negative."""
    mean1, cov1, mean2, cov2 = (torch.as_tensor(v, dtype=torch.float64) for v in (mean1, cov1, mean2, cov2))
    vals, vecs = torch.linalg.eigh(cov1)
    root1 = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    inner = torch.linalg.eigvalsh(root1 @ cov2 @ root1).clamp(min=0)
    return float((mean1 - mean2).square().sum() + cov1.trace() + cov2.trace() - 2 * inner.sqrt().sum())


def mean_cov(features: torch.Tensor) -> tuple:
    features = features.double()
    return features.mean(0), torch.cov(features.T)


@dataclass
class ToyScores:
    count: int
    confident: float             # fraction with max softmax >= threshold
    accuracy: Optional[float]    # fraction classified as the requested label (conditional samples only)
    toy_fid: float               # Frechet distance in the toy classifier's feature space (not Inception FID)

    def row(self) -> str:
        acc = "-" if self.accuracy is None else f"{self.accuracy:.3f}"
        return f"confident {self.confident:.3f}  class acc {acc}  toy FID {self.toy_fid:.2f}  (n={self.count})"


class ToyMetric:
    """A trained ToyClassifier plus the real data's feature statistics."""

    def __init__(self, classifier: ToyClassifier, ref_mean, ref_cov, class_names=None, threshold: float = 0.9):
        self.classifier = classifier.eval()
        self.ref_mean, self.ref_cov = ref_mean.double(), ref_cov.double()
        self.class_names, self.threshold = class_names, threshold

    @torch.inference_mode()
    def score(self, images: torch.Tensor, labels=None) -> ToyScores:
        """Scores for (B, C, H, W) images in [0, 1]; `labels` are the classes that were asked for."""
        if images.ndim != 4 or images.shape[1] != self.classifier.config.channels:
            raise ValueError(f"images must be (B, {self.classifier.config.channels}, H, W) in [0, 1], "
                             f"got {tuple(images.shape)}")
        if images.shape[0] < 2:
            raise ValueError("the toy FID needs at least 2 images (a covariance); pass a batch")
        features = self.classifier.features(images.float())
        probs = self.classifier.head(features).softmax(-1)
        confidence, predicted = probs.max(-1)
        accuracy = None
        if labels is not None:
            labels = torch.as_tensor(labels).reshape(-1)
            if labels.numel() != images.shape[0]:
                raise ValueError(f"got {labels.numel()} labels for {images.shape[0]} images")
            accuracy = float((predicted == labels).float().mean())
        fid = frechet_distance(*mean_cov(features), self.ref_mean, self.ref_cov)
        return ToyScores(images.shape[0], float((confidence >= self.threshold).float().mean()), accuracy, fid)

    def save(self, dst, *, meta: Optional[dict] = None, overwrite: bool = False):
        config = {"format": FORMAT, "classifier": asdict(self.classifier.config), "class_names": self.class_names,
                  "threshold": self.threshold, "note": "toy metric: not Inception FID", **(meta or {})}
        with atomic_folder(dst, overwrite=overwrite, kind=FORMAT) as tmp:
            save_json(config, tmp / "config.json")
            save_safetensors(self.classifier.state_dict(), tmp / "model.safetensors")
            save_safetensors({"mean": self.ref_mean, "cov": self.ref_cov}, tmp / "reference.safetensors")


def read_classifier_config(path: Path, fmt: str, what: str, command: str) -> dict:
    """A classifier folder's config.json, refused with a sentence when it is missing or of another format."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path} is not {what} folder (no config.json); train one with `{command}`")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_file} is unreadable ({e}); train the classifier again with `{command}`") \
            from None
    if not isinstance(config, dict) or config.get("format") != fmt:
        found = config.get("format") if isinstance(config, dict) else None
        raise CheckpointError(f"{config_file} is not {what} config (format={found!r})")
    return config


def load_metric(path) -> ToyMetric:
    """Load a classifier folder written by `train_metric` (config.json, model.safetensors, reference.safetensors)."""
    path = Path(path)
    config = read_classifier_config(path, FORMAT, "a toy-metric classifier", "minidiff toy-metric --out DIR")
    classifier = ToyClassifier(ClassifierConfig.from_dict(config["classifier"]))
    load_weights(classifier, read_state_dict(path / "model.safetensors"), "toy classifier")
    reference = read_state_dict(path / "reference.safetensors")
    return ToyMetric(classifier, reference["mean"], reference["cov"], config.get("class_names"),
                     config.get("threshold", 0.9))


def _shifted(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translations by up to max_shift pixels (edge padding), so the classifier is not brittle."""
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i]: dy[i] + h, dx[i]: dx[i] + w] for i in range(b)])


def _noise_images(count: int, channels: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Half pixel noise, half smooth blobs (noise upsampled from 2-8 px): neither is any class."""
    pixel = torch.rand(count // 2, channels, size, size, generator=generator)
    coarse = int(torch.randint(2, 9, (1,), generator=generator))
    blobs = torch.rand(count - count // 2, channels, coarse, coarse, generator=generator)
    blobs = F.interpolate(blobs, size=(size, size), mode="bilinear", align_corners=False)
    return torch.cat([pixel, blobs * torch.rand(len(blobs), 1, 1, 1, generator=generator)])


def train_metric(data: ImageSet, *, epochs: int = 15, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                 holdout: float = 0.2, progress: bool = True) -> tuple:
    """Train a ToyClassifier on `data` (a held-out split measures its accuracy), then fit the reference
    statistics on all of `data`. Returns (ToyMetric, {"test_accuracy": ..., "reference_fd_balanced": {n: fd}})."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    images = data.images.float() / 255
    order = torch.randperm(len(data), generator=g)
    n_test = int(len(data) * holdout)
    test, train_idx = order[:n_test], order[n_test:]
    classifier = ToyClassifier(ClassifierConfig(data.channels, data.size, data.num_classes))
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
    total = epochs * ((len(train_idx) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=total)
    for epoch in range(epochs):
        classifier.train()
        perm = train_idx[torch.randperm(len(train_idx), generator=g)]
        for start in range(0, len(perm), batch_size):
            idx = perm[start: start + batch_size]
            loss = F.cross_entropy(classifier(_shifted(images[idx], g)), data.labels[idx])
            # Outlier exposure: noise is pushed towards the uniform distribution, so that a
            # failed sample is not scored as a confident digit by an overconfident network.
            outliers = _noise_images(len(idx) // 2, data.channels, data.size, g)
            loss = loss - 0.5 * classifier(outliers).log_softmax(-1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        if progress:
            print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}")
    classifier.eval()
    with torch.inference_mode():
        test_acc = float((classifier(images[test]).argmax(-1) == data.labels[test]).float().mean())
        features = torch.cat([classifier.features(images[i: i + 512]) for i in range(0, len(images), 512)])
    metric = ToyMetric(classifier, *mean_cov(features), data.class_names)
    # Real-vs-real at small n, with n/K images of every class as the demo samples them: the floor a
    # perfect generator would score. Class balance matters: random subsets score several times higher.
    by_class = [torch.nonzero(data.labels == c).flatten() for c in range(data.num_classes)]
    reference_fd = {}
    for per_class in (2, 4, 10):
        picks = [torch.cat([idx[torch.randperm(len(idx), generator=g)[:per_class]] for idx in by_class])
                 for _ in range(5)]
        reference_fd[per_class * data.num_classes] = round(
            sum(metric.score(images[p]).toy_fid for p in picks) / len(picks), 3)
    return metric, {"test_accuracy": round(test_acc, 4), "reference_fd_balanced": reference_fd}


def toy_classifier(pipe, model_dir=None, classifier_dir=None):
    """`images -> predicted class` from the toy metric's classifier, or None where there is none.

    Without `classifier_dir`, looks beside the model folder for `{dataset}-classifier` (the dataset
    the model was trained on, from its config), e.g. weights/digits-classifier for weights/digits-cond.
    """
    if classifier_dir is None:
        dataset = pipe.meta.get("training", {}).get("config", {}).get("dataset")
        if model_dir is None or not isinstance(dataset, str):
            return None
        classifier_dir = Path(model_dir).resolve().parent / f"{Path(dataset).name}-classifier"
        if not (classifier_dir / "config.json").exists() \
                or json.loads((classifier_dir / "config.json").read_text()).get("format") != FORMAT:
            return None  # none, or another kind (weights/scenes-classifier reads attributes, not one class)
    network = load_metric(classifier_dir).classifier

    @torch.inference_mode()
    def predict(images: torch.Tensor) -> torch.Tensor:
        return network(images.float().cpu()).argmax(-1)

    return predict
