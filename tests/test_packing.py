"""oneDNN weight packing (minidiff.packing): the same numbers as plain layers, the same parameters and
state_dict, every way out (unpack, .to, gradients, FLOP counting, deepcopy) back to plain weights,
in-place updates (an EMA, an optimizer) seen by the next call, and compiled paths that call the
packed kernels."""
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


def text_unet(seed=0) -> UNet:
    return randomize(UNet(UNetConfig(**TEXT_UNET)), std=0.1, seed=seed).eval()


def inputs(batch=2, size=8):
    torch.manual_seed(3)
    return torch.randn(batch, 4, size, size), torch.tensor([10, 700] * batch)[:batch], torch.randn(batch, 5, 16)


def packing_layers(model):
    return [m for m in model.modules() if isinstance(m, packing._Packing)]


def layer_kinds(model):
    """(packed 3x3 convolutions, packed 1x1 convolutions, packed linear layers)."""
    packed = [m for m in packing_layers(model) if m.packs and m._holds_copy_of(m.weight)]
    convs = [m for m in packed if isinstance(m, torch.nn.Conv2d)]
    return (sum(m._packed.ndim == 4 for m in convs), sum(m._packed.ndim == 2 for m in convs),
            sum(isinstance(m, torch.nn.Linear) for m in packed))


def close(got, want, tol=2e-6):
    return (got - want).abs().max().item() <= tol * want.abs().max().item()


def test_packed_unet_matches_plain_in_every_path_and_packs_every_layer_kind():
    unet = text_unet()
    x, t, ctx = inputs()
    with torch.inference_mode():
        full, cache = unet.forward_full(x, t, ctx, branch=1)
        shallow = unet.forward_shallow(x, t, ctx, cache=cache)
    classes = [type(m) for m in unet.modules()]
    marked = packing.pack(unet)
    assert marked == sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in unet.modules())
    assert packing.packed_layers(unet) == 0  # nothing reordered until a layer first runs
    conv = unet.input_blocks[0][0]
    assert repr(conv) == "InputConv(4, 32, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), packs on next use)"
    with torch.inference_mode():
        full_p, cache_p = unet.forward_full(x, t, ctx, branch=1)
        shallow_p = unet.forward_shallow(x, t, ctx, cache=cache_p)
    assert [type(m) for m in unet.modules()] == classes  # the module tree a user inspects is the same
    assert repr(conv) == "InputConv(4, 32, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), packed)"
    threes, ones, linears = layer_kinds(unet)
    assert threes > 0 and ones > 0 and linears > 0
    assert packing.packed_layers(unet) == marked
    for got, want in ((full_p, full), (cache_p.hidden, cache.hidden), (shallow_p, shallow)):
        assert close(got, want)
    # another batch size and resolution than the one each layer was packed on
    x4, t4, ctx4 = inputs(batch=4, size=16)
    with torch.inference_mode():
        packed_out = unet(x4, t4, ctx4)
    assert packing.unpack(unet) == marked and packing.packed_layers(unet) == 0
    assert repr(conv) == "InputConv(4, 32, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))"
    with torch.inference_mode():
        plain_out = unet(x4, t4, ctx4)
    assert close(packed_out, plain_out)


def test_parameters_and_state_dict_are_the_plain_ones_exactly():
    unet = text_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    layouts = {k: v.is_contiguous() for k, v in unet.state_dict().items()}
    params = dict(unet.named_parameters())
    packing.pack(unet)
    with torch.no_grad():
        unet(*inputs())
    assert packing.packed_layers(unet) > 0
    assert all(p is params[name] for name, p in unet.named_parameters())  # the same objects, as an optimizer holds
    after = unet.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value) and after[key].is_contiguous() == layouts[key], key  # channels-last kept
    assert all(p.requires_grad for p in unet.parameters())


def test_load_state_dict_into_a_packed_model_repacks_the_new_weights():
    unet, other = text_unet(), text_unet(seed=7)
    x, t, ctx = inputs()
    with torch.no_grad():
        want = other(x, t, ctx)
    packing.pack(unet)
    with torch.no_grad():
        unet(x, t, ctx)
        unet.load_state_dict(other.state_dict())
        assert packing.packed_layers(unet) == 0  # every copy is stale now
        got = unet(x, t, ctx)
    assert close(got, want)
    with torch.no_grad():  # assign=True gives the layers new parameters
        unet.load_state_dict(text_unet(seed=9).state_dict(), assign=True)
        assert close(unet(x, t, ctx), text_unet(seed=9)(x, t, ctx))


@pytest.mark.parametrize("optimizer", ["foreach", "fused"])
def test_a_packed_model_updated_in_place_gives_the_plain_models_numbers(optimizer):
    """Issue 22: the trainer sampled its EMA through a packing Pipeline, and the next EMA `lerp_` met
    packed tensors. Now the plain parameter is what every update writes, and the next call repacks.
    Fused optimizers write without bumping version counters, so they are checked too."""
    x, t, ctx = inputs()
    packed, plain, target = text_unet(), text_unet(), text_unet(seed=5)
    marked = packing.pack(packed)
    for step in range(2):
        with torch.no_grad():
            before = packed(x, t, ctx)  # samples (and on the first step, packs)
            assert packing.packed_layers(packed) == marked
            for model in (packed, plain):  # an EMA update, as the trainer's
                for p, q in zip(model.parameters(), target.parameters()):
                    p.lerp_(q, 0.3)
            assert packing.packed_layers(packed) == 0
            got, want = packed(x, t, ctx), plain(x, t, ctx)
        assert close(got, want) and not close(got, before, 1e-2)
        for model in (packed, plain):  # an optimizer step, as training the sampled model itself
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, **{optimizer: True})
            model(x, t, ctx).square().mean().backward()
            opt.step()
        with torch.no_grad():
            got, want = packed(x, t, ctx), plain(x, t, ctx)
        assert close(got, want) and packing.packed_layers(packed) == marked
    layer = packed.out_conv  # a new parameter, and new data under the same parameter
    for replace in (lambda w: torch.nn.Parameter(w * 2), lambda w: setattr(layer.weight, "data", w * 3)):
        replaced = replace(layer.weight.detach().clone())
        if isinstance(replaced, torch.nn.Parameter):
            layer.weight = replaced
        plain.out_conv.weight = torch.nn.Parameter(layer.weight.detach().clone())
        with torch.no_grad():
            assert close(packed(x, t, ctx), plain(x, t, ctx))


def test_to_turns_packing_off():
    unet = text_unet()
    packing.pack(unet)
    with torch.no_grad():
        unet(*inputs())
    unet.to(torch.float64)
    assert packing.packed_layers(unet) == 0 and not any(m.packs for m in packing_layers(unet))
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
        grads.append([xg.grad] + [p.grad for p in model.parameters()])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads))
    assert unet.out_conv.weight.grad.abs().sum() > 0  # weights train too: they are the plain parameters


def test_flop_counting_and_deepcopy_see_the_plain_model():
    unet = text_unet()
    x, t, ctx = inputs()
    plain_macs = unet.macs(x, 10, ctx, branch=1)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, t, ctx)
    plain_flops = counter.get_total_flops()
    marked = packing.pack(unet)
    with torch.no_grad():
        want = unet(x, t, ctx)
    assert packing.packed_layers(unet) == marked
    assert unet.macs(x, 10, ctx, branch=1) == plain_macs
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, t, ctx)
    assert counter.get_total_flops() == plain_flops > 0
    clone = copy.deepcopy(unet)
    assert sum(m.packs for m in packing_layers(clone)) == marked and packing.packed_layers(clone) == 0
    with torch.no_grad():
        assert torch.equal(clone(x, t, ctx), want)
        assert packing.packed_layers(clone) == marked
        for p in clone.parameters():  # the copy's weights are its own, and so are its packed copies
            p.mul_(2)
        assert torch.equal(unet(x, t, ctx), want) and not close(clone(x, t, ctx), want, 1e-2)


def test_default_layout_in_default_layout_out():
    conv = randomize(packing.Conv2d(8, 16, 3, padding=1))
    pointwise = randomize(packing.Conv2d(8, 16, 1))
    x = torch.randn(2, 8, 5, 5)
    for layer in (conv, pointwise):
        with torch.no_grad():
            want = layer(x)
            packing.pack(layer)
            got = layer(x)
        assert got.is_contiguous() and packing.packed_layers(layer) == 1
        assert close(got, want, 1e-6)
        with torch.no_grad():
            assert torch.allclose(layer(x[0]), want[0], rtol=0, atol=1e-6)  # unbatched input: the plain path


def test_layers_that_cannot_pack_are_left_alone():
    model = torch.nn.Sequential(packing.Conv2d(3, 3, 3, padding="same"),
                                packing.Conv2d(3, 3, 3, padding_mode="reflect"),
                                packing.Linear(3, 3).double(), torch.nn.Conv2d(3, 3, 3), torch.nn.Linear(3, 3))
    assert packing.pack(model) == 0 and "pack" not in repr(model)


def test_pipeline_packs_on_cpu_float32_and_compiled_paths_call_packed_kernels():
    pipe = tiny_pipeline()
    layers = packing_layers(pipe.denoiser)
    assert layers and all(m.packs for m in layers)  # the pipeline turned packing on
    pipe.to(pack=False)
    assert not any(m.packs for m in layers)
    pipe.to(pack=True)
    run = dict(batch_size=2, steps=3, class_labels=[0, 1], seed=0, output="latent", progress=False)
    images = pipe.generate(**run)
    assert packing.packed_layers(pipe.denoiser) == len(layers)
    plain = tiny_pipeline()
    plain.to(pack=False)
    want = plain.generate(**run)
    assert (images - want).abs().max().item() <= 1e-5
    pipe.denoiser.compile_paths(backend="eager", fullgraph=True)  # fullgraph: the packed kernels trace as ops
    assert packing.packed_layers(pipe.denoiser) == len(layers)  # all of them, before tracing
    compiled = pipe.generate(**run)
    assert torch.equal(compiled, images)
    # a compiled model still training: the compiled graph's packed kernels see the updated weights
    target = tiny_pipeline(seed=4).denoiser
    with torch.no_grad():
        for model in (pipe.denoiser, plain.denoiser):
            for p, q in zip(model.parameters(), target.parameters()):
                p.lerp_(q, 0.5)
    compiled, want = pipe.generate(**run), plain.generate(**run)
    assert (compiled - want).abs().max().item() <= 1e-5 and not torch.allclose(compiled, images, atol=1e-3)
    assert packing.packed_layers(pipe.denoiser) == len(layers)


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
        conv = packing.Conv2d(1024, 1024, 3, padding=1)
    mapped = load_file(str(tmp_path / "conv.safetensors"))
    conv.load_state_dict(mapped, assign=True)
    x = torch.randn(1, 1024, 4, 4)
    with torch.no_grad():
        want = torch.nn.functional.conv2d(x, weight, None, padding=1)
        warm = packing.Conv2d(1024, 1024, 3, padding=1)  # oneDNN's first packed call allocates for itself
        packing.pack(warm)
        warm(x)
        del warm
        conv.weight.sum()  # every mapped page resident now, as a first forward makes them
        before = resident_mib()
        packing.pack(conv)
        got = conv(x)
        grown = resident_mib() - before
    assert packing.packed_layers(conv) == 1 and close(got, want, 1e-5)
    assert grown < 18, f"resident memory grew by {grown:.0f} MiB for a 36 MiB weight"  # without release: ~36
    assert torch.equal(conv.weight, weight) and torch.equal(mapped["weight"], weight)  # read back from the file


def test_a_torch_without_the_packed_kernels_keeps_plain_layers(monkeypatch):
    """Some torch builds have oneDNN without these kernels: packing is then simply off."""
    assert packing._kernels_work()  # here they run (and give the right numbers)
    monkeypatch.setattr(packing, "_kernels_work", lambda: False)
    assert not packing.available()
    pipe = tiny_pipeline()
    assert not any(m.packs for m in packing_layers(pipe.denoiser))
    assert packing.pack(text_unet()) == 0
