import json
import warnings
from pathlib import Path

import pytest
import torch

from minidiff.pipeline import Pipeline
from minidiff.schedules import SchedulerConfig
from minidiff.unet import UNet, UNetConfig

REPO = Path(__file__).resolve().parents[1]
# Small public reference files (configs, the CLIP vocabulary, key manifests; see its SOURCES.md),
# copied into the repository so the suite runs from a clone anywhere.
SHARED = REPO / "tests" / "data" / "reference-configs"

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
torch.set_num_threads(1)  # tiny test models run fastest single-threaded


def shared_path(*parts) -> Path:
    """A file of tests/data/reference-configs; the test is skipped (with the reason) when absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference file {path} is not in tests/data/reference-configs")
    return path


def manifest(name: str) -> dict:
    return json.loads(shared_path("_generated-key-manifests", name).read_text())


def meta_state_dict(keys: dict, prefix: str = "") -> dict:
    """Shape-only tensors for the manifest keys under `prefix` (prefix stripped)."""
    return {k[len(prefix):]: torch.empty(v["shape"], device="meta") for k, v in keys.items()
            if k.startswith(prefix) and "position_ids" not in k}


def randomize(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Non-trivial random weights (zero-initialised output layers would hide mapping errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def randomize_near_unit_norms(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (`randomize`), then GroupNorm/LayerNorm scales near 1, so signals
    survive the whole depth of a network."""
    randomize(module, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
    return module.eval()


def randomize_with_norms(module, seed=0, std=0.05):
    """Random weights everywhere, so zero-initialised outputs cannot hide a mapping error."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if param.ndim == 1 and "norm" in name and name.endswith("weight")
                        else std * noise)
    return module.eval()


def randomize_norms_and_biases(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-default norm weights and biases, so a swapped or skipped norm cannot hide behind 1 and 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1 and name.endswith("weight"):
                param.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.2 * noise)
            else:  # conv / linear weights: perturb the default (fan-in scaled) init
                param.add_(0.2 * param.std() * noise)
    return module.eval()


def check_half_precision_file(full: Path, half: Path, dtype: torch.dtype) -> float:
    """A `--dtype` conversion next to the float32 one of the same source: its model.safetensors is
    about half the size and holds every float weight of the float32 file rounded to `dtype` (exactly),
    everything else unchanged. Returns the size ratio."""
    from safetensors.torch import load_file

    ratio = (half / "model.safetensors").stat().st_size / (full / "model.safetensors").stat().st_size
    assert 0.45 <= ratio <= 0.55, ratio
    exact, rounded = load_file(full / "model.safetensors"), load_file(half / "model.safetensors")
    assert exact.keys() == rounded.keys()
    for key, value in exact.items():
        expected = value.to(dtype) if value.is_floating_point() else value
        assert rounded[key].dtype == expected.dtype and torch.equal(rounded[key], expected), key
    return ratio


def sharpen_attention(module: torch.nn.Module, factor: float = 8.0) -> torch.nn.Module:
    """Scale query and key projections so attention is far from uniform: with small random weights
    every head attends almost evenly and a wrong head split changes outputs by only ~1e-4."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if any(part in name for part in (".to_q.", ".to_k.", ".q.", ".k.")):
                param.mul_(factor)
    return module


def tiny_unet(**overrides):
    """A class-conditional 3-level U-Net with attention at level 1, random weights."""
    cfg = dict(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
               attention_levels=(1,), num_heads=2, num_classes=5)
    cfg.update(overrides)
    return randomize(UNet(UNetConfig(**cfg)))


def tiny_pipeline(attention_type="self", seed=0):
    """A 2-level class-conditional pixel pipeline (null class 3); transformer attention on request."""
    extra = dict(context_dim=16, class_cond="context") if attention_type == "transformer" else {}
    cfg = UNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_levels=(1,), attention_type=attention_type, num_classes=4, sample_size=8, **extra)
    unet = randomize(UNet(cfg), std=0.08, seed=seed)
    sched = SchedulerConfig(beta_schedule="linear", clip_sample=False)
    return Pipeline(unet, sched, null_class=3)


@pytest.fixture(scope="module")
def one_thread():
    """One thread for a module's tests, whatever an earlier test set: tiny models run fastest on one
    thread, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Every available device: CPU always (CI), CUDA as well when one is present."""
    return torch.device(request.param)


def hand_driven_text_to_image(pipe, prompts, noise, steps: int, scale: float) -> torch.Tensor:
    """tokenizer -> text encoder -> DDIM ("leading" spacing, SD's final alpha) with classifier-free
    guidance over the U-Net -> decoder, written out by hand in float64: what a Stable Diffusion
    pipeline's `generate(prompt=prompts, noise=noise, steps=steps, guidance_scale=scale)` must equal."""
    from minidiff.schedules import NoiseSchedule

    n = len(prompts)
    with torch.inference_mode():
        context = pipe.text_encoder(pipe.tokenizer(prompts))
        empty = pipe.text_encoder(pipe.tokenizer([""] * n))
        alphas = NoiseSchedule.from_config(pipe.scheduler).alphas_cumprod.double()
        stride = pipe.scheduler.num_train_timesteps // steps
        timesteps = [i * stride + pipe.scheduler.steps_offset for i in reversed(range(steps))]
        x = noise.double()
        for i, t in enumerate(timesteps):
            tt = torch.full((n,), t)
            eps_c = pipe.denoiser(x.float(), tt, context).double()
            eps_u = pipe.denoiser(x.float(), tt, empty).double()
            eps = eps_u + scale * (eps_c - eps_u)
            a_t = alphas[t]
            a_prev = alphas[timesteps[i + 1]] if i + 1 < steps else alphas[0]
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return ((pipe.autoencoder.decode(x.float()) + 1) / 2).clamp(0, 1)
