"""oneDNN weight packing (minidiff.packing): the same numbers as plain layers, the same state_dict,
every way out (unpack, .to, gradients, FLOP counting, deepcopy) back to plain weights, and compiled
paths that call the packed kernels."""
import copy
import os
import sys

import pytest
import torch
from conftest import randomize, tiny_pipeline
from torch.utils.flop_counter import FlopCounterMode

from minidiff import packing
from minidiff.unet import UNet, UNetConfig

pytestmark = pytest.mark.skipif(not packing.available(), reason="this torch lacks oneDNN's packed kernels")

# 3x3 and 1x1 convolutions (ResBlock shortcuts, transformer projections), linear layers, cross-attention
TEXT_UNET = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                 attention_levels=(1,), attention_type="transformer", head_channels=8, context_dim=16, norm_groups=8)


def text_unet() -> UNet:
    return randomize(UNet(UNetConfig(**TEXT_UNET)), std=0.1).eval()


def inputs(batch=2, size=8):
    torch.manual_seed(3)
    return torch.randn(batch, 4, size, size), torch.tensor([10, 700] * batch)[:batch], torch.randn(batch, 5, 16)


def layer_kinds(model):
    """(packed 3x3 convolutions, packed 1x1 convolutions, packed linear layers)."""
    packed = [m for m in model.modules() if isinstance(m, packing._Packable) and m._is_packed()]
    convs = [m for m in packed if isinstance(m, torch.nn.Conv2d)]
    return (sum(m.weight.ndim == 4 for m in convs), sum(m.weight.ndim == 2 for m in convs),
            sum(isinstance(m, torch.nn.Linear) for m in packed))


def test_packed_unet_matches_plain_in_every_path_and_packs_every_layer_kind():
    unet = text_unet()
    x, t, ctx = inputs()
    with torch.inference_mode():
        full, cache = unet.forward_full(x, t, ctx, branch=1)
        shallow = unet.forward_shallow(x, t, ctx, cache=cache)
    marked = packing.pack(unet)
    assert marked == sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in unet.modules())
    assert packing.packed_layers(unet) == 0  # nothing reordered until a layer first runs
    with torch.inference_mode():
        full_p, cache_p = unet.forward_full(x, t, ctx, branch=1)
        shallow_p = unet.forward_shallow(x, t, ctx, cache=cache_p)
    threes, ones, linears = layer_kinds(unet)
    assert threes > 0 and ones > 0 and linears > 0
    assert packing.packed_layers(unet) == marked
    for got, want in ((full_p, full), (cache_p.hidden, cache.hidden), (shallow_p, shallow)):
        assert (got - want).abs().max().item() <= 2e-6 * want.abs().max().item()
    # another batch size and resolution than the one each layer was packed on
    x4, t4, ctx4 = inputs(batch=4, size=16)
    with torch.inference_mode():
        packed_out = unet(x4, t4, ctx4)
    packing.unpack(unet)
    with torch.inference_mode():
        plain_out = unet(x4, t4, ctx4)
    assert (packed_out - plain_out).abs().max().item() <= 2e-6 * plain_out.abs().max().item()


def test_state_dict_and_layout_survive_pack_and_unpack_exactly():
    unet = text_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    layouts = {k: v.is_contiguous() for k, v in unet.state_dict().items()}
    packing.pack(unet)
    with torch.no_grad():
        unet(*inputs())
    after = unet.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert not after[key].is_mkldnn and after[key].shape == value.shape and torch.equal(after[key], value), key
    assert packing.unpack(unet) > 0 and packing.packed_layers(unet) == 0
    assert not any(isinstance(m, packing._Packable) for m in unet.modules())
    plain = unet.state_dict()
    for key, value in before.items():
        assert torch.equal(plain[key], value) and plain[key].is_contiguous() == layouts[key], key  # channels-last kept
    assert all(p.requires_grad for p in unet.parameters())


def test_load_state_dict_into_a_packed_model_repacks_the_new_weights():
    unet, other = text_unet(), randomize(UNet(UNetConfig(**TEXT_UNET)), std=0.1, seed=7).eval()
    x, t, ctx = inputs()
    with torch.no_grad():
        want = other(x, t, ctx)
    packing.pack(unet)
    with torch.no_grad():
        unet(x, t, ctx)
        unet.load_state_dict(other.state_dict())
        got = unet(x, t, ctx)
    assert (got - want).abs().max().item() <= 2e-6 * want.abs().max().item()


def test_to_returns_layers_to_plain_weights():
    unet = text_unet()
    packing.pack(unet)
    with torch.no_grad():
        unet(*inputs())
    unet.to(torch.float64)
    assert packing.packed_layers(unet) == 0 and not any(isinstance(m, packing._Packable) for m in unet.modules())
    assert all(p.dtype == torch.float64 for p in unet.parameters())
    x, t, ctx = inputs()
    with torch.no_grad():
        unet(x.double(), t, ctx.double())


def test_gradients_through_a_packed_model_are_those_of_the_plain_one():
    """Training or guidance gradients take the plain weights: oneDNN's packed kernels have no backward."""
    unet, twin = text_unet(), text_unet()
    packing.pack(unet)
    x, t, ctx = inputs()
    with torch.no_grad():
        unet(x, t, ctx)  # packs every layer
    grads = []
    for model in (unet, twin):
        xg = x.clone().requires_grad_()
        model(xg, t, ctx).square().mean().backward()
        grads.append(xg.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    # biases still train; packed weights are frozen until unpacked
    bias = next(m for m in unet.modules() if isinstance(m, packing._PackableConv2d)).bias
    assert bias.grad is not None and bias.grad.abs().sum() > 0


def test_flop_counting_and_deepcopy_see_the_plain_model():
    unet = text_unet()
    x, t, ctx = inputs()
    plain_macs = unet.macs(x, 10, ctx, branch=1)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, t, ctx)
    plain_flops = counter.get_total_flops()
    packing.pack(unet)
    with torch.no_grad():
        want = unet(x, t, ctx)
    assert packing.packed_layers(unet) > 0
    assert unet.macs(x, 10, ctx, branch=1) == plain_macs
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, t, ctx)
    assert counter.get_total_flops() == plain_flops > 0
    clone = copy.deepcopy(unet)
    assert packing.packed_layers(clone) == packing.packed_layers(unet) > 0
    with torch.no_grad():
        assert torch.equal(clone(x, t, ctx), want)


def test_default_layout_in_default_layout_out():
    conv = randomize(torch.nn.Conv2d(8, 16, 3, padding=1))
    pointwise = randomize(torch.nn.Conv2d(8, 16, 1))
    x = torch.randn(2, 8, 5, 5)
    for layer in (conv, pointwise):
        with torch.no_grad():
            want = layer(x)
            packing.pack(layer)
            got = layer(x)
        assert got.is_contiguous() and packing.packed_layers(layer) == 1
        assert (got - want).abs().max().item() <= 1e-6 * want.abs().max().item()
        with torch.no_grad():
            assert torch.allclose(layer(x[0]), want[0], rtol=0, atol=1e-6)  # unbatched input: the plain path


def test_layers_that_cannot_pack_are_left_alone():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding="same"), torch.nn.Conv2d(3, 3, 3, padding_mode="reflect"),
                                torch.nn.Conv1d(3, 3, 3), torch.nn.Linear(3, 3).double())
    assert packing.pack(model) == 0


def test_pipeline_packs_on_cpu_float32_and_compiled_paths_call_packed_kernels():
    pipe = tiny_pipeline()
    assert packing.pack(pipe.unet) == 0  # nothing left to mark: the pipeline did it
    pipe.to(pack=False)
    assert not any(isinstance(m, packing._Packable) for m in pipe.unet.modules())
    pipe.to()
    images = pipe.generate(batch_size=2, steps=3, class_labels=[0, 1], seed=0, output="latent", progress=False)
    assert packing.packed_layers(pipe.unet) > 0
    plain = tiny_pipeline()
    plain.to(pack=False)
    want = plain.generate(batch_size=2, steps=3, class_labels=[0, 1], seed=0, output="latent", progress=False)
    assert (images - want).abs().max().item() <= 1e-5
    marked = sum(isinstance(m, packing._Packable) for m in pipe.unet.modules())
    pipe.unet.compile_paths(backend="eager", fullgraph=True)  # fullgraph: the packed kernels trace as ops
    assert packing.packed_layers(pipe.unet) == marked  # all of them, before tracing
    compiled = pipe.generate(batch_size=2, steps=3, class_labels=[0, 1], seed=0, output="latent", progress=False)
    assert torch.equal(compiled, images)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT is Linux's")
def test_packing_a_memory_mapped_weight_does_not_keep_both_copies_resident(tmp_path):
    """minidiff.load maps the file; once a layer packs, its mapped pages are given back, so a
    loaded model's resident memory does not double. Re-reading the mapped tensor still works."""
    from safetensors.torch import load_file, save_file

    def resident_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    torch.manual_seed(0)
    weight = torch.randn(1024, 1024, 3, 3) * 0.01  # 36 MiB
    save_file({"weight": weight, "bias": torch.zeros(1024)}, tmp_path / "conv.safetensors")
    with torch.device("meta"):
        conv = torch.nn.Conv2d(1024, 1024, 3, padding=1)
    mapped = load_file(str(tmp_path / "conv.safetensors"))
    conv.load_state_dict(mapped, assign=True)
    x = torch.randn(1, 1024, 4, 4)
    with torch.no_grad():
        want = torch.nn.functional.conv2d(x, weight, None, padding=1)
        warm = torch.nn.Conv2d(1024, 1024, 3, padding=1)  # oneDNN's first packed call allocates for itself
        packing.pack(warm)
        warm(x)
        del warm
        conv.weight.sum()  # every mapped page resident now, as a first forward makes them
        before = resident_mib()
        packing.pack(conv)
        got = conv(x)
        grown = resident_mib() - before
    assert packing.packed_layers(conv) == 1 and (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert grown < 18, f"resident memory grew by {grown:.0f} MiB for a 36 MiB weight"  # without release: ~36
    assert torch.equal(mapped["weight"], weight)  # the mapping still reads back from the file


def test_a_torch_without_the_packed_kernels_keeps_plain_layers(monkeypatch):
    """Some torch builds have oneDNN without these kernels: packing is then simply off."""
    assert packing._kernels_work()  # here they run (and give the right numbers)
    monkeypatch.setattr(packing, "_kernels_work", lambda: False)
    assert not packing.available()
    pipe = tiny_pipeline()
    assert not any(isinstance(m, packing._Packable) for m in pipe.unet.modules())
    assert packing.pack(text_unet()) == 0
