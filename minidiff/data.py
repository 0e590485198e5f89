"""Training images that need no download: a folder of your own, scikit-learn's digits, procedural shapes.

Every dataset is an `ImageSet`: all images held in memory as uint8 (N, C, H, W) plus integer labels.
Toy datasets are small, and holding them whole makes the batch order a pure function of one
generator, which is what lets a resumed run continue bit for bit.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
BUILTIN = ("digits", "shapes")


class ImageSet:
    """Images as uint8 (N, C, H, W), labels as int64 (N,), and the name of each class."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: list, source: str):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"need one label per image: {images.shape[0]} images, labels {tuple(labels.shape)}")
        self.images, self.labels = images, labels.long()
        self.class_names, self.source = list(class_names), source

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def size(self) -> int:
        return self.images.shape[-1]

    def batch(self, indices: torch.Tensor) -> tuple:
        """(images in [-1, 1] float32 (B, C, H, W), labels (B,)) for the given indices."""
        return self.images[indices].float() / 127.5 - 1.0, self.labels[indices]


class ImageFolder(ImageSet):
    """A folder of images of any size, resized (shorter side) and centre-cropped to `size` x `size`.

    Class labels come from sub-folder names in sorted order (`root/cat/1.png` is class "cat"); a
    folder with no sub-folders is one class. Files whose suffix is not an image suffix are ignored;
    an image file that cannot be decoded is an error naming it. Images of any mode are converted to
    `channels` (1: grayscale "L", 3: "RGB"); transparent pixels are composited onto white, and
    16-bit grayscale is scaled to 8 bits. Everything is loaded into memory once: meant for toy sets.
    """

    def __init__(self, path, size: int = 32, channels: int = 3):
        root = Path(path)
        _check_size_channels(size, channels)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        loose = _image_files(root)
        if class_dirs and loose:
            raise ValueError(f"{root} holds {len(loose)} image(s) (e.g. {loose[0].name}) beside class sub-folders "
                             f"{[d.name for d in class_dirs[:5]]}; move every image into a class sub-folder")
        groups = [(d.name, _image_files(d)) for d in class_dirs] if class_dirs else [(root.name, loose)]
        empty = [name for name, files in groups if not files]
        if empty and len(empty) == len(groups):
            raise ValueError(f"no images found in {root} (looked for {', '.join(IMAGE_SUFFIXES)}"
                             f"{' in its sub-folders' if class_dirs else ''})")
        if empty:
            raise ValueError(f"class sub-folder(s) {empty} of {root} hold no images; add images or remove them")
        images, labels = [], []
        for label, (_, files) in enumerate(groups):
            for f in files:
                images.append(_read_image(f, size, channels))
                labels.append(label)
        super().__init__(torch.stack(images), torch.tensor(labels), [name for name, _ in groups], str(root))


def _image_files(folder: Path) -> list:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _check_size_channels(size, channels):
    if not isinstance(size, int) or not 4 <= size <= 1024:
        raise ValueError(f"image size must be an int in [4, 1024], got {size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reading and writing images needs pillow: pip install 'minidiff[image]'") from None
    return Image


def _read_image(path: Path, size: int, channels: int) -> torch.Tensor:
    """One file -> uint8 (channels, size, size)."""
    Image = _pil()
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here with its name
            img = _to_mode(img, "L" if channels == 1 else "RGB", path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}. Remove or replace the file") from None
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(size, size, channels).permute(2, 0, 1).contiguous()


def _to_mode(img, mode: str, path: Path):
    """Any pillow mode -> "L" or "RGB": alpha onto white, 16-bit scaled, float modes refused."""
    Image = _pil()
    if img.mode == "F":
        raise ValueError(f"{path} is a floating-point image (mode F) with no known range; save it as 8-bit PNG")
    if img.mode.startswith("I"):  # 16/32-bit integer grayscale: scale the 16-bit range to 8 bits
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr / 257.0, 0, 255).round().astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img.alpha_composite(rgba)
    return img.convert(mode)


# -- built-in datasets ----------------------------------------------------------------------------

def digits(size: int = 32, channels: int = 1) -> ImageSet:
    """The 1,797 8x8 handwritten digits that ship inside scikit-learn (`sklearn.datasets.load_digits`,
    a copy of the UCI "Optical Recognition of Handwritten Digits" test set), upscaled bilinearly.

    Ten classes "0".."9"; white strokes on black. No download: the data is in the sklearn wheel.
    """
    _check_size_channels(size, channels)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits dataset comes from scikit-learn: pip install 'minidiff[data]' "
                          "(or pip install scikit-learn)") from None
    bunch = load_digits()
    pixels = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    images = (pixels * 255).round().clamp(0, 255).to(torch.uint8).expand(-1, channels, -1, -1).contiguous()
    return ImageSet(images, torch.tensor(bunch.target), [str(d) for d in range(10)], "sklearn digits")


SHAPE_NAMES = ("circle", "square", "triangle")


def shapes(size: int = 32, channels: int = 3, count: int = 3000, seed: int = 0) -> ImageSet:
    """Procedural shapes: one coloured circle, square or triangle on a plain background per image.

    Drawn here from a seeded generator (same seed, same images, on every machine); centre, size,
    rotation of triangles and both colours are random, the label is the shape kind. Supersampled
    4x and averaged, so edges are anti-aliased.
    """
    _check_size_channels(size, channels)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(SHAPE_NAMES), (count,), generator=g)
    radius = 0.18 + 0.17 * torch.rand(count, generator=g)              # half-extent, in image widths
    centre = 0.5 + (0.5 - radius - 0.03)[:, None] * (2 * torch.rand(count, 2, generator=g) - 1)
    angle = 2 * math.pi * torch.rand(count, generator=g)
    fg = torch.rand(count, 3, generator=g)
    bg = torch.rand(count, 3, generator=g)
    bg = torch.where((fg - bg).abs().sum(1, keepdim=True) < 0.6, 1 - fg, bg)  # keep the shape visible

    mask = torch.cat([_shape_masks(labels[i: i + 256], radius[i: i + 256], centre[i: i + 256], angle[i: i + 256],
                                   size) for i in range(0, count, 256)])  # (N, 1, size, size) coverage
    rgb = fg[:, :, None, None] * mask + bg[:, :, None, None] * (1 - mask)
    if channels == 1:
        rgb = (rgb * torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]).sum(1, keepdim=True)
    images = (rgb * 255).round().clamp(0, 255).to(torch.uint8)
    return ImageSet(images, labels, list(SHAPE_NAMES), f"procedural shapes (seed {seed})")


def _shape_masks(labels, radius, centre, angle, size: int) -> torch.Tensor:
    """Coverage in [0, 1] of each shape, drawn at 4x resolution and averaged down: (n, 1, size, size)."""
    hi = size * 4
    coords = (torch.arange(hi, dtype=torch.float32) + 0.5) / hi
    y, x = coords[None, :, None], coords[None, None, :]               # (1, hi, 1), (1, 1, hi)
    dx, dy = x - centre[:, 0, None, None], y - centre[:, 1, None, None]
    r = radius[:, None, None]
    circle = dx ** 2 + dy ** 2 <= r ** 2
    square = (dx.abs() <= r * 0.85) & (dy.abs() <= r * 0.85)
    triangle = torch.ones_like(circle)
    for k in range(3):  # inside all three edges of an equilateral triangle of circumradius r
        a = angle[:, None, None] + 2 * math.pi * k / 3
        triangle &= dx * torch.cos(a) + dy * torch.sin(a) <= r / 2
    mask = torch.stack([circle, square, triangle], 1)[torch.arange(len(labels)), labels].float()  # (n, hi, hi)
    return F.avg_pool2d(mask[:, None], 4)


def load_dataset(name: str, size: int = 32, channels: Optional[int] = None) -> ImageSet:
    """"digits", "shapes" or a folder path; `channels` defaults to the dataset's own (1 for digits)."""
    if name == "digits":
        return digits(size, channels or 1)
    if name == "shapes":
        return shapes(size, channels or 3)
    if not Path(name).exists():
        raise FileNotFoundError(f"dataset {name!r} is neither a built-in ({', '.join(BUILTIN)}) nor an existing folder")
    return ImageFolder(name, size, channels or 3)


def save_grid(images: torch.Tensor, path, nrow: int = 8, *, scale: int = 1, captions=None, column_titles=None):
    """Write (B, C, H, W) images in [0, 1] as one grid (atomically), `nrow` images per row, each scaled
    up `scale` times (None: to a readable tile, see `grid.auto_scale`), optionally captioned."""
    from .images import grid_image, save_image

    save_image(grid_image(images, nrow, scale=scale, captions=captions, column_titles=column_titles), path)


def find_weights(name: str) -> Path:
    """A folder under weights/, looked for beside the installed package, in the repository, then here."""
    package = Path(__file__).resolve().parent
    candidates = [package / "weights" / name, package.parent / "weights" / name, Path.cwd() / "weights" / name]
    for path in candidates:
        if (path / "config.json").exists():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"cannot find the shipped weights {name!r} (looked in {tried}); run from a minidiff "
                            "checkout or pass the folder with --model / --classifier")


def save_png(image: torch.Tensor, path):
    """Write one (C, H, W) image in [0, 1] (C = 1 or 3) as an 8-bit PNG, atomically."""
    from .writing import atomic_path

    Image = _pil()
    array = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[:, :, 0] if image.shape[0] == 1 else array, "L" if image.shape[0] == 1 else "RGB")
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
