"""A text model's stored default guidance, and img2img from the CLI (`sample --init-image`), on a tiny
random text-to-image pipeline saved the way the scenes model is."""
import json

import pytest
import torch
from conftest import randomize, randomize_near_unit_norms

import minidiff
from minidiff.autoencoder import Autoencoder, AutoencoderConfig
from minidiff.cli import main
from minidiff.data import save_png
from minidiff.pipeline import Pipeline
from minidiff.schedules import SchedulerConfig
from minidiff.text import CLIPTextConfig, CLIPTextEncoder, CLIPTokenizer
from minidiff.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")

UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attention_levels=(1,), attention_type="transformer", num_heads=2, context_dim=16, norm_groups=8,
                  sample_size=8)
VAE = AutoencoderConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
TEXT = CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A saved tiny text model whose config.json names a default guidance of 4."""
    pipe = Pipeline(randomize_near_unit_norms(UNet(UNET), seed=1), SchedulerConfig(), autoencoder=randomize(Autoencoder(VAE), seed=2),
                    text_encoder=randomize_near_unit_norms(CLIPTextEncoder(TEXT), seed=3), tokenizer=CLIPTokenizer.default(),
                    meta={"guidance_scale": 4.0})
    out = tmp_path_factory.mktemp("text") / "model"
    pipe.save(out)
    return out


def test_a_stored_default_guidance_is_what_none_means(folder):
    pipe = minidiff.load(folder)
    assert pipe.default_guidance == 4.0
    kw = dict(prompt="a red circle", steps=3, seed=5, progress=False, output="latent")
    default = pipe.generate(**kw)
    assert torch.equal(default, pipe.generate(**kw, guidance_scale=4.0))
    off = pipe.generate(**kw, guidance_scale=1.0)
    assert (default - off).abs().max() > 1e-3  # guidance changed the sample
    assert torch.equal(off, pipe.generate(**kw, guidance_scale=0.0))  # both mean off
    assert json.loads((folder / "config.json").read_text())["guidance_scale"] == 4.0


def test_sample_img2img_from_the_cli_equals_the_api(folder, tmp_path):
    g = torch.Generator().manual_seed(0)
    start = torch.rand(1, 3, 16, 16, generator=g)
    save_png(start[0], tmp_path / "start.png")
    assert main(["sample", "--model", str(folder), "--prompt", "a blue square", "--init-image",
                 str(tmp_path / "start.png"), "--strength", "0.5", "--steps", "6", "--seed", "3", "--scale", "1",
                 "--out", str(tmp_path / "out.png"), "--threads", "1"]) == 0
    from minidiff.data import _read_image

    grid = _read_image(tmp_path / "out.png", 20, 3).float() / 255  # one tile, 2 px of grid padding around it
    got = grid[:, 2:18, 2:18]
    read = _read_image(tmp_path / "start.png", 16, 3)[None].float() / 255
    want = minidiff.load(folder).generate(prompt="a blue square", init_image=read, strength=0.5, steps=6, seed=3,
                                          progress=False)
    assert (got - want[0]).abs().max() <= 1 / 255 + 1e-6  # PNG quantisation only


@pytest.mark.parametrize("extra, words", [
    (["--strength", "0.5"], "--strength applies only with --init-image"),
    (["--init-image", "/no/such.png"], "--init-image: no file"),
    (["--init-image", "IMG", "--strength", "1.5"], "--strength must be a number in (0, 1]"),
    (["--negative-prompt", "x", "--guidance-scale", "1"], "--negative-prompt acts only through"),
])
def test_bad_img2img_and_guidance_arguments_are_refused_in_one_line(folder, tmp_path, capsys, extra, words):
    save_png(torch.rand(3, 16, 16), tmp_path / "img.png")
    extra = [str(tmp_path / "img.png") if e == "IMG" else e for e in extra]
    assert main(["sample", "--model", str(folder), "--prompt", "a red circle", "--steps", "2",
                 "--out", str(tmp_path / "o.png"), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "o.png").exists()


def test_a_negative_prompt_works_with_the_models_default_guidance(folder, tmp_path):
    assert main(["sample", "--model", str(folder), "--prompt", "a red circle", "--negative-prompt", "a green square",
                 "--steps", "2", "--out", str(tmp_path / "o.png"), "--threads", "1"]) == 0
