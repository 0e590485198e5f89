"""Schedules and samplers: parity with diffusers' DDPM, DDIM and PNDM(skip_prk_steps) schedulers."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

from conftest import SHARED
from minidiff.samplers import SAMPLERS, num_model_calls, sample_ddim, sample_ddpm, sample_plms
from minidiff.schedules import NoiseSchedule, SchedulerConfig, make_timesteps

REFERENCE = SHARED
CIFAR = REFERENCE / "google--ddpm-cifar10-32/scheduler_config.json"
BEDROOM = REFERENCE / "google--ddpm-ema-bedroom-256/scheduler_config.json"
CELEBAHQ = REFERENCE / "CompVis--ldm-celebahq-256/scheduler/scheduler_config.json"
SD15 = REFERENCE / "runwayml--stable-diffusion-v1-5/scheduler/scheduler_config.json"
LDM_DDIM = dict(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195,
                steps_offset=1, set_alpha_to_one=False)
TOL = 1e-5


def load(path):
    if not path.exists():
        pytest.skip(f"reference config {path} not present")
    return json.loads(path.read_text())


def toy_model(x, t):
    """Cheap nonlinear stand-in for a U-Net whose output depends on both x and t."""
    scale = 0.5 + float(t) / 1000
    return torch.tanh(x * scale) + 0.1 * torch.sin(3 * x + float(t) / 100)


def initial_noise(shape=(2, 3, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def diffusers_loop(scheduler, model, x, steps, seed=None, **step_kwargs):
    """The standard diffusers sampling loop; `seed` gives step() a generator."""
    scheduler.set_timesteps(steps)
    if seed is not None:
        step_kwargs["generator"] = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, **step_kwargs).prev_sample
    return x


def max_error(ours, theirs):
    assert ours.shape == theirs.shape and torch.isfinite(ours).all()
    return (ours - theirs).abs().max().item()


# ---------------------------------------------------------------- config and schedule

def test_from_dict_reads_reference_configs_and_ignores_bookkeeping():
    cifar = SchedulerConfig.from_dict(load(CIFAR))
    assert (cifar.variance_type, cifar.clip_sample, cifar.beta_end) == ("fixed_large", True, 0.02)
    sd = SchedulerConfig.from_dict(load(SD15))  # has skip_prk_steps, _class_name, _diffusers_version
    assert (sd.beta_schedule, sd.steps_offset, sd.set_alpha_to_one) == ("scaled_linear", 1, False)
    celeba = SchedulerConfig.from_dict(load(CELEBAHQ))  # legacy timesteps / timestep_values keys
    assert (celeba.beta_start, celeba.num_train_timesteps) == (0.0015, 1000)


def test_to_dict_round_trips():
    config = SchedulerConfig(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", steps_offset=1)
    assert SchedulerConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["prediction_type"] == "v_prediction"


@pytest.mark.parametrize("bad, field", [
    (dict(beta_schedule="cosine"), "beta_schedule"),
    (dict(beta_start=0.03), "beta_start"),
    (dict(beta_end=1.5), "beta_end"),
    (dict(num_train_timesteps=0), "num_train_timesteps"),
    (dict(prediction_type="x0"), "prediction_type"),
    (dict(variance_type="learned_range"), "variance_type"),
    (dict(timestep_spacing="uniform"), "timestep_spacing"),
    (dict(steps_offset=-1), "steps_offset"),
    (dict(clip_sample_range=0.0), "clip_sample_range"),
    (dict(trained_betas=[0.1, 0.2]), "trained_betas"),
    (dict(frobnicate=True), "frobnicate"),
    (dict(thresholding=True), "thresholding"),
])
def test_from_dict_rejects_bad_values_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        SchedulerConfig.from_dict(bad)


def test_harmless_diffusers_keys_are_accepted_at_their_default():
    config = SchedulerConfig.from_dict({"thresholding": False, "rescale_betas_zero_snr": False,
                                        "sample_max_value": 1.0, "skip_prk_steps": True, "beta_end": 0.012})
    assert config.beta_end == 0.012


@pytest.mark.parametrize("extra", [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(trained_betas=torch.linspace(1e-4, 0.03, 1000).tolist()),
    dict(num_train_timesteps=37, set_alpha_to_one=False),
])
def test_noise_schedule_equals_diffusers_bitwise(extra):
    config = SchedulerConfig(**extra)
    ours = NoiseSchedule.from_config(config)
    theirs = DDIMScheduler.from_config(config.to_dict())
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == torch.float32
    assert torch.equal(ours.betas, theirs.betas)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    assert torch.equal(ours.final_alpha_cumprod, theirs.final_alpha_cumprod)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_equal_diffusers_for_every_step_count(spacing, offset):
    config = SchedulerConfig(timestep_spacing=spacing, steps_offset=offset)
    reference = DDIMScheduler.from_config(config.to_dict())
    overshoots = 0
    for steps in range(1, 1000):
        ours = make_timesteps(config, steps).tolist()
        reference.set_timesteps(steps)
        theirs = reference.timesteps.tolist()
        if len(theirs) == steps + 1:
            # diffusers' float arange for "trailing" sometimes adds a bogus final timestep of -1.
            assert spacing == "trailing" and theirs[-1] == -1
            theirs, overshoots = theirs[:-1], overshoots + 1
        assert ours == theirs, steps
        assert len(ours) == steps and ours == sorted(set(ours), reverse=True)
    assert (overshoots > 0) == (spacing == "trailing")


def test_ddpm_timesteps_equal_diffusers():
    for spacing, steps, offset in [("leading", 10, 1), ("linspace", 50, 0), ("trailing", 7, 0), ("leading", 1000, 0)]:
        config = SchedulerConfig(timestep_spacing=spacing, steps_offset=offset)
        reference = DDPMScheduler.from_config(config.to_dict())
        reference.set_timesteps(steps)
        assert make_timesteps(config, steps).tolist() == reference.timesteps.tolist()


@pytest.mark.parametrize("steps", [0, 1001, 2.5, True, None])
def test_make_timesteps_rejects_bad_steps(steps):
    with pytest.raises(ValueError, match="between 1 and num_train_timesteps=1000"):
        make_timesteps(SchedulerConfig(), steps)


def test_offset_past_last_trained_timestep_is_an_error():
    with pytest.raises(ValueError, match="past the last trained timestep 999"):
        make_timesteps(SchedulerConfig(steps_offset=1), 1000)


# ---------------------------------------------------------------- DDPM

@pytest.mark.parametrize("path", [CIFAR, BEDROOM])
@pytest.mark.parametrize("steps", [10, 50, 1000])
def test_ddpm_matches_diffusers_on_google_configs(path, steps):
    raw = load(path)
    x = initial_noise()
    theirs = diffusers_loop(DDPMScheduler.from_config(raw), toy_model, x, steps, seed=1)
    ours = sample_ddpm(toy_model, x, SchedulerConfig.from_dict(raw), steps,
                       generator=torch.Generator().manual_seed(1), progress=False)
    assert max_error(ours, theirs) <= TOL
    assert ours.abs().max() <= 1  # the last step (t=0) returns the clipped x0 itself


@pytest.mark.parametrize("extra", [
    dict(variance_type="fixed_small_log"),
    dict(prediction_type="v_prediction", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(prediction_type="sample", clip_sample=True, clip_sample_range=2.0),
    dict(timestep_spacing="leading", steps_offset=1),  # last step is t=1, so noise is still drawn there
    dict(timestep_spacing="trailing", beta_schedule="squaredcos_cap_v2"),
    dict(timestep_spacing="linspace", variance_type="fixed_large"),
])
def test_ddpm_matches_diffusers_variants(extra):
    config = SchedulerConfig(**extra)
    x = initial_noise()
    for steps in (10, 50):
        theirs = diffusers_loop(DDPMScheduler.from_config(config.to_dict()), toy_model, x, steps, seed=3)
        ours = sample_ddpm(toy_model, x, config, steps, generator=torch.Generator().manual_seed(3), progress=False)
        assert max_error(ours, theirs) <= TOL


def test_ddpm_noise_depends_on_seed():
    config = SchedulerConfig()
    x = initial_noise()
    a, b, c = (sample_ddpm(toy_model, x, config, 10, generator=torch.Generator().manual_seed(s), progress=False)
               for s in (1, 1, 2))
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-2


# ---------------------------------------------------------------- DDIM

@pytest.mark.parametrize("extra, steps, eta", [
    (LDM_DDIM, 10, 0.0),
    (LDM_DDIM, 10, 1.0),
    (LDM_DDIM, 50, 0.0),
    (LDM_DDIM, 50, 1.0),
    (dict(), 1000, 0.0),
    (dict(clip_sample=True), 1000, 0.5),
    (dict(timestep_spacing="linspace"), 50, 0.0),
    (dict(timestep_spacing="trailing", set_alpha_to_one=False), 10, 1.0),
    (dict(prediction_type="v_prediction", timestep_spacing="trailing", beta_schedule="scaled_linear",
          beta_start=0.00085, beta_end=0.012), 10, 0.0),
    (dict(prediction_type="sample", beta_schedule="squaredcos_cap_v2", clip_sample=True), 50, 0.3),
])
def test_ddim_matches_diffusers(extra, steps, eta):
    config = SchedulerConfig(**extra)
    x = initial_noise()
    theirs = diffusers_loop(DDIMScheduler.from_config(config.to_dict()), toy_model, x, steps, seed=5, eta=eta)
    ours = sample_ddim(toy_model, x, config, steps, eta=eta, generator=torch.Generator().manual_seed(5),
                       progress=False)
    assert max_error(ours, theirs) <= TOL


def test_ddim_matches_diffusers_on_celebahq_config():
    raw = load(CELEBAHQ)
    x = initial_noise()
    theirs = diffusers_loop(DDIMScheduler.from_config(raw), toy_model, x, 50)
    ours = sample_ddim(toy_model, x, SchedulerConfig.from_dict(raw), 50, progress=False)
    assert max_error(ours, theirs) <= TOL


def test_ddim_matches_diffusers_with_tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()

    def model(x, t):
        with torch.no_grad():
            return unet(x, t).sample

    config = SchedulerConfig(**LDM_DDIM)
    x = initial_noise((1, 3, 8, 8))
    theirs = diffusers_loop(DDIMScheduler.from_config(config.to_dict()), model, x, 10)
    ours = sample_ddim(model, x, config, 10, progress=False)
    assert max_error(ours, theirs) <= TOL


def test_ddim_eta_zero_is_deterministic_and_eta_one_is_not():
    config = SchedulerConfig(**LDM_DDIM)
    x = initial_noise()
    a = sample_ddim(toy_model, x, config, 10, generator=torch.Generator().manual_seed(1), progress=False)
    b = sample_ddim(toy_model, x, config, 10, generator=torch.Generator().manual_seed(2), progress=False)
    c = sample_ddim(toy_model, x, config, 10, eta=1.0, generator=torch.Generator().manual_seed(2), progress=False)
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-2


@pytest.mark.parametrize("eta", [-0.1, 1.5, "1"])
def test_ddim_rejects_bad_eta(eta):
    with pytest.raises(ValueError, match="eta must be a number between 0"):
        sample_ddim(toy_model, initial_noise(), SchedulerConfig(), 10, eta=eta, progress=False)


# ---------------------------------------------------------------- PLMS

def pndm(config):
    return PNDMScheduler.from_config(dict(config.to_dict(), skip_prk_steps=True))


@pytest.mark.parametrize("steps", [10, 50])
def test_plms_matches_diffusers_on_sd15_config(steps):
    raw = load(SD15)
    x = initial_noise()
    theirs = diffusers_loop(PNDMScheduler.from_config(raw), toy_model, x, steps)
    ours = sample_plms(toy_model, x, SchedulerConfig.from_dict(raw), steps, progress=False)
    assert max_error(ours, theirs) <= TOL


@pytest.mark.parametrize("extra, steps", [
    (dict(), 1000),
    (dict(set_alpha_to_one=False, steps_offset=1), 1),
    (dict(set_alpha_to_one=False, steps_offset=1), 2),
    (dict(set_alpha_to_one=False, steps_offset=1), 3),
    (dict(timestep_spacing="linspace"), 25),
    (dict(timestep_spacing="trailing", set_alpha_to_one=False), 10),
    (dict(prediction_type="v_prediction", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), 20),
])
def test_plms_matches_diffusers_variants(extra, steps):
    config = SchedulerConfig(**extra)
    x = initial_noise()
    theirs = diffusers_loop(pndm(config), toy_model, x, steps)
    ours = sample_plms(toy_model, x, config, steps, progress=False)
    assert max_error(ours, theirs) <= TOL


@pytest.mark.parametrize("spacing, steps, offset", [("leading", 10, 1), ("linspace", 7, 0), ("trailing", 4, 0),
                                                    ("leading", 1, 1), ("leading", 2, 0)])
def test_plms_visits_diffusers_timesteps_and_counts_calls(spacing, steps, offset):
    config = SchedulerConfig(timestep_spacing=spacing, steps_offset=offset)
    visited = []
    sample_plms(lambda x, t: visited.append(t.item()) or toy_model(x, t), initial_noise(), config, steps,
                progress=False)
    reference = pndm(config)
    reference.set_timesteps(steps)
    assert visited == reference.timesteps.tolist()
    assert len(visited) == num_model_calls("plms", steps)


def test_plms_rejects_sample_prediction():
    with pytest.raises(ValueError, match="use sample_ddim"):
        sample_plms(toy_model, initial_noise(), SchedulerConfig(prediction_type="sample"), 10, progress=False)


# ---------------------------------------------------------------- shared behaviour

def test_num_model_calls():
    assert [num_model_calls(name, 20) for name in ("ddpm", "ddim", "plms")] == [20, 20, 21]
    with pytest.raises(ValueError, match="choose one of"):
        num_model_calls("lms", 20)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        num_model_calls("plms", 0)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_sees_every_call_and_model_gets_a_scalar_t(name):
    seen, ts = [], []

    def model(x, t):
        ts.append((t.dtype, t.dim()))
        return toy_model(x, t)

    x = initial_noise()
    out = SAMPLERS[name](model, x, SchedulerConfig(), 5, progress=False,
                         callback=lambda i, t, x: seen.append((i, t, x.clone())))
    assert [i for i, _, _ in seen] == list(range(num_model_calls(name, 5)))
    # Euler/Heun's timesteps are float32, fractional for some spacings, as diffusers' are.
    assert set(ts) == {(torch.float32 if name in ("euler", "euler_a", "heun") else torch.long, 0)}
    assert torch.equal(seen[-1][2], out) and out.dtype == x.dtype


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_keep_float64(name):
    # DDPM and Euler ancestral draw their own noise: only deterministic samplers are compared across dtypes.
    x = initial_noise().double()
    out = SAMPLERS[name](toy_model, x, SchedulerConfig(), 4, progress=False)
    assert out.dtype == torch.float64
    if name not in ("ddpm", "euler_a"):
        reference = SAMPLERS[name](toy_model, x.float(), SchedulerConfig(), 4, progress=False)
        assert (out - reference).abs().max() < 1e-5 * max(1.0, reference.abs().max())  # sigma-space runs reach ~200


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [0, 1001])
def test_samplers_reject_bad_steps(name, steps):
    with pytest.raises(ValueError, match="steps must be an integer between 1 and"):
        SAMPLERS[name](toy_model, initial_noise(), SchedulerConfig(), steps, progress=False)


def test_model_with_wrong_output_shape_is_an_error():
    def learned_variance_model(x, t):
        return torch.cat([x, x], dim=1)

    with pytest.raises(ValueError, match="output shaped like x"):
        sample_ddpm(learned_variance_model, initial_noise(), SchedulerConfig(), 3, progress=False)


def test_keys_diffusers_filled_with_defaults_stay_unset():
    """A config dumped from a loaded diffusers scheduler names its defaulted keys in _use_default_values;
    diffusers' from_config treats them as unset, so DPM++ 2M gets its own spacing, not PNDM's "leading"."""
    from diffusers import DPMSolverMultistepScheduler

    from minidiff.samplers import sigma_schedule

    pndm = PNDMScheduler.from_config(load(SD15))
    dumped = dict(pndm.config)
    assert dumped["timestep_spacing"] == "leading" and "timestep_spacing" in dumped["_use_default_values"]
    config = SchedulerConfig.from_dict(dumped)
    assert config.timestep_spacing is None
    reference = DPMSolverMultistepScheduler.from_config(pndm.config)
    reference.set_timesteps(10)
    _, timesteps = sigma_schedule(config, 10, multistep=True)
    assert torch.equal(torch.as_tensor(timesteps).long(), reference.timesteps.long())
