"""Datasets: built-in digits and shapes, and an image folder with awkward files."""
import sys

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image")

from minidiff.data import ImageFolder, load_dataset, save_grid, shapes


def write(path, mode="RGB", size=(20, 12), color=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(np.full(size[::-1], 65535, dtype=np.uint16)).save(path)
        return
    Image.new(mode, size, color if color is not None else (0 if mode in ("L", "1", "P") else (0,) * len(mode))).save(path)


def test_digits_shapes_and_labels():
    pytest.importorskip("sklearn")
    data = load_dataset("digits", 16)
    assert data.images.shape == (1797, 1, 16, 16) and data.images.dtype == torch.uint8
    assert data.num_classes == 10 and data.class_names[3] == "3"
    assert sorted(data.labels.unique().tolist()) == list(range(10))
    x, y = data.batch(torch.tensor([0, 1]))
    assert x.shape == (2, 1, 16, 16) and x.min() >= -1 and x.max() <= 1 and y.tolist() == [0, 1]
    assert load_dataset("digits", 8, channels=3).images.shape == (1797, 3, 8, 8)


def test_digits_without_sklearn_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"minidiff\[data\]"):
        load_dataset("digits", 16)


def test_shapes_are_deterministic_and_labelled():
    a, b, c = shapes(16, count=30, seed=1), shapes(16, count=30, seed=1), shapes(16, count=30, seed=2)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert a.images.shape == (30, 3, 16, 16) and a.class_names == ["circle", "square", "triangle"]
    assert set(a.labels.tolist()) <= {0, 1, 2}
    # Every image has a visible shape: its pixels are not all one colour.
    assert (a.images.float().flatten(1).std(1) > 5).all()
    assert shapes(16, channels=1, count=4).images.shape == (4, 1, 16, 16)


def test_folder_classes_sizes_and_mixed_modes(tmp_path):
    write(tmp_path / "b_dogs" / "1.png", "RGBA", (40, 30), (255, 0, 0, 0))  # fully transparent -> white
    write(tmp_path / "b_dogs" / "2.jpg", "CMYK", (9, 31))
    write(tmp_path / "a_cats" / "1.png", "L", (16, 16), 128)
    write(tmp_path / "a_cats" / "2.png", "P", (50, 8))
    write(tmp_path / "a_cats" / "3.png", "I;16")
    write(tmp_path / "a_cats" / "4.bmp", "1", (12, 12))
    (tmp_path / "a_cats" / "notes.txt").write_text("not an image, ignored")
    data = ImageFolder(tmp_path, size=8, channels=3)
    assert data.class_names == ["a_cats", "b_dogs"]
    assert data.labels.tolist() == [0, 0, 0, 0, 1, 1]
    assert data.images.shape == (6, 3, 8, 8)
    assert (data.images[0] == 128).all()                # gray stays gray
    assert (data.images[2] == 255).all()                # 16-bit white -> 8-bit white
    assert (data.images[4] == 255).all()                # transparent -> white background
    gray = ImageFolder(tmp_path, size=8, channels=1)
    assert gray.images.shape == (6, 1, 8, 8)


def test_folder_without_subfolders_is_one_class(tmp_path):
    for i in range(3):
        write(tmp_path / "flat" / f"{i}.png")
    data = ImageFolder(tmp_path / "flat", size=4)
    assert data.class_names == ["flat"] and data.labels.tolist() == [0, 0, 0]


def test_empty_folders_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found in"):
        ImageFolder(tmp_path / "empty", 8)
    write(tmp_path / "partly" / "full" / "1.png")
    (tmp_path / "partly" / "hollow").mkdir()
    with pytest.raises(ValueError, match=r"\['hollow'\].*hold no images"):
        ImageFolder(tmp_path / "partly", 8)
    write(tmp_path / "mixed" / "cls" / "1.png")
    write(tmp_path / "mixed" / "loose.png")
    with pytest.raises(ValueError, match="beside class sub-folders"):
        ImageFolder(tmp_path / "mixed", 8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing", 8)
    with pytest.raises(FileNotFoundError, match="neither a built-in"):
        load_dataset(str(tmp_path / "missing"))


def test_unreadable_images_name_the_file(tmp_path):
    write(tmp_path / "ok" / "good.png")
    (tmp_path / "ok" / "garbage.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*garbage\.png"):
        ImageFolder(tmp_path / "ok", 8)
    write(tmp_path / "cut" / "full.png", "RGB", (64, 64), (1, 2, 3))
    data = (tmp_path / "cut" / "full.png").read_bytes()
    (tmp_path / "cut" / "truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated\.png"):
        ImageFolder(tmp_path / "cut", 8)
    (tmp_path / "float").mkdir()
    Image.fromarray(np.zeros((4, 4), dtype=np.float32), "F").save(tmp_path / "float" / "f.tiff")
    with pytest.raises(ValueError, match="floating-point image"):
        ImageFolder(tmp_path / "float", 8)


def test_bad_size_and_channels():
    with pytest.raises(ValueError, match="channels must be 1"):
        shapes(16, channels=2)
    with pytest.raises(ValueError, match="image size must be"):
        shapes(2)


def test_save_grid(tmp_path):
    save_grid(torch.rand(5, 3, 6, 6), tmp_path / "grid.png", nrow=4)
    with Image.open(tmp_path / "grid.png") as img:
        assert img.size == (4 * 8 + 2, 2 * 8 + 2) and img.mode == "RGB"
