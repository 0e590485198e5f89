"""Image grids people can look at: small samples scaled up (nearest neighbour) to a readable tile,
captions under tiles, titles over columns and panels. Needs pillow (the `image` extra)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    import torch

# What `save_image` writes for each file suffix; anything else is refused before any work (cli.check_output).
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
READABLE_TILE = 128  # px: the automatic scale makes the longer side of a tile at least this
PAD = 2
GREY = 128
MAX_GRID_PIXELS = 2 ** 28  # 268 Mpx, 0.8 GB as RGB: past this a grid is a mistake, not a picture
MAX_TEXT = 24  # px: the tallest caption or title line `grid_image` draws (font at most 20 px)


def pil():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reading and writing images needs pillow: pip install 'minidiff[image]'") from None
    return Image


def auto_scale(height: int, width: int, tile: int = READABLE_TILE) -> int:
    """The smallest integer factor that makes an image's longer side at least `tile` px."""
    return max(1, math.ceil(tile / max(height, width, 1)))


def grid_image(images: torch.Tensor, nrow: int = 8, *, scale: Optional[int] = None,
               captions: Optional[Sequence[str]] = None, column_titles: Optional[Sequence[str]] = None,
               caption_lines: int = 1):
    """(B, C, H, W) images in [0, 1] as one PIL image, `nrow` per row, each scaled by `scale`
    (None: `auto_scale`), with an optional caption under every tile (wrapped at spaces onto up to
    `caption_lines` lines) and a title over every column."""
    Image = pil()
    from PIL import ImageDraw

    import torch

    b, c, h, w = images.shape
    scale = auto_scale(h, w) if scale is None else scale
    check_grid(b, h, w, nrow, scale, caption_lines=caption_lines)
    nrow = max(1, min(nrow, b))
    th, tw = h * scale, w * scale
    font = _font(max(10, min(20, tw // 8)))
    text = _text_height(font)
    cap = text * caption_lines + 2 if captions else 0
    top = text + 4 if column_titles else 0
    canvas = Image.new("RGB", grid_size(b, h, w, nrow, scale, text * caption_lines if captions else None,
                                        text if column_titles else None), (GREY,) * 3)
    draw = ImageDraw.Draw(canvas)
    array = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        x, y = PAD + col * (tw + PAD), top + PAD + r * (th + cap + PAD)
        pixels = array[i].permute(1, 2, 0).numpy()
        tile = Image.fromarray(pixels[:, :, 0] if c == 1 else pixels[:, :, :3], "L" if c == 1 else "RGB")
        canvas.paste(tile.convert("RGB").resize((tw, th), Image.Resampling.NEAREST), (x, y))
        if captions:
            for k, line in enumerate(_wrap(draw, captions[i], tw - 2, font, caption_lines)):
                draw.text((x + 2, y + th + 1 + k * text), line, fill="white", font=font)
    for col, title in enumerate(column_titles or []):
        draw.text((PAD + col * (tw + PAD) + 2, 2), _fit(draw, title, tw - 2, font), fill="white", font=font)
    return canvas


def grid_size(count: int, height: int, width: int, nrow: int, scale: int, caption: Optional[int] = None,
              title: Optional[int] = None) -> tuple:
    """(width, height) in px of the grid of `count` tiles that `grid_image` draws; `caption` and
    `title` are their text heights (None: none drawn)."""
    nrow = max(1, min(nrow, count))
    rows = math.ceil(count / nrow)
    cap = caption + 2 if caption is not None else 0
    top = title + 4 if title is not None else 0
    return nrow * (width * scale + PAD) + PAD, top + rows * (height * scale + cap + PAD) + PAD


def check_grid(count: int, height: int, width: int, nrow: int, scale, what: str = "the grid", *,
               caption_lines: int = 1):
    """Refuse, before any sampling, a scale that is not a whole number >= 1 or a grid too large to hold."""
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise ValueError(f"scale must be a whole number >= 1, got {scale!r}")
    w, h = grid_size(count, height, width, nrow, scale, MAX_TEXT * caption_lines, MAX_TEXT)
    if w * h > MAX_GRID_PIXELS:
        raise ValueError(f"scale must be lower: {scale} makes {what} {w}x{h} px, about {w * h * 3 / 2 ** 30:.1f} GiB "
                         f"as RGB, and minidiff draws at most {MAX_GRID_PIXELS / 1e6:.0f} megapixels")


def class_titles(class_names, labels) -> list:
    """A caption per label: "class 3" for a class named "3" (or unnamed), "3: circle" for a named one."""
    names = list(class_names or [])
    return [f"{i}: {names[i]}" if i < len(names) and str(names[i]) != str(i) else f"class {i}" for i in map(int, labels)]


def side_by_side(panels: Sequence[tuple]):
    """[(title, PIL image), ...] as one image: panels in a row on white, each titled above."""
    Image = pil()
    from PIL import ImageDraw

    font = _font(24)
    gap, head = 12, _text_height(font) + 12
    width = sum(p.width for _, p in panels) + gap * (len(panels) + 1)
    height = max(p.height for _, p in panels) + head + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = gap
    for title, panel in panels:
        draw.text((x, 4), title, fill="black", font=font)
        canvas.paste(panel, (x, head))
        x += panel.width + gap
    return canvas


def save_image(picture, path) -> Path:
    """Write a PIL image atomically in the format its suffix names (IMAGE_FORMATS)."""
    from .writing import atomic_path

    path = Path(path)
    fmt = IMAGE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: cannot write images as {path.suffix or 'a file without suffix'}; use one of "
                         f"{', '.join(IMAGE_FORMATS)}")
    with atomic_path(path) as tmp:
        picture.save(tmp, format=fmt)
    return path


def _font(size: int):
    """PIL's default font at `size` px (older pillow without FreeType: its one bitmap size)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _text_height(font) -> int:
    box = font.getbbox("Ag")
    return box[3] + 2


def _wrap(draw, text: str, width: int, font, lines: int) -> list:
    """`text` broken at spaces into at most `lines` lines that fit in `width` px (the last cut short)."""
    text, out = str(text), []
    while len(out) < lines - 1 and " " in text and draw.textlength(text, font=font) > width:
        words = text.split(" ")
        take = 1
        while take < len(words) - 1 and draw.textlength(" ".join(words[:take + 1]), font=font) <= width:
            take += 1
        out.append(_fit(draw, " ".join(words[:take]), width, font))
        text = " ".join(words[take:])
    return out + [_fit(draw, text, width, font)]


def _fit(draw, text: str, width: int, font) -> str:
    """`text`, cut short (ending "..") until it fits in `width` px."""
    text = str(text)
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "..", font=font) > width:
        text = text[:-1]
    return text + ".." if text else ""
