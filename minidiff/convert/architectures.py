"""The U-Net architectures of named public checkpoints, defined once for examples and benchmarks
(random weights are enough to count MACs or time a step)."""
from __future__ import annotations

from ..unet import UNetConfig
from . import ldm, sd15

# google/ddpm-cifar10-32 (Ho et al. 2020)
DDPM_CIFAR10 = UNetConfig(model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_levels=(1,),
                          dropout=0.1, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                          sample_size=32)
# google/ddpm-ema-church-256 (bedroom has the same architecture)
DDPM_CHURCH = UNetConfig(model_channels=128, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                         attention_levels=(4,), norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False,
                         freq_shift=1, sample_size=256)


def architecture(name: str) -> UNetConfig:
    """"ddpm-cifar10", "ddpm-church", "sd15" (v1-inference.yaml) or "cin256-v2" (LDM's class-conditional)."""
    if name == "ddpm-cifar10":
        return DDPM_CIFAR10
    if name == "ddpm-church":
        return DDPM_CHURCH
    if name == "sd15":
        return sd15.config_from_yaml().unet
    if name == "cin256-v2":
        return ldm.load_config().unet
    raise ValueError(f"unknown architecture {name!r}; choose one of {NAMES}")


NAMES = ("ddpm-cifar10", "ddpm-church", "sd15", "cin256-v2")
