"""The shipped text-to-image model (weights/scenes): it loads offline as a Stable Diffusion pipeline
with its default guidance, and its output equals tokenizer -> text encoder -> guided DDIM over the
U-Net -> decoder written out by hand."""
from pathlib import Path

import pytest
import torch

import minidiff
from minidiff.schedules import NoiseSchedule

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
    with torch.inference_mode():
        context = pipe.text_encoder(pipe.tokenizer(prompts))
        empty = pipe.text_encoder(pipe.tokenizer(["", ""]))
        alphas = NoiseSchedule.from_config(pipe.scheduler).alphas_cumprod.double()
        stride = pipe.scheduler.num_train_timesteps // steps
        timesteps = [i * stride + pipe.scheduler.steps_offset for i in reversed(range(steps))]
        x = noise.double()
        for i, t in enumerate(timesteps):
            tt = torch.full((2,), t)
            eps_c = pipe.denoiser(x.float(), tt, context).double()
            eps_u = pipe.denoiser(x.float(), tt, empty).double()
            eps = eps_u + scale * (eps_c - eps_u)
            a_t = alphas[t]
            a_prev = alphas[timesteps[i + 1]] if i + 1 < steps else alphas[0]
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        by_hand = ((pipe.autoencoder.decode(x.float()) + 1) / 2).clamp(0, 1)
    assert (images - by_hand).abs().max() < 1e-4
