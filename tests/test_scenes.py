"""The procedural `scenes` data set: captions say what is drawn, batches are pure functions of
(seed, index), held-out pairs stay out of training, and backgrounds never take an object colour."""
import pytest
import torch

from minidiff.scenes import COLOURS, HEADS, HELD_OUT, IGNORE, MAX_BACKGROUND_SATURATION, _background, draw_scene, \
    parse_caption, picture_order, scene_attributes, scene_batch, targets


def _saturation(rgb: torch.Tensor) -> torch.Tensor:
    return rgb.max(dim=-3).values - rgb.min(dim=-3).values


def test_captions_parse_back_to_the_drawn_attributes():
    g = torch.Generator().manual_seed(0)
    kinds = set()
    for _ in range(600):
        scene = draw_scene(g)
        parsed, truth = parse_caption(scene.caption), scene_attributes(scene)
        assert parsed["relation"] == truth["relation"]
        assert parsed["place"] == truth["place"]
        assert len(parsed["objects"]) == len(truth["objects"])
        for said, drawn in zip(parsed["objects"], truth["objects"]):
            assert (said["colour"], said["shape"]) == (drawn["colour"], drawn["shape"])
            assert said["size"] in (None, drawn["size"])  # a size, when named, is the drawn one
        kinds.add(truth["relation"] or truth["place"])
    # every place and every relation occurs
    assert kinds == {"left", "right", "top", "bottom", "middle", "left of", "right of", "above", "below"}


def test_geometry_matches_the_words():
    g = torch.Generator().manual_seed(1)
    for _ in range(400):
        scene = draw_scene(g)
        a = scene.objects[0]
        for o in scene.objects:  # inside the picture
            assert o.radius < o.cx < 1 - o.radius and o.radius < o.cy < 1 - o.radius
        if scene.relation is None:
            assert {"left": a.cx < 0.36, "right": a.cx > 0.64, "top": a.cy < 0.36, "bottom": a.cy > 0.64,
                    "middle": 0.4 < a.cx < 0.6 and 0.4 < a.cy < 0.6}[a.place]
            continue
        b = scene.objects[1]
        apart = a.radius + b.radius
        assert {"left of": b.cx - a.cx > apart, "right of": a.cx - b.cx > apart, "above": b.cy - a.cy > apart,
                "below": a.cy - b.cy > apart}[scene.relation]


def test_batches_are_deterministic_by_seed_and_index():
    images, scenes = scene_batch(7, 3, 6)
    again, scenes_again = scene_batch(7, 3, 6)
    assert images.dtype == torch.uint8 and images.shape == (6, 3, 64, 64)
    assert torch.equal(images, again) and [s.caption for s in scenes] == [s.caption for s in scenes_again]
    assert not torch.equal(images, scene_batch(7, 4, 6)[0])
    assert not torch.equal(images, scene_batch(8, 3, 6)[0])


def test_held_out_pairs_never_appear_in_the_training_stream():
    g = torch.Generator().manual_seed(2)
    pairs = {(o.colour, o.shape) for _ in range(1500) for o in draw_scene(g).objects}
    assert not pairs & set(HELD_OUT)
    assert len(pairs) == 12 - len(HELD_OUT)
    g = torch.Generator().manual_seed(2)
    every = {(o.colour, o.shape) for _ in range(1500) for o in draw_scene(g, holdout=False).objects}
    assert set(HELD_OUT) <= every  # the evaluation stream has them


def test_backgrounds_are_never_an_object_colour():
    g = torch.Generator().manual_seed(3)
    for _ in range(60):
        assert float(_saturation(_background(g, 64)).max()) <= MAX_BACKGROUND_SATURATION + 1e-6
    assert min(max(c) - min(c) for c in COLOURS.values()) - 0.12 > 0.4  # 0.12: the largest colour jitter
    # in rendered pictures, every strongly coloured pixel lies on an object
    images, scenes = scene_batch(0, 0, 16)
    rgb = images.float() / 255
    coords = (torch.arange(64) + 0.5) / 64
    for picture, scene in zip(rgb, scenes):
        near = torch.zeros(64, 64, dtype=torch.bool)
        for o in scene.objects:
            reach = 1.21 * o.radius + 1.5 / 64  # a square's corner lies 0.85 * sqrt(2) radii out
            near |= (coords[None, :] - o.cx) ** 2 + (coords[:, None] - o.cy) ** 2 <= reach ** 2
        assert float(_saturation(picture)[~near].max()) <= MAX_BACKGROUND_SATURATION + 1 / 255 + 1e-6
        assert float(_saturation(picture)[near].max()) > 0.4


def test_classifier_targets_read_objects_in_picture_order():
    left_first = picture_order(parse_caption("a red circle right of a blue square"))
    assert (left_first["count"], left_first["axis"], left_first["colour_a"], left_first["shape_a"],
            left_first["colour_b"]) == ("two", "horizontal", "blue", "square", "red")
    below = picture_order(parse_caption("a green square below a yellow triangle"))
    assert (below["axis"], below["colour_a"], below["colour_b"]) == ("vertical", "yellow", "green")
    single = picture_order(parse_caption("a  Big RED triangle at the top"))
    assert (single["place"], single["size"], single["colour_b"]) == ("top", "big", None)
    assert picture_order(parse_caption("a red triangle"))["place"] == "middle"
    _, scenes = scene_batch(0, 1, 32)
    t = targets(scenes)
    assert set(t) == set(HEADS)
    two = torch.tensor([s.relation is not None for s in scenes])
    assert torch.equal(t["axis"] == IGNORE, ~two) and torch.equal(t["place"] == IGNORE, two)


@pytest.mark.parametrize("text", ["a red", "a purple circle", "two red circles", "a red circle near a blue square",
                                  "a red circle on the left left"])
def test_parse_caption_refuses_other_text(text):
    with pytest.raises(ValueError, match="not a scenes caption"):
        parse_caption(text)
