"""Configs the supported families can express beyond SD1.5's own: per-level attention heads and head
widths, autoencoders with any GroupNorm group count, and inputs whose size is no multiple of the
network's downsampling. Parity with diffusers on tiny random models, minidiff models built from
their configs directly and weights mapped by the existing key functions."""
import dataclasses
import json

import pytest
import torch
from conftest import randomize_near_unit_norms

from minidiff.autoencoder import Autoencoder, AutoencoderConfig
from minidiff.unet import UNet, UNetConfig
from minidiff.formats.unet_keys import config_from_diffusers, diffusers_to_native
from minidiff.formats.vae_keys import diffusers_to_native as vae_diffusers_to_native

diffusers = pytest.importorskip("diffusers")


def max_err(a, b):
    return (a - b).abs().max().item()


# Tiny UNet2DConditionModels: per-level head counts (diffusers' attention_head_dim as a list, which
# for cross-attention blocks counts heads), the middle block taking the deepest level's.
CONDITIONAL = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                   norm_num_groups=8)
PER_LEVEL = {"1-4-8": [1, 4, 8], "8-2-1": [8, 2, 1], "4-4-4": [4, 4, 4]}


def _conditional(heads, seed=0, **overrides):
    """(diffusers reference, minidiff U-Net with its weights) for per-level `heads`."""
    kwargs = {**CONDITIONAL, "attention_head_dim": heads, **overrides}
    ref = randomize_near_unit_norms(diffusers.UNet2DConditionModel(**kwargs), seed)
    base = config_from_diffusers({**kwargs, "attention_head_dim": 1})  # everything but the heads
    config = dataclasses.replace(base, num_heads=tuple(heads))
    unet = UNet(config)
    unet.load_state_dict(diffusers_to_native(ref.state_dict(), config))
    return ref, unet.eval()


@pytest.mark.parametrize("name", sorted(PER_LEVEL))
def test_per_level_head_counts_match_unet2dconditionmodel(name):
    ref, unet = _conditional(PER_LEVEL[name], seed=len(name))
    g = torch.Generator().manual_seed(0)
    x, t, context = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 950]), torch.randn(2, 7, 24, generator=g)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context).sample
        error = max_err(unet(x, t, context), expected)
        # the control: the same weights with one head count everywhere give another output
        uniform = UNet(dataclasses.replace(unet.config, num_heads=2))
        uniform.load_state_dict(unet.state_dict())
        control = max_err(uniform(x, t, context), expected)
    print(f"heads {name}: error {error:.2e}, one head count instead: {control:.2e}")
    assert expected.abs().mean() > 0.05
    assert error <= 1e-5 and control > 1e-3


def test_per_level_head_widths_equal_the_head_counts_they_imply():
    """openaimodel's num_head_channels, per level: heads = channels // width at each level."""
    _, by_count = _conditional([2, 4, 1])
    by_width = UNet(dataclasses.replace(by_count.config, num_heads=None, head_channels=(16, 16, 64)))
    by_width.load_state_dict(by_count.state_dict())
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 3, 24)
    with torch.no_grad():
        assert torch.equal(by_width(x, t, context), by_count(x, t, context))
    heads = [m.attn1.heads for m in by_width.modules() if hasattr(m, "attn1")]
    assert sorted(set(heads)) == [1, 2, 4]


def test_per_level_config_round_trips_and_old_configs_load_unchanged():
    config = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(0, 1), num_heads=[2, 4])
    assert config.num_heads == (2, 4)
    assert UNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    old = {"model_channels": 32, "channel_mult": [1, 2], "num_heads": 4, "head_channels": None}
    assert UNetConfig.from_dict(old).heads_for(64, 1) == 4
    assert AutoencoderConfig.from_dict({"base_channels": 32, "channel_mult": [1, 2]}).norm_groups == 32


@pytest.mark.parametrize("bad, fragment", [
    (dict(num_heads=[2]), "one positive int per level (2)"),
    (dict(num_heads=[2, 0]), "num_heads must be"),
    (dict(head_channels=[16, True]), "head_channels must be"),
    (dict(num_heads=[3, 4]), "cannot be split into 3 heads"),
])
def test_bad_per_level_heads_are_clear_errors(bad, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(0, 1), **bad)


# -- sizes that are no multiple of the downsampling (diffusers' forward_upsample_size) ------------

@pytest.mark.parametrize("size", [(9, 11), (5, 8), (13, 6), (8, 8)])
def test_odd_sizes_match_unet2dconditionmodel(size):
    ref, unet = _conditional([2, 4, 8], seed=3)
    g = torch.Generator().manual_seed(1)
    x, t, context = torch.randn(2, 4, *size, generator=g), torch.tensor([5, 950]), torch.randn(2, 7, 24, generator=g)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context).sample
        got = unet(x, t, context)
    assert got.shape == expected.shape == x.shape
    assert max_err(got, expected) <= 1e-5


@pytest.mark.parametrize("padding", [0, 1])
def test_odd_sizes_full_and_shallow_paths_equal_forward(padding):
    """Every cache branch: forward_full's output equals forward, and a shallow step on the same input
    reusing that cache equals it too (the deep state it reuses is exactly what it would recompute)."""
    config = UNetConfig(model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1,),
                        norm_groups=8, downsample_padding=padding, num_heads=(1, 2, 4))
    unet = randomize_near_unit_norms(UNet(config), seed=4)
    x, t = torch.randn(2, 3, 11, 7), torch.tensor([3, 700])
    assert [s[1:] for s in unet.skip_shapes(11, 7)][-1] == ((3, 2) if padding else (2, 1))
    with torch.no_grad():
        expected = unet(x, t)
        for branch in range(unet.num_branches):
            out, cache = unet.forward_full(x, t, branch=branch)
            assert torch.equal(out, expected), branch
            assert max_err(unet.forward_shallow(x, t, cache=cache), expected) <= 1e-6, branch


def test_inputs_smaller_than_the_downsampling_are_a_clear_error():
    unet = UNet(UNetConfig(model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8))
    with pytest.raises(ValueError, match="smaller than 4"):
        unet(torch.randn(1, 3, 3, 9), 5)


# -- UNet2DModel: head widths per level and group counts ------------------------------------------

def test_head_width_and_group_count_match_unet2dmodel():
    kwargs = dict(sample_size=16, block_out_channels=(16, 32, 48), layers_per_block=1, attention_head_dim=8,
                  norm_num_groups=8, down_block_types=("AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"))
    ref = randomize_near_unit_norms(diffusers.UNet2DModel(**kwargs), seed=6)
    config = config_from_diffusers(kwargs)
    unet = UNet(config)
    unet.load_state_dict(diffusers_to_native(ref.state_dict(), config))
    assert [config.heads_for(c, level) for level, c in enumerate(config.level_channels)] == [2, 4, 6]
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 871])
    with torch.no_grad():
        expected = ref(x, t).sample
        assert expected.abs().mean() > 1e-3
        assert max_err(unet.eval()(x, t), expected) <= 1e-5


# -- autoencoders with any group count ------------------------------------------------------------

@pytest.mark.parametrize("groups", [8, 4, 16])
def test_autoencoder_group_counts_match_autoencoderkl(groups):
    ref = randomize_near_unit_norms(diffusers.AutoencoderKL(
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=groups,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2), seed=groups)
    config = AutoencoderConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=groups,
                               scale_factor=ref.config.scaling_factor)
    model = Autoencoder(config)
    model.load_weights(vae_diffusers_to_native(ref.state_dict(), config))
    model.eval()
    g = torch.Generator().manual_seed(2)
    images, latents = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        mean = ref.encode(images).latent_dist.mean * config.scale_factor
        encode_error = max_err(model.encode(images), mean)
        decode_error = max_err(model.decode(latents), ref.decode(latents / config.scale_factor).sample)
        # the control: 32-group norms are what a config without norm_groups would have built
        if groups != 32:
            assert model.encoder.norm_out.num_groups == groups
    assert encode_error <= 1e-5 and decode_error <= 1e-5, (encode_error, decode_error)


def test_autoencoder_group_count_must_divide_the_widths():
    with pytest.raises(ValueError, match="norm_groups=12"):
        AutoencoderConfig(base_channels=16, channel_mult=(1, 2), norm_groups=12)
    with pytest.raises(ValueError, match="norm_groups must be a positive int"):
        AutoencoderConfig(base_channels=16, channel_mult=(1, 2), norm_groups=0)
