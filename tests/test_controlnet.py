"""ControlNet (minidiff.controlnet, convert/controlnet.py) on a tiny SD-shaped model: one step and
whole guided runs (DDIM, DPM++ 2M) against diffusers' ControlNetModel + UNet2DConditionModel and
StableDiffusionControlNetPipeline, both file layouts to identical tensors, the caching rule against
hand-driven full and shallow calls, and the refusal of bad files."""

import pytest
import torch

from conftest import randomize_with_norms
from test_convert_sd15 import TEXT_WIDTH, TOKENIZER_DIR, convert_diffusers, tiny_diffusers_pipeline
from minidiff import controlnet as cn
from minidiff.checkpoint import CheckpointError
from minidiff.convert import controlnet as convert_cn
from minidiff.formats.export_keys import unet_to

RELATIVE_TOLERANCE = 1e-4
PROMPTS = ["a photograph of an astronaut riding a horse", "a red fox in the snow"]

pytestmark = pytest.mark.skipif(not TOKENIZER_DIR.is_dir(), reason=f"SD1.5 tokenizer not found at {TOKENIZER_DIR}")


def tiny_diffusers_controlnet(seed=3, **overrides):
    from diffusers import ControlNetModel

    params = dict(in_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  attention_head_dim=2, cross_attention_dim=TEXT_WIDTH, norm_num_groups=32,
                  conditioning_embedding_out_channels=(16, 32))  # the tiny VAE halves the size once
    return randomize_with_norms(ControlNetModel(**{**params, **overrides}), seed)


def relative_err(got, expected):
    return ((got.float() - expected.float()).abs().max() / expected.abs().max().clamp(min=1.0)).item()


def control_image(batch=1, seed=5, size=16):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(diffusers pipeline, its ControlNetModel, the converted model with the converted ControlNet, folder)."""
    folder = tmp_path_factory.mktemp("controlnet")
    reference = tiny_diffusers_pipeline(seed=11)
    reference.set_progress_bar_config(disable=True)
    ours = convert_diffusers(reference, folder)
    controlnet = tiny_diffusers_controlnet()
    controlnet.save_pretrained(folder / "cn-diffusers")
    assert convert_cn.main([str(folder / "cn-diffusers"), str(folder / "cn-native")]) == 0
    ours.add_controlnet(folder / "cn-native")
    return reference, controlnet, ours, folder


def test_one_step_equals_diffusers_controlnet_and_unet(setup):
    reference, controlnet, ours, _ = setup
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, TEXT_WIDTH, generator=g)
    image, t = control_image(2), torch.tensor([999, 421])
    with torch.no_grad():
        down, mid = controlnet(x, t, context, controlnet_cond=image, conditioning_scale=0.7, return_dict=False)
        expected = reference.unet(x, t, context, down_block_additional_residuals=down,
                                  mid_block_additional_residual=mid).sample
        bare = reference.unet(x, t, context).sample
        net = ours.controlnets[0]
        got = ours.denoiser(x, t, cn.Controlled(context, (net,), (net.embed_hint(image),), (0.7,)))
        residuals, middle = net(x, t, context, net.embed_hint(image), 0.7)
    assert relative_err(got, expected) <= RELATIVE_TOLERANCE
    assert relative_err(got, bare) > 1e-2  # the ControlNet matters, or the parity says nothing
    assert len(residuals) == len(down) == ours.denoiser.num_branches
    assert all(relative_err(r, d) <= RELATIVE_TOLERANCE for r, d in zip(residuals, down))
    assert relative_err(middle, mid) <= RELATIVE_TOLERANCE


@pytest.mark.parametrize("sampler,scheduler", [("ddim", "DDIMScheduler"), ("dpmpp_2m", "DPMSolverMultistepScheduler")])
def test_guided_run_equals_stable_diffusion_controlnet_pipeline(setup, sampler, scheduler):
    import diffusers

    reference, controlnet, ours, _ = setup
    options = dict(algorithm_type="dpmsolver++", solver_order=2) if sampler == "dpmpp_2m" else {}
    pipe = diffusers.StableDiffusionControlNetPipeline(
        vae=reference.vae, text_encoder=reference.text_encoder, tokenizer=reference.tokenizer, unet=reference.unet,
        controlnet=controlnet, scheduler=getattr(diffusers, scheduler).from_config(ours.scheduler.to_dict(), **options),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    image = control_image(1)
    expected = pipe(PROMPTS, image=image, controlnet_conditioning_scale=0.8, guidance_scale=7.5, num_inference_steps=6,
                    latents=noise.clone(), output_type="latent").images
    got = ours.generate(prompt=PROMPTS, control_image=image, controlnet_scale=0.8, guidance_scale=7.5, sampler=sampler,
                        steps=6, noise=noise, output="latent", progress=False)
    err = relative_err(got, expected)
    print(f"{sampler}, 6 steps, guidance 7.5, ControlNet@0.8 vs diffusers: {err:.1e}")
    assert err <= RELATIVE_TOLERANCE


def original_file(controlnet, path):
    """The original (cldm) layout of a diffusers ControlNet: the encoder through minidiff's export
    tables, the rest by its published names; checked against diffusers' own single-file reader."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors.torch import save_file

    cfg = convert_cn.config_from_diffusers(dict(controlnet.config))
    native = convert_cn.diffusers_to_native(controlnet.state_dict(), cfg)
    encoder = {k[len("encoder."):]: v for k, v in native.items() if k.startswith("encoder.")}
    state = {f"control_model.{k}": v for k, v in unet_to(encoder, cfg.unet, "openaimodel").items()}
    n = 2 * (len(cfg.hint_block_channels) - 1)  # convs in hint_embed.blocks
    for key, value in native.items():
        parts = key.split(".")
        if parts[0] == "hint_embed":
            index = {"conv_in": 0, "conv_out": 2 * n + 2}.get(parts[1])
            index = 2 * int(parts[2]) + 2 if index is None else index
            state[f"control_model.input_hint_block.{index}.{parts[-1]}"] = value
        elif parts[0] == "zero_convs":
            state[f"control_model.zero_convs.{parts[1]}.0.{parts[2]}"] = value
        elif parts[0] == "middle_out":
            state[f"control_model.middle_block_out.0.{parts[1]}"] = value
    back = convert_controlnet_checkpoint(state, dict(controlnet.config))
    reference = controlnet.state_dict()
    assert sorted(back) == sorted(reference) and all(torch.equal(back[k], reference[k]) for k in reference)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_both_layouts_convert_to_identical_tensors(setup, tmp_path):
    from safetensors.torch import load_file

    import minidiff.cli

    _, _, ours, folder = setup
    # SD's four hint widths: diffusers' single-file reader (the check in original_file) knows only those
    controlnet = tiny_diffusers_controlnet(seed=4, conditioning_embedding_out_channels=(16, 32, 96, 256))
    controlnet.save_pretrained(tmp_path / "diffusers")
    path = original_file(controlnet, tmp_path / "control_v11p_sd15_tiny.safetensors")
    assert convert_cn.main([str(tmp_path / "diffusers"), str(tmp_path / "from-diffusers")]) == 0
    assert minidiff.cli.convert_main(["controlnet", str(path), str(tmp_path / "from-original"), "--base",
                                      str(folder / "sd-native")]) == 0
    pth = tmp_path / "control_v11p_sd15_tiny.pth"  # the published .pth: read without running pickled code
    torch.save({k.removeprefix("control_model."): v for k, v in load_file(str(path)).items()}, pth)
    assert convert_cn.main([str(pth), str(tmp_path / "from-pth"), "--base", str(folder / "sd-native")]) == 0
    a, b = cn.load(tmp_path / "from-diffusers").state_dict(), cn.load(tmp_path / "from-original").state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    c = cn.load(tmp_path / "from-pth").state_dict()
    assert sorted(a) == sorted(c) and all(torch.equal(a[k], c[k]) for k in a)
    one, other = convert_cn.read(path, base=folder / "sd-native").config, convert_cn.read(tmp_path / "diffusers").config
    assert one.hint_block_channels == other.hint_block_channels == (16, 32, 96, 256)
    assert {**one.unet.to_dict(), "sample_size": None} == {**other.unet.to_dict(), "sample_size": None}


def hand_driven(ours, noise, image, interval, branch, sampler="ddim"):
    """A guided run whose steps are driven by hand: a full step is forward_full with the ControlNet
    whole; a shallow step runs the U-Net to the cut, adds the first branch + 1 residuals of the whole
    ControlNet (the ones that depend only on its blocks before the cut) and finishes from the cache."""
    net = ours.controlnets[0]
    cond, uncond = ours.encode_prompt(PROMPTS), ours.encode_prompt(["", ""])
    hint = net.embed_hint(image).expand(2, -1, -1, -1)
    calls = {"n": 0, "cache": None}

    def model(x, t, context):
        context = context.tokens
        hints = torch.cat([hint, hint])
        if calls["n"] % interval == 0:
            out, calls["cache"] = ours.denoiser.forward_full(x, t, cn.Controlled(context, (net,), (hints,), (1.0,)),
                                                             branch=branch)
        else:
            residuals, _ = net(x, t, context, hints, 1.0)
            state = ours.denoiser.forward_cut(x, t, context, branch=branch)
            state.skips = [s + r for s, r in zip(state.skips, residuals)]
            out = ours.denoiser.forward_from_cache(state, calls["cache"].hidden)
        calls["n"] += 1
        return out

    return ours.sample(model, noise.clone(), steps=10, sampler=sampler, cond=cond, uncond=uncond, guidance_scale=7.5,
                       progress=False)


@pytest.mark.parametrize("interval", [3, 5])
@pytest.mark.parametrize("branch", [0, 2])
def test_cached_run_equals_hand_driven_full_and_shallow_calls_exactly(setup, interval, branch):
    _, _, ours, _ = setup
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(interval + branch))
    image = control_image(1, seed=branch)
    got = ours.generate(prompt=PROMPTS, control_image=image, guidance_scale=7.5, sampler="ddim", steps=10, noise=noise,
                        output="latent", cache_interval=interval, cache_branch=branch, progress=False)
    with torch.inference_mode():
        expected = hand_driven(ours, noise, image, interval, branch)
    assert torch.equal(got, expected)
    assert ours.last_run.full_calls == len(range(0, 10, interval))


@pytest.mark.parametrize("branch,interval", [(0, 3), (2, 5)])
def test_cached_run_equals_deepcache_helper_on_diffusers_controlnet_pipeline(setup, branch, interval):
    """DeepCache's helper runs the whole ControlNet at every step and the U-Net shallow; the rule runs
    the ControlNet only to the cut. The residuals past the cut are never read, so the runs agree."""
    import diffusers
    from DeepCache import DeepCacheSDHelper

    reference, controlnet, ours, _ = setup
    pipe = diffusers.StableDiffusionControlNetPipeline(
        vae=reference.vae, text_encoder=reference.text_encoder, tokenizer=reference.tokenizer, unet=reference.unet,
        controlnet=controlnet, scheduler=diffusers.DDIMScheduler.from_config(ours.scheduler.to_dict()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    noise, image = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7)), control_image(1)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        expected = pipe(PROMPTS, image=image, guidance_scale=7.5, num_inference_steps=10, latents=noise.clone(),
                        output_type="latent").images
    finally:
        helper.disable()
    common = dict(prompt=PROMPTS, control_image=image, guidance_scale=7.5, sampler="ddim", steps=10, noise=noise,
                  output="latent", progress=False)
    got = ours.generate(cache_interval=interval, cache_branch=branch, **common)
    uncached = ours.generate(**common)
    assert relative_err(got, expected) <= RELATIVE_TOLERANCE
    assert relative_err(uncached, expected) > 1e-2  # caching changed the run, so the agreement says something


def test_a_shallow_step_runs_the_controlnet_only_up_to_the_cut(setup):
    _, _, ours, _ = setup
    net = ours.controlnets[0]
    ran = []
    hooks = [block.register_forward_hook(lambda m, i, o, k=k: ran.append(k))
             for k, block in enumerate(net.encoder.input_blocks)]
    hooks.append(net.encoder.middle_block.register_forward_hook(lambda m, i, o: ran.append("mid")))
    try:
        g = torch.Generator().manual_seed(1)
        x, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, TEXT_WIDTH, generator=g)
        cond = cn.Controlled(context, (net,), (net.embed_hint(control_image()),), (1.0,))
        with torch.no_grad():
            _, cache = ours.denoiser.forward_full(x, 500, cond, branch=2)
            assert ran == list(range(net.num_blocks)) + ["mid"]
            ran.clear()
            ours.denoiser.forward_shallow(x, 480, cond, cache=cache)
    finally:
        for hook in hooks:
            hook.remove()
    assert ran == [0, 1, 2]


def test_two_controlnets_add_their_residuals_as_diffusers_multicontrolnet(setup):
    reference, controlnet, ours, _ = setup
    net = ours.controlnets[0]
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, TEXT_WIDTH, generator=g)
    images, scales, t = (control_image(seed=1), control_image(seed=2)), (0.5, 0.25), torch.tensor([300])
    with torch.no_grad():
        outs = [controlnet(x, t, context, controlnet_cond=im, conditioning_scale=sc, return_dict=False)
                for im, sc in zip(images, scales)]
        down = [p + q for p, q in zip(outs[0][0], outs[1][0])]
        expected = reference.unet(x, t, context, down_block_additional_residuals=down,
                                  mid_block_additional_residual=outs[0][1] + outs[1][1]).sample
        got = ours.denoiser(x, t, cn.Controlled(context, (net, net), tuple(map(net.embed_hint, images)), scales))
        one = ours.denoiser(x, t, cn.Controlled(context, (net,), (net.embed_hint(images[0]),), scales[:1]))
    assert relative_err(got, expected) <= RELATIVE_TOLERANCE
    assert relative_err(got, one) > 1e-3


# -- refused files ------------------------------------------------------------------------------------

def test_truncated_file_is_one_error_and_nothing_is_written(setup, tmp_path):
    _, controlnet, _, folder = setup
    src = tmp_path / "truncated"
    src.mkdir()
    (src / "config.json").write_text((folder / "cn-diffusers" / "config.json").read_text())
    data = (folder / "cn-diffusers" / "diffusion_pytorch_model.safetensors").read_bytes()
    (src / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        convert_cn.read(src)
    assert convert_cn.main([str(src), str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()


def test_unknown_keys_are_refused_by_name(setup, tmp_path):
    from safetensors.torch import save_file

    _, controlnet, _, folder = setup
    src = tmp_path / "extra"
    src.mkdir()
    (src / "config.json").write_text((folder / "cn-diffusers" / "config.json").read_text())
    state = {**controlnet.state_dict(), "controlnet_extra_block.weight": torch.zeros(3)}
    save_file({k: v.contiguous() for k, v in state.items()}, str(src / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match="controlnet_extra_block"):
        convert_cn.read(src)


def test_controlnet_for_another_base_is_refused_and_nothing_changes(setup, tmp_path):
    _, _, ours, _ = setup
    other = tiny_diffusers_controlnet(block_out_channels=(32, 64, 128))
    other.save_pretrained(tmp_path / "other")
    assert convert_cn.main([str(tmp_path / "other"), str(tmp_path / "other-native")]) == 0
    before = list(ours.controlnets)
    with pytest.raises(ValueError, match="another base model"):
        ours.add_controlnet(tmp_path / "other-native")
    assert ours.controlnets == before
    with pytest.raises(ValueError, match="control_image"):
        ours.generate(prompt=PROMPTS, steps=2, output="latent", progress=False)  # a ControlNet needs its image


def test_cli_sample_with_a_controlnet_and_its_flag_errors(setup, tmp_path, capsys):
    from PIL import Image

    from minidiff.cli import main

    _, _, _, folder = setup
    Image.fromarray((control_image(size=24)[0].permute(1, 2, 0) * 255).byte().numpy()).save(tmp_path / "edges.png")
    common = ["sample", "--model", str(folder / "sd-native"), "--prompt", "a fox", "--steps", "2", "--threads", "1",
              "--controlnet", str(folder / "cn-native"), "--height", "16", "--width", "16"]
    assert main(common + ["--control-image", str(tmp_path / "edges.png"), "--out", str(tmp_path / "a.png")]) == 0
    assert (tmp_path / "a.png").is_file()
    assert main(common + ["--control-image", str(tmp_path / "none.png"), "--out", str(tmp_path / "b.png")]) == 1
    assert "--control-image" in capsys.readouterr().err and not (tmp_path / "b.png").exists()
    assert main(common[:-6] + ["--controlnet", str(tmp_path), "--control-image", str(tmp_path / "edges.png"),
                               "--out", str(tmp_path / "c.png")]) == 1
    assert "--controlnet" in capsys.readouterr().err
