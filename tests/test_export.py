"""minidiff.export against diffusers and the CompVis layout: a tiny SD1.x model exported as a diffusers
folder loads with `from_pretrained` and samples as minidiff does; diffusers folder -> minidiff ->
diffusers folder and single file -> minidiff -> single file give back every tensor exactly; the
shipped class-conditional digits model runs in diffusers' UNet2DModel; models a format cannot
express and occupied destinations are refused before anything is written."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minidiff
from minidiff import export
from minidiff.checkpoint import CheckpointError
from minidiff.cli import main as cli
from minidiff.convert import ddpm, sd15
from test_convert_sd15 import (SCHEDULE_BUFFERS, TOKENIZER_DIR, UNET_CONFIGS, LdmFirstStage, LDM_UNET,
                               convert_diffusers, single_file_state, tiny_clip, tiny_diffusers_pipeline,
                               tiny_diffusers_unet, tiny_yaml, write_single_file)
from minidiff.formats import export_keys, unet_keys
from minidiff.text import CLIPTextConfig

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "weights" / "digits-cond"
# Random weights under guidance drive latents far from unit scale; outputs are compared relative to it.
RELATIVE_TOLERANCE = 1e-4
PROMPTS = ["a photograph of an astronaut riding a horse", "a red fox in the snow"]

pytestmark = pytest.mark.skipif(not TOKENIZER_DIR.is_dir(), reason=f"SD1.5 tokenizer not found at {TOKENIZER_DIR}")


def relative_err(got, expected):
    return (got.float() - expected.float()).abs().max().item() / max(1.0, expected.abs().max().item())


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(the diffusers folder a tiny SD1.x pipeline saved, minidiff's conversion of it, its export)."""
    folder = tmp_path_factory.mktemp("export")
    ours = convert_diffusers(tiny_diffusers_pipeline(seed=31), folder)
    assert cli(["export", "--format", "diffusers", str(folder / "sd-native"), str(folder / "exported")]) == 0
    return folder / "sd-diffusers", ours, folder / "exported"


def test_diffusers_folder_round_trip_gives_back_every_tensor(sd):
    source, _, exported = sd
    weights = "diffusion_pytorch_model.safetensors"
    for part in ("unet", "vae"):
        assert same_tensors(load_file(exported / part / weights), load_file(source / part / weights)), part
    # transformers 5 saves the text tower without the `text_model.` prefix that SD1.5's folder (and
    # transformers 4) use; the export writes the prefix, and every tensor is the same
    written = load_file(exported / "text_encoder" / "model.safetensors")
    text = {k.removeprefix("text_model."): v for k, v in written.items()}
    assert same_tensors(text, load_file(source / "text_encoder" / "model.safetensors"))
    from transformers import CLIPTokenizer

    mine, theirs = (CLIPTokenizer.from_pretrained(folder / "tokenizer") for folder in (exported, source))
    assert mine.get_vocab() == theirs.get_vocab() and mine.model_max_length == theirs.model_max_length == 77
    assert mine(PROMPTS, padding="max_length").input_ids == theirs(PROMPTS, padding="max_length").input_ids
    from diffusers import AutoencoderKL, UNet2DConditionModel

    for cls, part in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):  # the configs build the same model
        mine, theirs = cls.from_pretrained(exported / part).config, cls.from_pretrained(source / part).config
        assert {k: v for k, v in mine.items() if not k.startswith("_")} == \
               {k: v for k, v in theirs.items() if not k.startswith("_")}, part


PIXEL_UNETS = {  # UNet2DModel: one head width for all blocks, or one head per block
    "head-width-16": dict(attention_head_dim=16, num_class_embeds=5),
    "one-head-per-block": dict(attention_head_dim=None, add_attention=False, downsample_padding=0, freq_shift=1,
                               flip_sin_to_cos=False),
}


def _round_trip(reference, conditional):
    cfg = unet_keys.config_from_diffusers(dict(reference.config))
    native = unet_keys.diffusers_to_native(reference.state_dict(), cfg)
    assert same_tensors(export_keys.unet_to(native, cfg, "diffusers"), reference.state_dict())
    written = export.unet_config(cfg, conditional=conditional)
    assert unet_keys.config_from_diffusers(written) == cfg
    rebuilt = type(reference).from_config(written)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_unet2dconditionmodel_variants_round_trip_keys_and_config(name):
    _round_trip(tiny_diffusers_unet(seed=3, **UNET_CONFIGS[name]), conditional=True)


@pytest.mark.parametrize("name", list(PIXEL_UNETS))
def test_unet2dmodel_variants_round_trip_keys_and_config(name):
    from diffusers import UNet2DModel

    reference = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                            layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                            up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, **PIXEL_UNETS[name])
    _round_trip(reference, conditional=False)


@pytest.mark.parametrize("sampler,scheduler", [("ddim", "DDIMScheduler"), ("dpmpp_2m", "DPMSolverMultistepScheduler")])
def test_exported_folder_loads_in_diffusers_and_samples_as_minidiff(sd, sampler, scheduler):
    import diffusers

    _, ours, exported = sd
    reference = diffusers.StableDiffusionPipeline.from_pretrained(exported)
    reference.set_progress_bar_config(disable=True)
    options = dict(algorithm_type="dpmsolver++", solver_order=2) if sampler == "dpmpp_2m" else {}
    reference.scheduler = getattr(diffusers, scheduler).from_config(reference.scheduler.config, **options)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    expected = reference(PROMPTS, guidance_scale=7.5, num_inference_steps=6, latents=noise.clone(),
                         output_type="latent").images
    got = ours.generate(prompt=PROMPTS, guidance_scale=7.5, sampler=sampler, steps=6, noise=noise, output="latent",
                        progress=False)
    g = torch.Generator().manual_seed(5)
    x, context, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([981, 21])
    with torch.no_grad():
        unet = relative_err(ours.unet(x, t, context), reference.unet(x, t, encoder_hidden_states=context).sample)
    errors = {"unet": unet, sampler: relative_err(got, expected)}
    print("exported SD folder in diffusers vs minidiff:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) <= RELATIVE_TOLERANCE


def test_single_file_round_trip_gives_back_every_tensor(tmp_path):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    from conftest import randomize_with_norms

    parts = {"unet": randomize_with_norms(UNetModel(**LDM_UNET), 5), "vae": randomize_with_norms(LdmFirstStage(), 7),
             "clip": tiny_clip(8)}
    state = single_file_state(parts)
    source = write_single_file(state, tmp_path / "v1-5-tiny.safetensors")
    config = sd15.config_from_yaml(tiny_yaml(tmp_path))
    config.text = CLIPTextConfig.from_dict(parts["clip"].config.to_dict())
    pipe = sd15.from_single_file(source, config=config, tokenizer=sd15.load_tokenizer(TOKENIZER_DIR))
    export.write_original(pipe, tmp_path / "out.safetensors")
    written = load_file(tmp_path / "out.safetensors")
    expected = {k: v for k, v in state.items() if k not in SCHEDULE_BUFFERS}  # the schedule is recomputed on load
    assert same_tensors(written, expected)


def test_digits_model_exported_runs_in_diffusers_unet2dmodel_and_matches_ddim(tmp_path):
    from diffusers import DDIMScheduler, UNet2DModel

    if not DIGITS.is_dir():
        pytest.skip(f"shipped model {DIGITS} not found")
    dst = tmp_path / "digits-diffusers"
    assert cli(["export", "--format", "diffusers", str(DIGITS), str(dst)]) == 0
    ours = minidiff.load(DIGITS)
    unet = UNet2DModel.from_pretrained(dst / "unet").eval()
    scheduler = DDIMScheduler.from_config(json.loads((dst / "scheduler" / "scheduler_config.json").read_text()))
    labels, null, guidance = torch.tensor([0, 3, 7, 9]), torch.full((4,), ours.null_class), 3.0
    noise = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(6))
    scheduler.set_timesteps(10)
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:  # classifier-free guidance against the null class, as minidiff's
            uncond, cond = unet(torch.cat([x, x]), t, class_labels=torch.cat([null, labels])).sample.chunk(2)
            x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    got = ours.generate(steps=10, sampler="ddim", noise=noise, class_labels=labels.tolist(), guidance_scale=guidance,
                        output="latent", progress=False)
    err = relative_err(got, x)
    print(f"digits-cond exported, DDIM 10 steps, guidance 3 in diffusers vs minidiff: {err:.1e}")
    assert err <= RELATIVE_TOLERANCE
    # and back: diffusers folder -> minidiff (convert/ddpm.py) gives the shipped weights exactly
    assert ddpm.main([str(dst), str(tmp_path / "back")]) == 0
    assert same_tensors(load_file(tmp_path / "back" / "model.safetensors"), load_file(DIGITS / "model.safetensors"))


def test_models_a_format_cannot_express_are_refused_before_writing(tmp_path, capsys):
    dit = REPO / "weights" / "digits-dit"
    if dit.is_dir():
        assert cli(["export", "--format", "diffusers", str(dit), str(tmp_path / "dit")]) == 1
        assert "a DiT cannot be exported" in capsys.readouterr().err and not (tmp_path / "dit").exists()
    if DIGITS.is_dir():
        assert cli(["export", "--format", "original", str(DIGITS), str(tmp_path / "d.safetensors")]) == 1
        assert "needs a U-Net, a KL VAE and a CLIP text encoder" in capsys.readouterr().err
        assert not (tmp_path / "d.safetensors").exists()
    from minidiff.unet import UNetConfig

    cross = UNetConfig(attention_type="transformer", context_dim=16, num_classes=10, class_cond="context")
    with pytest.raises(CheckpointError, match="class through cross-attention"):
        export.unet_config(cross, conditional=False)
    widths = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(0, 1), num_heads=2)
    with pytest.raises(CheckpointError, match=r"\[16, 32\] channels wide"):
        export.unet_config(widths, conditional=False)


def test_an_existing_destination_is_kept_without_overwrite(sd, tmp_path, capsys):
    _, _, exported = sd
    model = exported.parent / "sd-native"
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert cli(["export", "--format", "diffusers", str(model), str(keep)]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert cli(["export", "--format", "diffusers", str(model), str(keep), "--overwrite"]) == 1  # not an export
    assert "nothing was touched" in capsys.readouterr().err and (keep / "notes.txt").read_text() == "mine"
    before = (exported / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert cli(["export", "--format", "diffusers", str(model), str(exported), "--overwrite"]) == 0  # a previous export
    assert (exported / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert cli(["export", "--format", "original", str(model), str(tmp_path / "sd.ckpt")]) == 1
    assert "writes a .safetensors file" in capsys.readouterr().err
