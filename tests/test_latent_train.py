"""The latent stages' trainer (minidiff.latent_trainer) on tiny models: exact resume for both stages,
a loadable Stable Diffusion pipeline folder, and the pipeline equal to a hand-driven run of its parts."""
import json
import shutil

import pytest
import torch
from conftest import hand_driven_text_to_image

import minidiff
from minidiff.cli import train_main
from minidiff.latent_trainer import LatentTrainConfig, load_autoencoder, train_latent

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_AE = dict(ae_channels=8, ae_mult=(1, 2, 2), ae_res_blocks=1, ae_norm_groups=4, batch_size=2, lr=1e-3,
               warmup_steps=2, log_every=1, ckpt_every=2, sample_every=0, progress=False)
TINY_T2I = dict(model_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2), head_channels=8,
                norm_groups=4, text_width=16, text_layers=1, text_heads=2, batch_size=2, lr=1e-3, warmup_steps=2,
                log_every=1, ckpt_every=2, sample_every=0, progress=False, label_dropout=0.5)


def _state(result):
    return {k: v.clone() for k, v in result["model"].state_dict().items()}


def _losses(run) -> list:
    """(step, loss) rows of a run's loss.csv (its speed columns differ from run to run)."""
    return [line.split(",")[:2] for line in (run / "loss.csv").read_text().splitlines()[1:]]


def _same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def autoencoder_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ae")
    result = train_main(["--stage", "autoencoder", "--ae-channels", "8", "--ae-mult", "1,2,2", "--ae-res-blocks", "1",
                         "--ae-norm-groups", "4", "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "2",
                         "--log-every", "1", "--ckpt-every", "2", "--sample-every", "0", "--no-progress",
                         "--steps", "4", "--out-dir", str(out), "--threads", "1"])
    return out, result


def test_autoencoder_resumes_exactly(autoencoder_run, tmp_path):
    out, straight = autoencoder_run
    half = train_latent(LatentTrainConfig(stage="autoencoder", steps=2, out_dir=str(tmp_path), **TINY_AE))
    assert half["step"] == 2
    resumed = train_main(["--resume", str(tmp_path), "--steps", "4", "--threads", "1"])
    assert resumed["step"] == 4
    _same(_state(straight), _state(resumed))
    _same(straight["ema"].state_dict(), resumed["ema"].state_dict())
    assert _losses(out) == _losses(tmp_path)  # the same loss at every step
    # the saved autoencoder carries SD's scale factor, measured: 1 / std of its latents
    autoencoder = load_autoencoder(out)
    assert autoencoder.downsample_factor == 4 and autoencoder.config.scale_factor != 1.0
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    assert autoencoder.encode(images).shape == (2, 4, 16, 16)


def test_text2image_resumes_exactly_and_saves_a_pipeline(autoencoder_run, tmp_path):
    ae_dir, _ = autoencoder_run
    straight = train_latent(LatentTrainConfig(stage="text2image", autoencoder=str(ae_dir), steps=4,
                                              out_dir=str(tmp_path / "a"), **TINY_T2I))
    ae_copy = tmp_path / "ae"  # an autoencoder run that goes on training while the text2image run is paused
    shutil.copytree(ae_dir, ae_copy)
    train_latent(LatentTrainConfig(stage="text2image", autoencoder=str(ae_copy), steps=2, out_dir=str(tmp_path / "b"),
                                   **TINY_T2I))
    train_main(["--resume", str(ae_copy), "--steps", "5", "--threads", "1"])
    resumed = train_main(["--resume", str(tmp_path / "b"), "--steps", "4", "--threads", "1"])
    # equal to the straight run: the resumed run kept the autoencoder it started with
    _same(_state(straight), _state(resumed))
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    pipe = minidiff.load(tmp_path / "a" / "checkpoint" / "model")
    assert pipe.text_encoder is not None and pipe.tokenizer is not None and pipe.autoencoder is not None
    assert pipe.unet.config.context_dim == 16 and pipe.default_size == 64
    _same(pipe.unet.state_dict(), straight["ema"].unet.state_dict())
    _same(resumed["autoencoder"].state_dict(), load_autoencoder(ae_dir).state_dict())


def test_pipeline_equals_hand_driven_parts(autoencoder_run, tmp_path):
    """tokenizer -> text encoder -> DDIM with guidance over the U-Net -> decoder, written out by hand."""
    ae_dir, _ = autoencoder_run
    train_latent(LatentTrainConfig(stage="text2image", autoencoder=str(ae_dir), steps=2, out_dir=str(tmp_path),
                                   **TINY_T2I))
    pipe = minidiff.load(tmp_path / "checkpoint" / "model", pack=False)
    prompts, steps, scale = ["a red circle on the left", "a blue square above a yellow triangle"], 5, 3.0
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    images = pipe.generate(prompt=prompts, noise=noise, steps=steps, guidance_scale=scale, progress=False)

    by_hand = hand_driven_text_to_image(pipe, prompts, noise, steps, scale)
    assert (images - by_hand).abs().max() < 1e-4


def test_bad_settings_are_refused(autoencoder_run, tmp_path):
    ae_dir, _ = autoencoder_run
    with pytest.raises(ValueError, match="--autoencoder"):
        LatentTrainConfig(stage="text2image")
    with pytest.raises(ValueError, match="stage must be one of"):
        LatentTrainConfig(stage="vae")
    with pytest.raises(ValueError, match="different config"):
        train_latent(LatentTrainConfig(stage="autoencoder", steps=6, out_dir=str(ae_dir), **{**TINY_AE, "lr": 1.0}),
                     resume=ae_dir)
    with pytest.raises(FileExistsError, match="already holds a training run"):
        train_latent(LatentTrainConfig(stage="autoencoder", steps=1, out_dir=str(ae_dir), **TINY_AE))
    assert json.loads((ae_dir / "checkpoint" / "train_state.json").read_text())["step"] == 4


def test_a_run_can_start_from_a_saved_model(autoencoder_run, tmp_path):
    """--init-from: the saved U-Net and text encoder start the new run; lr 0 keeps them unchanged."""
    ae_dir, _ = autoencoder_run
    train_latent(LatentTrainConfig(stage="text2image", autoencoder=str(ae_dir), steps=2, out_dir=str(tmp_path / "a"),
                                   **TINY_T2I))
    saved = minidiff.load(tmp_path / "a" / "checkpoint" / "model", pack=False)
    result = train_latent(LatentTrainConfig(stage="text2image", init_from=str(tmp_path / "a" / "checkpoint" / "model"),
                                            steps=1, out_dir=str(tmp_path / "b"), **{**TINY_T2I, "lr": 0.0, "seed": 1}))
    _same({k: v for k, v in result["ema"].unet.state_dict().items()}, saved.denoiser.state_dict())
    _same({k: v for k, v in result["model"].text_encoder.state_dict().items()}, saved.text_encoder.state_dict())
    _same(result["autoencoder"].state_dict(), saved.autoencoder.state_dict())
    with pytest.raises(ValueError, match="does not match this run's flags"):
        train_latent(LatentTrainConfig(stage="text2image", init_from=str(tmp_path / "a" / "checkpoint" / "model"),
                                       steps=1, out_dir=str(tmp_path / "c"), **{**TINY_T2I, "model_channels": 16}))
    with pytest.raises(ValueError, match="does not apply to stage 'autoencoder'"):
        LatentTrainConfig(stage="autoencoder", init_from=str(tmp_path / "a"))
