"""`scenes`: procedural captioned 64 x 64 pictures of one or two objects, for the text-to-image model.

Infinite and deterministic: batch k of seed s is drawn from its own generator (seeded by s and k), so
any batch can be rebuilt without replaying the ones before it, which is what makes training resume
exactly with no data state. Each caption is generated from the scene it describes:

    a [small|big] {colour} {shape} [on the left|on the right|at the top|at the bottom|in the middle]
    a [size] {colour} {shape} {left of|right of|above|below} a [size] {colour} {shape}

A single object with no place word sits in the middle. Backgrounds are greys (flat, gradients,
light texture) with at most a faint tint, never an object colour. The colour x shape pairs in
HELD_OUT never appear in the training stream (`holdout=True`), to measure composition.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from .data import SHAPE_NAMES, _shape_masks

COLOURS = {"red": (0.86, 0.14, 0.12), "green": (0.12, 0.68, 0.18), "blue": (0.14, 0.28, 0.92),
           "yellow": (0.96, 0.84, 0.08)}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = SHAPE_NAMES  # circle, square, triangle
SIZES = ("small", "big")
PLACES = ("left", "right", "top", "bottom", "middle")
PLACE_WORDS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
               "middle": "in the middle"}
RELATIONS = ("left of", "right of", "above", "below")
HELD_OUT = (("green", "triangle"), ("blue", "circle"))  # colour x shape pairs never in training
IMAGE_SIZE = 64
TWO_OBJECT_SHARE = 0.4
# Radius ranges (in image widths) of the two sizes, apart so a size word is unambiguous.
RADIUS = {"small": (0.085, 0.115), "big": (0.16, 0.2)}
MAX_BACKGROUND_SATURATION = 0.06  # max - min of a background pixel's RGB; object colours have >= 0.5


@dataclass
class SceneObject:
    colour: str
    shape: str
    size: str
    place: str          # for one object: the region it sits in; for two: "" (the relation says where)
    cx: float           # centre, in image widths from the left / top
    cy: float
    radius: float


@dataclass
class Scene:
    """What was drawn: the objects (the caption's subject first) and their relation, if two."""

    objects: list = field(default_factory=list)
    relation: Optional[str] = None
    caption: str = ""


def caption_of(scene: Scene, size_words: tuple, middle_word: bool) -> str:
    """The caption: `size_words[i]` says whether object i's size is named; `middle_word` whether a
    middle object says "in the middle"."""
    def noun(obj, named):
        return "a " + (f"{obj.size} " if named else "") + f"{obj.colour} {obj.shape}"

    first = noun(scene.objects[0], size_words[0])
    if scene.relation is not None:
        return f"{first} {scene.relation} {noun(scene.objects[1], size_words[1])}"
    place = scene.objects[0].place
    return first if place == "middle" and not middle_word else f"{first} {PLACE_WORDS[place]}"


_NOUN = rf"a (?:({'|'.join(SIZES)}) )?({'|'.join(COLOUR_NAMES)}) ({'|'.join(SHAPES)})"
_SINGLE = re.compile(rf"^{_NOUN}(?: ({'|'.join(PLACE_WORDS.values())}))?$")
_DOUBLE = re.compile(rf"^{_NOUN} ({'|'.join(RELATIONS)}) {_NOUN}$")


def parse_caption(caption: str) -> dict:
    """A caption of the grammar -> {"objects": [{"colour", "shape", "size" or None}, ...], "place" or
    "relation"}; anything else is a ValueError. Used by tests and by the prompt-following metric."""
    text = " ".join(caption.lower().split())
    match = _SINGLE.match(text)
    if match:
        size, colour, shape, place = match.groups()
        where = next((k for k, v in PLACE_WORDS.items() if v == place), "middle")
        return {"objects": [{"colour": colour, "shape": shape, "size": size}], "place": where, "relation": None}
    match = _DOUBLE.match(text)
    if match:
        s1, c1, sh1, relation, s2, c2, sh2 = match.groups()
        return {"objects": [{"colour": c1, "shape": sh1, "size": s1}, {"colour": c2, "shape": sh2, "size": s2}],
                "place": None, "relation": relation}
    raise ValueError(f"{caption!r} is not a scenes caption (e.g. 'a big red circle on the left', "
                     "'a blue square above a yellow triangle')")


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def _choice(g: torch.Generator, options):
    return options[int(torch.randint(len(options), (), generator=g))]


def _pick_pair(g: torch.Generator, holdout: bool) -> tuple:
    while True:
        pair = (_choice(g, COLOUR_NAMES), _choice(g, SHAPES))
        if not (holdout and pair in HELD_OUT):
            return pair


def _single(g: torch.Generator, holdout: bool) -> Scene:
    colour, shape = _pick_pair(g, holdout)
    size, place = _choice(g, SIZES), _choice(g, PLACES)
    radius = _uniform(g, *RADIUS[size])
    # the region of each place, as centre ranges; the object stays inside the picture
    near = radius + 0.04
    edge = {"low": (near, near + 0.1), "high": (1 - near - 0.1, 1 - near), "mid": (0.42, 0.58)}
    across = (0.38, 0.62)
    x_range, y_range = {"left": (edge["low"], across), "right": (edge["high"], across),
                        "top": (across, edge["low"]), "bottom": (across, edge["high"]),
                        "middle": (edge["mid"], edge["mid"])}[place]
    cx, cy = _uniform(g, *x_range), _uniform(g, *y_range)
    obj = SceneObject(colour, shape, size, place, cx, cy, radius)
    scene = Scene([obj])
    scene.caption = caption_of(scene, (bool(torch.rand((), generator=g) < 0.5),), bool(torch.rand((), generator=g) < 0.5))
    return scene


def _double(g: torch.Generator, holdout: bool) -> Scene:
    objects = []
    for _ in range(2):
        colour, shape = _pick_pair(g, holdout)
        size = _choice(g, SIZES)
        objects.append(SceneObject(colour, shape, size, "", 0.0, 0.0, _uniform(g, *RADIUS[size]) * 0.8))
    relation = _choice(g, RELATIONS)
    # the pair sits on one axis, apart by more than both radii; the other coordinate nearly shared
    a, b = objects
    gap = a.radius + b.radius + _uniform(g, 0.06, 0.16)
    span = max(a.radius, b.radius) + 0.03
    start = _uniform(g, span, 1 - span - gap)
    first, second = start, start + gap             # first: the left (or top) one
    shared = _uniform(g, 0.3, 0.7)
    wobble = (_uniform(g, -0.05, 0.05), _uniform(g, -0.05, 0.05))
    subject_first = relation in ("left of", "above")
    pos_a, pos_b = (first, second) if subject_first else (second, first)
    if relation in ("left of", "right of"):
        a.cx, a.cy, b.cx, b.cy = pos_a, shared + wobble[0], pos_b, shared + wobble[1]
    else:
        a.cx, a.cy, b.cx, b.cy = shared + wobble[0], pos_a, shared + wobble[1], pos_b
    scene = Scene(objects, relation)
    named = (bool(torch.rand((), generator=g) < 0.3), bool(torch.rand((), generator=g) < 0.3))
    scene.caption = caption_of(scene, named, False)
    return scene


def draw_scene(g: torch.Generator, holdout: bool = True) -> Scene:
    """One random scene (attributes and caption, not yet pixels)."""
    return _double(g, holdout) if float(torch.rand((), generator=g)) < TWO_OBJECT_SHARE else _single(g, holdout)


def _background(g: torch.Generator, size: int) -> torch.Tensor:
    """(3, size, size) in [0, 1]: a grey, a grey gradient or a lightly textured grey, faintly tinted."""
    kind = int(torch.randint(3, (), generator=g))
    level = _uniform(g, 0.22, 0.78)
    coords = torch.linspace(0, 1, size)
    if kind == 0:
        grey = torch.full((size, size), level)
    elif kind == 1:
        angle = _uniform(g, 0, 2 * math.pi)
        ramp = (coords[None, :] - 0.5) * math.cos(angle) + (coords[:, None] - 0.5) * math.sin(angle)
        grey = level + _uniform(g, 0.15, 0.35) * ramp
    else:
        coarse = torch.rand(1, 1, size // 8, size // 8, generator=g) - 0.5
        smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0, 0]
        fine = torch.rand(size, size, generator=g) - 0.5
        grey = level + 0.16 * smooth + 0.05 * fine
    grey = grey.clamp(0.08, 0.92)
    tint = (torch.rand(3, generator=g) - 0.5) * MAX_BACKGROUND_SATURATION * 0.8
    return (grey[None] + tint[:, None, None]).clamp(0, 1)


def render(scenes: list, backgrounds: list, size: int = IMAGE_SIZE, colour_jitter=None) -> torch.Tensor:
    """Pixels of the scenes, uint8 (B, 3, size, size), objects painted over their backgrounds in order."""
    images = torch.stack(backgrounds)
    for slot in range(2):
        index = [i for i, s in enumerate(scenes) if len(s.objects) > slot]
        if not index:
            continue
        objs = [scenes[i].objects[slot] for i in index]
        labels = torch.tensor([SHAPES.index(o.shape) for o in objs])
        radius = torch.tensor([o.radius for o in objs])
        centre = torch.tensor([[o.cx, o.cy] for o in objs])
        angle = torch.tensor([math.pi / 2] * len(objs))  # triangles point up
        mask = _shape_masks(labels, radius, centre, angle, size)  # (n, 1, size, size)
        colour = torch.tensor([COLOURS[o.colour] for o in objs])
        if colour_jitter is not None:
            colour = (colour + colour_jitter[index, slot]).clamp(0, 1)
        images[index] = colour[:, :, None, None] * mask + images[index] * (1 - mask)
    return (images * 255).round().clamp(0, 255).to(torch.uint8)


def scene_batch(seed: int, index: int, count: int, *, holdout: bool = True, size: int = IMAGE_SIZE) -> tuple:
    """Batch `index` of the stream `seed`: (uint8 images (count, 3, size, size), list of Scene).

    The same (seed, index, count, holdout) gives the same batch on every machine."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    scenes = [draw_scene(g, holdout) for _ in range(count)]
    backgrounds = [_background(g, size) for _ in range(count)]
    jitter = (torch.rand(count, 2, 3, generator=g) - 0.5) * 0.12
    return render(scenes, backgrounds, size, jitter), scenes


# -- targets for the attribute classifier -------------------------------------------------------------

# Heads of the attribute classifier and their classes. Objects are read in picture order: "a" is the
# single object, or the left (horizontal pair) / top (vertical pair) one; "b" is the other.
HEADS = {"count": ("one", "two"), "colour_a": COLOUR_NAMES, "shape_a": SHAPES, "place": PLACES,
         "size": SIZES, "axis": ("horizontal", "vertical"), "colour_b": COLOUR_NAMES, "shape_b": SHAPES}
IGNORE = -100  # cross_entropy's ignore_index: a head that does not apply to the scene


def picture_order(parsed: dict) -> dict:
    """Attributes of a caption (`parse_caption`) or scene as the classifier's heads read them."""
    objects = parsed["objects"]
    target = {name: None for name in HEADS}
    if parsed.get("relation") is None:
        obj = objects[0]
        target.update(count="one", colour_a=obj["colour"], shape_a=obj["shape"], place=parsed["place"],
                      size=obj.get("size"))
        return target
    relation = parsed["relation"]
    a, b = objects if relation in ("left of", "above") else objects[::-1]
    target.update(count="two", axis="horizontal" if relation in ("left of", "right of") else "vertical",
                  colour_a=a["colour"], shape_a=a["shape"], colour_b=b["colour"], shape_b=b["shape"])
    return target


def scene_attributes(scene: Scene) -> dict:
    """A scene's ground truth in `parse_caption`'s form (sizes always known)."""
    objects = [{"colour": o.colour, "shape": o.shape, "size": o.size} for o in scene.objects]
    return {"objects": objects, "place": scene.objects[0].place if scene.relation is None else None,
            "relation": scene.relation}


def targets(scenes: list) -> dict:
    """{head: int64 (B,)} class indices of each head, IGNORE where the head does not apply."""
    rows = [picture_order(scene_attributes(s)) for s in scenes]
    return {name: torch.tensor([IGNORE if r[name] is None else classes.index(r[name]) for r in rows])
            for name, classes in HEADS.items()}
