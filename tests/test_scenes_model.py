"""The shipped text-to-image model (weights/scenes): it loads offline as a Stable Diffusion pipeline
with its default guidance, and its output equals tokenizer -> text encoder -> guided DDIM over the
U-Net -> decoder written out by hand."""
from pathlib import Path

import pytest
import torch
from conftest import hand_driven_text_to_image

import minidiff

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = Path(__file__).resolve().parents[1] / "weights" / "scenes"


@pytest.fixture(scope="module")
def pipe():
    return minidiff.load(MODEL, pack=False)


def test_it_is_an_sd_shaped_text_model_with_a_default_guidance(pipe):
    assert pipe.text_encoder is not None and pipe.autoencoder is not None and pipe.tokenizer is not None
    assert pipe.denoiser.config.context_dim == pipe.text_encoder.config.hidden_size
    assert pipe.default_size == 64 and pipe.autoencoder.downsample_factor == 4
    assert pipe.default_guidance == 5.0
    assert 0.1 < pipe.autoencoder.config.scale_factor < 1.0  # measured on the scenes, not SD's 0.18215


def test_shipped_pipeline_equals_hand_driven_parts(pipe):
    prompts, steps, scale = ["a red circle on the left", "a blue square above a yellow triangle"], 4, 5.0
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    images = pipe.generate(prompt=prompts, noise=noise, steps=steps, progress=False)  # the default guidance, 5
    by_hand = hand_driven_text_to_image(pipe, prompts, noise, steps, scale)
    assert (images - by_hand).abs().max() < 1e-4
