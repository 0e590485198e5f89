"""Euler, Euler ancestral, Heun, DPM-Solver++ 2M and UniPC: parity with diffusers' schedulers driven
as its pipelines drive them, caching with every sampler, and the sampler options at the edge.

Reference runs: latents = noise * init_noise_sigma, scale_model_input before every model call, the
scheduler made by from_config of the model's scheduler config. Errors are relative to the reference
sample's scale (max |ours - theirs| / max |theirs|): random weights, and eps predictions taken at
sigma ~ 150, leave final samples far from unit scale.
"""

import diffusers
import pytest
import torch
from conftest import randomize

from minidiff.cache import make_schedule
from minidiff.pipeline import Pipeline
from minidiff.samplers import (SAMPLER_OPTIONS, SAMPLERS, num_model_calls, sample_euler_a, sampler_options,
                               sigma_schedule)
from minidiff.schedules import SchedulerConfig
from minidiff.unet import UNet, UNetConfig

RELATIVE_TOLERANCE = 1e-4
# Each sampler, the diffusers scheduler it reproduces, and that scheduler's options.
REFERENCE = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),
    "unipc": ("UniPCMultistepScheduler", dict(solver_type="bh2", solver_order=2, predict_x0=True)),
}
DETERMINISTIC = ["euler", "heun", "dpmpp_2m", "unipc"]
PIXEL = dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)  # google/ddpm-* schedule
LATENT = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
              set_alpha_to_one=False)  # Stable Diffusion 1.x
LATENT_NO_OFFSET = {k: v for k, v in LATENT.items() if k != "steps_offset"}


def reference_run(name, config, model, noise, steps, *, karras_sigmas=False, generator=None):
    """diffusers' pipeline loop with the scheduler `name` reproduces."""
    class_name, options = REFERENCE[name]
    if karras_sigmas:
        options = dict(options, use_karras_sigmas=True)
    scheduler = getattr(diffusers, class_name).from_config(config.to_dict(), **options)
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    step_kwargs = {"generator": generator} if generator is not None else {}
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, **step_kwargs).prev_sample
    return x


def relative_error(ours, theirs):
    assert ours.shape == theirs.shape and torch.isfinite(ours).all()
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def toy_model(x, t):
    """Cheap nonlinear stand-in for a U-Net whose output depends on both x and (fractional) t."""
    scale = 0.5 + float(t) / 1000
    return torch.tanh(x * scale) + 0.1 * torch.sin(3 * x + float(t) / 100)


def noise_like(shape=(2, 3, 8, 8), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- schedules and conventions, toy model

@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("extra", [
    PIXEL,
    LATENT,
    dict(LATENT, timestep_spacing="leading"),
    dict(LATENT, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(PIXEL, prediction_type="v_prediction", timestep_spacing="linspace"),
    dict(prediction_type="sample", timestep_spacing="linspace"),
    dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="leading"),
])
def test_matches_diffusers_schedulers_on_a_toy_model(name, karras, extra):
    if karras and extra.get("beta_schedule") == "squaredcos_cap_v2" and name in ("dpmpp_2m", "unipc"):
        pytest.skip("on the cosine schedule diffusers' multistep schedulers repeat Karras timesteps from ~10 "
                    "steps on and then fail (index error, assertion); its DPM-Solver also truncates them")
    config = SchedulerConfig(**extra)
    noise = noise_like()
    for steps in (1, 2, 3, 10, 25):
        theirs = reference_run(name, config, toy_model, noise, steps, karras_sigmas=karras)
        ours = SAMPLERS[name](toy_model, noise.clone(), config, steps, progress=False, karras_sigmas=karras)
        assert relative_error(ours, theirs) <= 1e-5, steps


@pytest.mark.parametrize("multistep", [False, True])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_sigma_schedule_equals_diffusers(multistep, karras, spacing):
    config = SchedulerConfig(timestep_spacing=spacing, steps_offset=int(spacing == "leading"), **LATENT_NO_OFFSET)
    class_name = "DPMSolverMultistepScheduler" if multistep else "EulerDiscreteScheduler"
    reference = getattr(diffusers, class_name).from_config(config.to_dict(), use_karras_sigmas=karras)
    for steps in (1, 4, 10, 25, 50):
        reference.set_timesteps(steps)
        sigmas, timesteps = sigma_schedule(config, steps, karras_sigmas=karras, multistep=multistep)
        assert torch.equal(sigmas, reference.sigmas), steps
        assert torch.equal(timesteps, reference.timesteps), steps


# ---------------------------------------------------------------- tiny U-Nets: pixel and latent, guidance

def tiny_unet(in_channels, seed=0):
    config = UNetConfig(in_channels=in_channels, out_channels=in_channels, model_channels=32, channel_mult=(1, 2),
                        num_res_blocks=1, attention_levels=(1,), num_classes=4, sample_size=8)
    return randomize(UNet(config), std=0.08, seed=seed)


@pytest.fixture(scope="module")
def unets():
    return {"pixel": tiny_unet(3, seed=1), "latent": tiny_unet(4, seed=2)}


def denoiser(unet, guidance_scale):
    """(x, t) -> output of a class-conditional U-Net, with classifier-free guidance against class 3."""
    labels, null = torch.tensor([0, 2]), torch.tensor([3, 3])

    @torch.no_grad()
    def model(x, t):
        if guidance_scale is None:
            return unet(x, t, labels)
        uncond, cond = unet(torch.cat([x, x]), t, torch.cat([null, labels])).chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    return model


# (model kind, prediction type, guidance): each kind, prediction and guidance setting appears twice.
SCENARIOS = [("pixel", "epsilon", 3.0), ("pixel", "v_prediction", None), ("latent", "epsilon", None),
             ("latent", "v_prediction", 5.0)]


def scenario(unets, kind, prediction_type, guidance_scale):
    config = SchedulerConfig(**(PIXEL if kind == "pixel" else LATENT), prediction_type=prediction_type)
    unet = unets[kind]
    return config, denoiser(unet, guidance_scale), noise_like((2, unet.config.in_channels, 8, 8), seed=4)


@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("kind, prediction_type, guidance_scale", SCENARIOS)
def test_matches_diffusers_with_tiny_unets(unets, name, karras, kind, prediction_type, guidance_scale):
    config, model, noise = scenario(unets, kind, prediction_type, guidance_scale)
    for steps in (10, 25):
        theirs = reference_run(name, config, model, noise, steps, karras_sigmas=karras)
        ours = SAMPLERS[name](model, noise.clone(), config, steps, progress=False, karras_sigmas=karras)
        error = relative_error(ours, theirs)
        print(f"{name} karras={karras} {kind} {prediction_type} guidance={guidance_scale} {steps} steps: "
              f"relative error {error:.1e}")
        assert error <= RELATIVE_TOLERANCE


@pytest.mark.parametrize("kind, prediction_type, guidance_scale", SCENARIOS)
def test_euler_ancestral_with_one_seed_matches_diffusers(unets, kind, prediction_type, guidance_scale):
    config, model, noise = scenario(unets, kind, prediction_type, guidance_scale)
    for steps in (10, 25):
        theirs = reference_run("euler_a", config, model, noise, steps, generator=torch.Generator().manual_seed(7))
        ours = sample_euler_a(model, noise.clone(), config, steps, generator=torch.Generator().manual_seed(7),
                              progress=False)
        error = relative_error(ours, theirs)
        print(f"euler_a {kind} {prediction_type} guidance={guidance_scale} {steps} steps: relative error {error:.1e}")
        assert error <= RELATIVE_TOLERANCE
        other = sample_euler_a(model, noise.clone(), config, steps, generator=torch.Generator().manual_seed(8),
                               progress=False)
        assert relative_error(other, theirs) > 1e-2  # the seed matters: the noise really is drawn


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_model_calls_and_timesteps_are_diffusers(name):
    for steps, spacing, karras in [(10, "leading", False), (7, "linspace", False), (25, "leading", True)]:
        if karras and name == "euler_a":
            continue
        config = SchedulerConfig(**LATENT_NO_OFFSET, timestep_spacing=spacing)
        seen, expected = [], []
        SAMPLERS[name](lambda x, t: seen.append(t) or toy_model(x, t), noise_like(), config, steps, progress=False,
                       **({"karras_sigmas": True} if karras else {}))
        reference_run(name, config, lambda x, t: expected.append(t) or toy_model(x, t), noise_like(), steps,
                      karras_sigmas=karras)
        assert len(seen) == len(expected) == num_model_calls(name, steps)
        assert [(t.dtype, t.dim()) for t in seen] == [(e.dtype, 0) for e in expected]
        assert torch.equal(torch.stack(seen), torch.stack(expected))


def test_num_model_calls_of_the_new_samplers():
    assert {name: num_model_calls(name, 25) for name in REFERENCE} == \
        {"euler": 25, "euler_a": 25, "heun": 49, "dpmpp_2m": 25, "unipc": 25}
    assert num_model_calls("heun", 1) == 1


# ---------------------------------------------------------------- caching with every sampler

def tiny_pipe(seed=0, **scheduler):
    config = UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                        attention_levels=(1,), num_classes=4, sample_size=8)
    return Pipeline(randomize(UNet(config), std=0.08, seed=seed), SchedulerConfig(**scheduler), null_class=3)


def options_for(name):
    return {"karras_sigmas": True} if "karras_sigmas" in SAMPLER_OPTIONS[name] else {}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_interval_one_equals_uncached_exactly_for_every_sampler(name):
    pipe = tiny_pipe()
    noise = noise_like(seed=1)
    labels = torch.tensor([0, 2])
    got = pipe.generate(steps=6, sampler=name, noise=noise, class_labels=labels, guidance_scale=2.0,
                        cache_interval=1, seed=5, output="latent", progress=False, **options_for(name))
    model = denoiser(pipe.unet, 2.0)
    with torch.inference_mode():
        expected = SAMPLERS[name](model, noise.clone(), pipe.scheduler, 6, generator=torch.Generator().manual_seed(5),
                                  progress=False, **options_for(name))
    assert torch.equal(got, expected)
    assert pipe.last_run.shallow_calls == 0 and pipe.last_run.full_calls == num_model_calls(name, 6)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("schedule, branch", [("uniform", 0), ("nonuniform", 2), ([0, 1, 5, 6], 1)])
def test_cached_run_equals_hand_driven_full_and_shallow_calls(name, schedule, branch):
    pipe = tiny_pipe(seed=3)
    steps, interval = 10, 3
    noise = noise_like(seed=2)
    labels = torch.tensor([1, 2])
    got = pipe.generate(steps=steps, sampler=name, noise=noise, class_labels=labels, cache_interval=interval,
                        cache_branch=branch, cache_schedule=schedule, seed=6, output="latent", progress=False,
                        **options_for(name))
    calls = num_model_calls(name, steps)
    full = make_schedule(schedule, calls, interval)
    assert pipe.last_run.model_calls == calls and pipe.last_run.full_steps == full
    assert pipe.last_run.full_calls == len(full) < calls
    state = {"call": 0, "cache": None}

    def by_hand(x, t):
        call = state["call"]
        state["call"] += 1
        if call in full:
            out, state["cache"] = pipe.unet.forward_full(x, t, labels, branch=branch)
            return out
        return pipe.unet.forward_shallow(x, t, labels, cache=state["cache"])

    with torch.inference_mode():
        expected = SAMPLERS[name](by_hand, noise.clone(), pipe.scheduler, steps,
                                  generator=torch.Generator().manual_seed(6), progress=False, **options_for(name))
    assert state["call"] == calls and torch.equal(got, expected)
    uncached = pipe.generate(steps=steps, sampler=name, noise=noise, class_labels=labels, seed=6, output="latent",
                             progress=False, **options_for(name))
    assert not torch.equal(got, uncached)  # the shallow calls really ran


# ---------------------------------------------------------------- options at the edge

@pytest.mark.parametrize("sampler, options, message", [
    ("ddim", dict(karras_sigmas=True), "karras_sigmas=True does not apply to the ddim sampler; it applies to "
                                       "dpmpp_2m, euler, heun, unipc"),
    ("euler_a", dict(karras_sigmas=True), "does not apply to the euler_a sampler"),
    ("euler", dict(eta=0.5), "eta=0.5 does not apply to the euler sampler; it applies to ddim"),
    ("plms", dict(eta=1.0), "does not apply to the plms sampler"),
    ("heun", dict(karras_sigmas="yes"), "karras_sigmas must be True or False"),
    ("dpm++", {}, "unknown sampler 'dpm\\+\\+'"),
])
def test_options_a_sampler_does_not_take_are_refused(sampler, options, message):
    pipe = tiny_pipe()
    with pytest.raises(ValueError, match=message):
        pipe.generate(steps=4, sampler=sampler, class_labels=[0], progress=False, **options)


def test_sampler_options_keeps_only_what_the_sampler_takes():
    assert sampler_options("ddim", eta=0.3, karras_sigmas=False) == {"eta": 0.3}
    assert sampler_options("unipc", eta=0.0, karras_sigmas=True) == {"karras_sigmas": True}
    assert sampler_options("euler_a", eta=0.0, karras_sigmas=False) == {}


def test_calibration_of_another_sampler_is_refused():
    pipe = tiny_pipe()
    pipe.calibration = {"sampler": "ddim", "steps": 50}
    with pytest.raises(ValueError, match="measured with the ddim sampler, not dpmpp_2m"):
        pipe.generate(steps=20, sampler="dpmpp_2m", cache_schedule="calibrated", cache_interval=2, class_labels=[0],
                      progress=False)


def test_start_step_continues_the_same_run():
    """img2img's entry point: started at step k from x_t of a full run's step k, a run ends where it ends."""
    config = SchedulerConfig(**LATENT)
    for name, calls_per_step in (("euler", 1), ("heun", 2)):
        states = []
        full = SAMPLERS[name](toy_model, noise_like(), config, 8, progress=False,
                              callback=lambda i, t, x: states.append(x))
        sigmas, _ = sigma_schedule(config, 8)
        k = 3
        x_k = states[calls_per_step * k - 1] / (sigmas[k] ** 2 + 1) ** 0.5  # sigma space -> x_t
        resumed = SAMPLERS[name](toy_model, x_k, config, 8, start_step=k, progress=False)
        assert relative_error(resumed, full) <= 1e-5


# ---------------------------------------------------------------- Stable Diffusion shape, text guidance

PROMPTS = ["a photograph of an astronaut riding a horse", "a red fox in the snow"]


@pytest.fixture(scope="module")
def sd_models(tmp_path_factory):
    """(diffusers StableDiffusionPipeline of tiny random components, the same model converted, its folder)."""
    from test_convert_sd15 import TOKENIZER_DIR, convert_diffusers, tiny_diffusers_pipeline

    if not TOKENIZER_DIR.is_dir():
        pytest.skip(f"SD1.5 tokenizer not found at {TOKENIZER_DIR}")
    reference = tiny_diffusers_pipeline(seed=11)
    reference.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("sd15-solvers")
    return reference, convert_diffusers(reference, folder), folder / "sd-native"


@pytest.mark.parametrize("name, karras", [("dpmpp_2m", True), ("euler", True), ("unipc", False), ("heun", True)])
def test_sd_text_guidance_matches_diffusers_pipeline(sd_models, name, karras):
    """Euler with Karras sigmas feeds both U-Nets fractional timesteps: the embeddings must agree there too.
    The reference scheduler comes from the converted model's scheduler config (its save_pretrained
    folder sets timestep_spacing="leading", so that is what both sides use)."""
    reference, ours, _ = sd_models
    class_name, options = REFERENCE[name]
    original = reference.scheduler
    reference.scheduler = getattr(diffusers, class_name).from_config(ours.scheduler.to_dict(),
                                                                     use_karras_sigmas=karras, **options)
    noise = noise_like((2, 4, 8, 8), seed=1)
    steps = 25 if name == "dpmpp_2m" else 10
    with torch.no_grad():
        cond, uncond = ours.encode_prompt(PROMPTS), ours.encode_prompt(["blurry", "blurry"])
    try:
        expected = reference(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=7.5,
                             num_inference_steps=steps, latents=noise.clone(), output_type="latent").images
    finally:
        reference.scheduler = original
    got = ours.generate(prompt=PROMPTS, negative_prompt="blurry", guidance_scale=7.5, sampler=name, steps=steps,
                        karras_sigmas=karras, noise=noise, output="latent", progress=False)
    error = relative_error(got, expected)
    print(f"SD {name} karras={karras} {steps} steps: relative error {error:.1e}")
    assert error <= RELATIVE_TOLERANCE
    assert ours.last_run.model_calls == num_model_calls(name, steps)


def test_cli_samples_sd_with_dpmpp_karras_and_caching(sd_models, tmp_path, capsys):
    from minidiff.cli import main as cli_main

    _, _, folder = sd_models
    out = tmp_path / "fox.png"
    rc = cli_main(["sample", "--model", str(folder), "--sampler", "dpmpp_2m", "--karras-sigmas", "--steps", "25",
                   "--cache-interval", "3", "--prompt", "x", "--batch-size", "1", "--guidance-scale", "7.5",
                   "--out", str(out)])
    assert rc == 0 and out.exists()
    assert "25 U-Net calls (9 full, 16 shallow at branch 0)" in capsys.readouterr().out
    assert cli_main(["sample", "--model", str(folder), "--sampler", "ddim", "--karras-sigmas", "--steps", "4",
                     "--prompt", "x", "--out", str(out), "--overwrite"]) == 1
    assert "error: --karras-sigmas does not apply to the ddim sampler" in capsys.readouterr().err


def test_unset_timestep_spacing_is_each_samplers_diffusers_default():
    """SD1.5's scheduler_config.json sets no timestep_spacing: diffusers' DDIM/PNDM then space "leading",
    and a scheduler switched by from_config takes its own default ("linspace" for Euler, DPM-Solver...)."""
    from minidiff.schedules import make_timesteps

    raw = {**LATENT, "_class_name": "PNDMScheduler", "skip_prk_steps": True}
    config = SchedulerConfig.from_dict(raw)
    assert config.timestep_spacing is None and "timestep_spacing" not in config.to_dict()
    assert SchedulerConfig.from_dict(config.to_dict()) == config
    pndm = diffusers.PNDMScheduler.from_config(raw)
    ddim = diffusers.DDIMScheduler.from_config(pndm.config)
    ddim.set_timesteps(10)
    assert make_timesteps(config, 10).tolist() == ddim.timesteps.tolist()  # leading
    for class_name, multistep in (("EulerDiscreteScheduler", False), ("DPMSolverMultistepScheduler", True)):
        switched = getattr(diffusers, class_name).from_config(pndm.config)
        assert switched.config.timestep_spacing == "linspace"
        switched.set_timesteps(10)
        sigmas, timesteps = sigma_schedule(config, 10, multistep=multistep)
        assert torch.equal(sigmas, switched.sigmas) and torch.equal(timesteps, switched.timesteps)


@pytest.mark.parametrize("name, karras", [("euler", True), ("heun", False), ("dpmpp_2m", True), ("unipc", False),
                                          ("euler_a", False)])
def test_sd_img2img_matches_diffusers_img2img_pipeline(sd_models, monkeypatch, name, karras):
    """img2img noises the latents to the sampler's own first noise level (Karras sigmas included) and
    draws that noise first from the seeded generator, then Euler ancestral's, as diffusers does."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img

    reference, ours, _ = sd_models
    # minidiff encodes the posterior mean; diffusers samples it unless told to take the mode.
    monkeypatch.setattr(img2img, "retrieve_latents", lambda output, generator=None, sample_mode="sample":
                        output.latent_dist.mode())
    class_name, options = REFERENCE[name]
    scheduler = getattr(diffusers, class_name).from_config(ours.scheduler.to_dict(), **options,
                                                           **({"use_karras_sigmas": True} if karras else {}))
    pipe = StableDiffusionImg2ImgPipeline(**{**reference.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cond, uncond = ours.encode_prompt(PROMPTS), ours.encode_prompt(["", ""])
    expected = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, image=image, strength=0.6, guidance_scale=7.5,
                    num_inference_steps=10, generator=torch.Generator().manual_seed(4), output_type="latent").images
    got = ours.generate(prompt=PROMPTS, init_image=image, strength=0.6, guidance_scale=7.5, sampler=name,
                        karras_sigmas=karras, steps=10, seed=4, output="latent", progress=False)
    error = relative_error(got, expected)
    print(f"SD img2img {name} karras={karras} 10 steps: relative error {error:.1e}")
    assert error <= RELATIVE_TOLERANCE
    assert ours.last_run.model_calls == num_model_calls(name, 6)


@pytest.mark.parametrize("flip_sin_to_cos, freq_shift", [(True, 0), (False, 1)])
def test_timestep_embedding_takes_fractional_t_as_diffusers_does(flip_sin_to_cos, freq_shift):
    """Euler/Heun feed float32 (Karras: fractional) timesteps; integer ones embed as their LongTensor does."""
    from diffusers.models.embeddings import get_timestep_embedding

    from minidiff.unet import timestep_embedding

    t = torch.tensor([999.0, 500.37, 12.6, 0.0296])
    ours = timestep_embedding(t, 64, flip_sin_to_cos, freq_shift)
    theirs = get_timestep_embedding(t, 64, flip_sin_to_cos=flip_sin_to_cos, downscale_freq_shift=freq_shift)
    assert torch.equal(ours, theirs)
    whole = torch.tensor([999, 500, 12, 0])
    assert torch.equal(timestep_embedding(whole.float(), 64, flip_sin_to_cos, freq_shift),
                       timestep_embedding(whole, 64, flip_sin_to_cos, freq_shift))
