"""The U-Net on every available device (CPU in CI, CUDA too when present): parity with diffusers'
UNet2DConditionModel in float32 and half precision, and channels-last inputs."""
import pytest
import torch

from minidiff.checkpoint import load_weights
from minidiff.unet import UNet
from minidiff.formats.unet_keys import config_from_diffusers, diffusers_to_native

diffusers = pytest.importorskip("diffusers")

TINY_SD = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
               in_channels=4, out_channels=4, sample_size=8, norm_num_groups=8,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def pair(device, dtype=torch.float32):
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**TINY_SD).eval()
    with torch.no_grad():  # diffusers zero-initialises output layers; random weights exercise every path
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    config = config_from_diffusers(dict(ref.config, _class_name="UNet2DConditionModel"))
    ours = load_weights(UNet(config), diffusers_to_native(ref.state_dict(), config)).eval()
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    context = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))
    return ref.to(device, dtype), ours.to(device, dtype), x.to(device, dtype), context.to(device, dtype)


def relative_error(got, expected) -> float:
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def test_unet_matches_diffusers_on_device(device):
    ref, ours, x, context = pair(device)
    t = torch.tensor([10, 900], device=device)
    with torch.inference_mode():
        expected = ref(x, t, encoder_hidden_states=context).sample
        assert relative_error(ours(x, t, context), expected) < 1e-5
        assert relative_error(ours(x, t, ours.prepare_context(context)), expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_matches_diffusers(device, dtype):
    """Both half precisions, on CPU as on CUDA (the README: half precision runs on CPU too)."""
    ref, ours, x, context = pair(device, dtype)
    with torch.inference_mode():
        expected = ref(x, 500, encoder_hidden_states=context).sample
        got = ours(x, 500, ours.prepare_context(context))
    assert got.dtype == dtype and relative_error(got, expected) < 3e-2


def test_channels_last_and_contiguous_inputs_give_one_result(device):
    _, ours, x, context = pair(device)
    with torch.inference_mode():
        plain = ours(x, 300, context)
        last = ours(x.contiguous(memory_format=torch.channels_last), 300, context)
    assert plain.is_contiguous() and torch.equal(plain, last)
