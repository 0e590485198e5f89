"""Stable Diffusion 1.x end to end on a tiny converted model: DeepCache parity with the reference
`DeepCacheSDHelper` on a diffusers StableDiffusionPipeline, img2img parity with diffusers'
StableDiffusionImg2ImgPipeline, text-to-image with guidance and caching, and input errors."""

import pytest
import torch

from test_convert_sd15 import TEXT_WIDTH, TOKENIZER_DIR, convert_diffusers, tiny_diffusers_pipeline

TOLERANCE = 1e-4
# Random weights under guidance 7.5 drive DDIM latents to |x| ~ 40 (an untrained eps never cancels
# the noise), where float32 rounding of channels-last vs NCHW kernels alone reaches ~2e-4 absolute.
# Runs are compared relative to the latents' scale, at 2e-5 (measured <= 7e-6): at unit scale that
# is tighter than the 1e-4 absolute bound.
RELATIVE_TOLERANCE = 2e-5
PROMPTS = ["a photograph of an astronaut riding a horse", "a red fox in the snow"]

pytestmark = pytest.mark.skipif(not TOKENIZER_DIR.is_dir(), reason=f"SD1.5 tokenizer not found at {TOKENIZER_DIR}")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(diffusers pipeline with a DDIM scheduler, the same model converted to minidiff)."""
    from diffusers import DDIMScheduler

    reference = tiny_diffusers_pipeline(seed=11)
    ours = convert_diffusers(reference, tmp_path_factory.mktemp("sd15"))
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    return reference, ours


def latents(batch=2, seed=0):
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def scaled_err(got, expected):
    """Max error over the latents' scale: random weights under guidance 7.5 drive the latents to
    |x| ~ 30, and float32 rounding differences (the U-Net runs channels-last, diffusers does not)
    grow with them."""
    return max_err(got, expected) / max(1.0, expected.abs().max().item())


def test_text_encoder_and_tokenizer_match_transformers(models):
    reference, ours = models
    ids = reference.tokenizer(PROMPTS + [""], padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
    assert torch.equal(ours.tokenizer(PROMPTS + [""]), ids)
    with torch.no_grad():
        assert max_err(ours.encode_prompt(PROMPTS + [""]), reference.text_encoder(ids).last_hidden_state) <= TOLERANCE


# DeepCache numbers branches as 3 * block + layer (block = diffusers down/up block, layer = its
# resnet/attention pair, 2 = its downsampler), so with layers_per_block=2 branch b runs down to
# diffusers' input entry b: minidiff's skip b. The parity below checks that numbering directly.
# The scheduler is DDIM because the helper counts steps by `list(timesteps).index(t)`: PNDM's
# timesteps repeat their second entry, so its counter would repeat a step and drift from ours.
@pytest.mark.parametrize("branch,interval", [(0, 2), (0, 5), (1, 3), (2, 2), (3, 3), (5, 2), (8, 3)])
def test_cached_generation_matches_deepcache_sd_helper(models, branch, interval):
    from DeepCache import DeepCacheSDHelper

    reference, ours = models
    noise = latents()
    with torch.no_grad():
        cond, uncond = ours.encode_prompt(PROMPTS), ours.encode_prompt(["", ""])
    helper = DeepCacheSDHelper(pipe=reference)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        expected = reference(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=7.5,
                             num_inference_steps=10, latents=noise.clone(), output_type="latent").images
    finally:
        helper.disable()
    got = ours.generate(prompt=PROMPTS, guidance_scale=7.5, sampler="ddim", steps=10, noise=noise, output="latent",
                        cache_interval=interval, cache_branch=branch, progress=False)
    print(f"DeepCache branch {branch} interval {interval}: max error {max_err(got, expected):.2e}, "
          f"relative to the latents' scale {scaled_err(got, expected):.2e}")
    assert scaled_err(got, expected) <= RELATIVE_TOLERANCE
    assert ours.last_run.full_calls == len(range(0, 10, interval))


def test_uncached_generation_matches_diffusers_pipeline(models):
    reference, ours = models
    noise = latents(seed=1)
    with torch.no_grad():
        cond, uncond = ours.encode_prompt(PROMPTS), ours.encode_prompt(["blurry", "blurry"])
    expected = reference(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=7.5,
                         num_inference_steps=10, latents=noise.clone(), output_type="latent").images
    got = ours.generate(prompt=PROMPTS, negative_prompt="blurry", guidance_scale=7.5, sampler="ddim", steps=10,
                        noise=noise, output="latent", progress=False)
    assert scaled_err(got, expected) <= RELATIVE_TOLERANCE


def test_img2img_matches_diffusers_img2img_pipeline(models, monkeypatch):
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img

    reference, ours = models
    # minidiff encodes the posterior mean; diffusers samples it unless told to take the mode.
    monkeypatch.setattr(img2img, "retrieve_latents", lambda output, generator=None, sample_mode="sample":
                        output.latent_dist.mode())
    pipe = StableDiffusionImg2ImgPipeline(**reference.components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cond, uncond = ours.encode_prompt(PROMPTS), ours.encode_prompt(["", ""])
    for strength in (0.75, 0.3, 1.0):
        expected = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, image=image, strength=strength,
                        guidance_scale=7.5, num_inference_steps=10, generator=torch.Generator().manual_seed(4),
                        output_type="latent").images
        got = ours.generate(prompt=PROMPTS, init_image=image, strength=strength, guidance_scale=7.5, sampler="ddim",
                            steps=10, seed=4, output="latent", progress=False)
        print(f"img2img strength {strength}: max error {max_err(got, expected):.2e}, relative to the latents' "
              f"scale {scaled_err(got, expected):.2e}")
        assert scaled_err(got, expected) <= RELATIVE_TOLERANCE
        assert ours.last_run.model_calls == min(int(10 * strength), 10)


def test_img2img_with_plms_and_cache_runs_the_remaining_steps(models):
    _, ours = models
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    out = ours.generate(prompt="a red fox", init_image=image, strength=0.5, guidance_scale=7.5, sampler="plms",
                        steps=20, seed=0, cache_interval=3, progress=False)
    assert out.shape == (1, 3, 16, 16) and 0 <= out.min() and out.max() <= 1
    assert ours.last_run.model_calls == 11 and ours.last_run.full_calls == 4  # 10 steps + PLMS's revisit


@pytest.mark.parametrize("strength,message", [(0.0, "strength"), (1.5, "strength"), (-0.2, "strength"),
                                              (True, "strength"), (0.05, "no step")])
def test_img2img_strength_out_of_range_is_an_error(models, strength, message):
    _, ours = models
    image = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match=message):
        ours.generate(prompt="x", init_image=image, strength=strength, steps=10, progress=False)


def test_img2img_bad_images_are_errors(models):
    _, ours = models
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ours.generate(prompt="x", init_image=torch.rand(1, 3, 16, 16) * 2 - 1, steps=4, progress=False)
    with pytest.raises(ValueError, match="shape"):
        ours.generate(prompt="x", init_image=torch.rand(3, 16, 16), steps=4, progress=False)
    with pytest.raises(ValueError, match="height must be a multiple of 2"):  # the tiny autoencoder's factor
        ours.generate(prompt="x", init_image=torch.rand(1, 3, 13, 16), steps=4, progress=False)


def test_text_to_image_with_guidance_plms_and_caching_both_halves(models):
    _, ours = models
    images = ours.generate(prompt=PROMPTS, negative_prompt=["blurry", "dark"], guidance_scale=7.5, sampler="plms",
                           steps=50, height=16, width=16, seed=0, cache_interval=3, cache_branch=1, progress=False)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    stats = ours.last_run
    assert (stats.model_calls, stats.full_calls, stats.shallow_calls) == (51, 17, 34)
    single = ours.generate(prompt="a red fox", guidance_scale=7.5, steps=5, batch_size=3, seed=0, progress=False)
    assert single.shape == (3, 3, 16, 16)


def test_long_prompt_is_truncated_with_a_warning(models):
    _, ours = models
    with pytest.warns(UserWarning, match="dropped"):
        context = ours.encode_prompt(["a very long prompt " * 30])
    assert context.shape == (1, 77, TEXT_WIDTH)


def test_sizes_the_autoencoder_cannot_take_are_errors(models):
    _, ours = models
    with pytest.raises(ValueError, match=r"height must be a multiple of 2 \(the autoencoder's downsampling\) "
                                         "between 8 and 16384, got 21"):
        ours.generate(prompt="x", height=21, width=16, steps=2, progress=False)
    with pytest.raises(ValueError, match="width must be a multiple of 2 .* got 6"):  # latents below the U-Net's 4
        ours.generate(prompt="x", height=16, width=6, steps=2, progress=False)


@pytest.fixture(scope="module")
def odd_size_models(tmp_path_factory):
    """A tiny SD with SD's geometry: an autoencoder of factor 8 (4 levels, 8 norm groups) and a U-Net
    with per-level head counts, so 72x88 px are 9x11 latents, odd at every U-Net level."""
    from diffusers import AutoencoderKL, DDIMScheduler

    from conftest import randomize_with_norms
    from test_convert_sd15 import tiny_diffusers_unet

    vae = randomize_with_norms(AutoencoderKL(block_out_channels=(16, 16, 32, 32), layers_per_block=1,
                                             down_block_types=("DownEncoderBlock2D",) * 4, norm_num_groups=8,
                                             up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4), 12)
    unet = tiny_diffusers_unet(seed=12, attention_head_dim=[1, 2, 4])
    reference = tiny_diffusers_pipeline(unet=unet, seed=12, vae=vae)
    ours = convert_diffusers(reference, tmp_path_factory.mktemp("sd15-odd"))
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    return reference, ours


def test_odd_size_generation_matches_diffusers_pipeline(odd_size_models):
    """72x88 px: sizes diffusers takes (multiples of 8) that are not multiples of the model's total 32."""
    reference, ours = odd_size_models
    assert ours.latent_scale * ours.unet.config.downsample_factor == 32
    noise = torch.randn(2, 4, 9, 11, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        cond, uncond = ours.encode_prompt(PROMPTS), ours.encode_prompt(["", ""])
    expected = reference(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=7.5, height=72, width=88,
                         num_inference_steps=10, latents=noise.clone(), output_type="pt").images
    got = ours.generate(prompt=PROMPTS, guidance_scale=7.5, sampler="ddim", steps=10, noise=noise, height=72,
                        width=88, progress=False)
    print(f"72x88 SD images vs diffusers: max error {max_err(got, expected):.2e}")
    assert got.shape == expected.shape == (2, 3, 72, 88)
    assert max_err(got, expected) <= 1e-4


def test_odd_size_cached_generation_matches_deepcache_sd_helper(odd_size_models):
    from DeepCache import DeepCacheSDHelper

    reference, ours = odd_size_models
    noise = torch.randn(2, 4, 9, 11, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        cond, uncond = ours.encode_prompt(PROMPTS), ours.encode_prompt(["", ""])
    helper = DeepCacheSDHelper(pipe=reference)
    helper.set_params(cache_interval=3, cache_branch_id=1)
    helper.enable()
    try:
        expected = reference(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=7.5, height=72,
                             width=88, num_inference_steps=10, latents=noise.clone(), output_type="latent").images
    finally:
        helper.disable()
    got = ours.generate(prompt=PROMPTS, guidance_scale=7.5, sampler="ddim", steps=10, noise=noise, height=72,
                        width=88, output="latent", cache_interval=3, cache_branch=1, progress=False)
    print(f"72x88 DeepCache branch 1 interval 3: relative to the latents' scale {scaled_err(got, expected):.2e}")
    assert scaled_err(got, expected) <= RELATIVE_TOLERANCE and ours.last_run.shallow_calls == 6
