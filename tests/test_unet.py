"""The U-Net: parity with diffusers' UNet2DModel, the full/shallow split, full-size configs, errors."""
import json

import pytest
import torch
from conftest import manifest, meta_state_dict, randomize, shared_path, tiny_unet

from minidiff.convert.ddpm import convert
from minidiff import load
from minidiff.checkpoint import CheckpointError, check_state_dict, load_weights
from minidiff.unet import UNet, UNetConfig
from minidiff.formats.unet_keys import config_from_diffusers, diffusers_to_native, pesser_to_native, config_from_pesser

diffusers = pytest.importorskip("diffusers")

# Tiny UNet2DModel configs: attention at different resolutions, several heads, class embeddings, 1-3 layers.
TINY_DDPM = {
    "attn-mid-level-1head": dict(block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=None,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                                 downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6),
    "attn-full-res-4heads-classes": dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8,
                                         down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                                         up_block_types=("UpBlock2D", "AttnUpBlock2D"), num_class_embeds=7),
    "attn-everywhere-3layers": dict(block_out_channels=(32, 32, 64), layers_per_block=3, attention_head_dim=16,
                                    down_block_types=("AttnDownBlock2D",) * 3, up_block_types=("AttnUpBlock2D",) * 3,
                                    downsample_padding=0),
    "no-attn-4levels-classes-1ch": dict(block_out_channels=(32, 64, 64, 96), layers_per_block=2, in_channels=1,
                                        out_channels=1, norm_num_groups=16, num_class_embeds=11,
                                        down_block_types=("DownBlock2D",) * 4, up_block_types=("UpBlock2D",) * 4,
                                        add_attention=False),
}


def _write_diffusers_ddpm(folder, unet, variance="fixed_large", flat=False):
    unet_dir = folder if flat else folder / "unet"
    unet.save_pretrained(unet_dir, safe_serialization=not flat)
    sched = diffusers.DDPMScheduler(variance_type=variance, clip_sample=True)
    sched.save_pretrained(folder if flat else folder / "scheduler")
    return folder


@pytest.mark.parametrize("name", sorted(TINY_DDPM))
def test_unet_matches_diffusers_unet2dmodel_after_convert(tmp_path, name):
    kwargs = TINY_DDPM[name]
    ref = randomize(diffusers.UNet2DModel(sample_size=16, **kwargs), seed=1)
    src = _write_diffusers_ddpm(tmp_path / "src", ref, flat=name.endswith("1ch"))
    convert(src, tmp_path / "native")
    pipe = load(tmp_path / "native")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, ref.config.in_channels, 16, 16, generator=g)
    t = torch.tensor([3, 871])
    labels = torch.tensor([1, 5]) if ref.config.num_class_embeds else None
    with torch.no_grad():
        expected = ref(x, t, class_labels=labels).sample
        got = pipe.unet(x, t, labels)
    assert expected.abs().mean() > 1e-3
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("attention_type", ["self", "transformer"])
def test_full_step_equals_forward_and_shallow_reproduces_it_for_every_branch(attention_type):
    extra = dict(context_dim=16, class_cond="context") if attention_type == "transformer" else {}
    unet = tiny_unet(attention_type=attention_type, **extra)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10, 600]), torch.tensor([0, 4])
    with torch.no_grad():
        ref = unet(x, t, y)
        for branch in range(unet.num_branches):
            out, cache = unet.forward_full(x, t, y, branch=branch)
            assert torch.equal(out, ref)
            assert cache.branch == branch
            shallow = unet.forward_shallow(x, t, y, cache=cache)
            assert (shallow - ref).abs().max().item() <= 1e-6


def test_shallow_runs_only_the_skip_branch():
    """Count the blocks each path runs: shallow at b touches b+1 encoder and b+1 decoder layers."""
    unet = tiny_unet()
    x, t, y = torch.randn(1, 3, 16, 16), 5, torch.tensor([1])
    ran = []
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: ran.append(name))
             for name, m in unet.named_modules() if name.count(".") == 1 and name.split(".")[0] in
             ("input_blocks", "output_blocks") or name == "middle_block"]
    for branch in (0, 2, 4):
        _, cache = unet.forward_full(x, t, y, branch=branch)
        ran.clear()
        unet.forward_shallow(x, t, y, cache=cache)
        n = len(unet.output_blocks)
        assert ran == [f"input_blocks.{i}" for i in range(branch + 1)] + \
            [f"output_blocks.{i}" for i in range(n - 1 - branch, n)]
    for h in hooks:
        h.remove()


def test_cache_is_the_decoder_state_entering_the_branch_layer():
    unet = tiny_unet()
    x, t, y = torch.randn(1, 3, 16, 16), 5, torch.tensor([1])
    seen = {}
    n = len(unet.output_blocks)
    hook = unet.output_blocks[n - 1 - 3].register_forward_pre_hook(lambda m, args: seen.update(entering=args[0]))
    _, cache = unet.forward_full(x, t, y, branch=3)
    hook.remove()
    skip_channels = unet.skip_shapes(16, 16)[3][0]
    assert torch.equal(cache.hidden, seen["entering"][:, :-skip_channels])


def test_macs_shallow_is_much_cheaper_and_bound_formula():
    from minidiff.cache import mac_bound

    unet = tiny_unet()
    m = unet.macs(torch.randn(1, 3, 16, 16), 5, torch.tensor([1]), branch=0)
    assert 0 < m["shallow"] < m["full"] / 4
    ratio = m["shallow"] / m["full"]
    assert mac_bound(1, 0, ratio) == 1.0  # uniform 1:1
    assert mac_bound(1, 4, ratio) == pytest.approx(5 / (1 + 4 * ratio))  # uniform 1:5


@pytest.mark.parametrize("repo,manifest_name,params", [
    ("google--ddpm-cifar10-32", "ddpm-pesser-cifar10.json", 35_746_307),
    ("google--ddpm-ema-church-256", "ddpm-pesser-lsun256.json", 113_673_219),
    ("google--ddpm-ema-bedroom-256", "ddpm-pesser-lsun256.json", 113_673_219),
])
def test_full_size_ddpm_configs_take_diffusers_and_original_layouts(repo, manifest_name, params):
    cfg_dict = json.loads(shared_path(repo, "config.json").read_text())
    config = config_from_diffusers(cfg_dict)
    with torch.device("meta"):
        ref = diffusers.UNet2DModel.from_config(cfg_dict)
        unet = UNet(config)
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in ref.parameters()) == params
    check_state_dict(unet, diffusers_to_native(ref.state_dict(), config))  # zero missing / unexpected / shape
    # the original (pesser / TF) key layout of the real files
    original = meta_state_dict(manifest(manifest_name)["keys"])
    check_state_dict(unet, pesser_to_native(original, config))


def test_pesser_layout_matches_diffusers_layout_numerically():
    """A tiny model in the original DDPM key layout gives the output of the diffusers model it maps to.

    It has CIFAR-10's topology (4 levels, attention at level 1) with fewer channels, so the manifest's
    own pesser -> diffusers table names every key; attention weights take the file's 1x1-conv shape.
    """
    ref = randomize(diffusers.UNet2DModel(
        sample_size=16, block_out_channels=(32, 64, 64, 64), layers_per_block=2, attention_head_dim=None,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6), seed=3)
    sd = ref.state_dict()
    keys = manifest("ddpm-pesser-cifar10.json")["keys"]
    pesser_sd = {name: sd[info["diffusers"]].reshape(sd[info["diffusers"]].shape + (1,) * (len(info["shape"]) -
                                                                                            sd[info["diffusers"]].ndim))
                 for name, info in keys.items()}
    assert len(pesser_sd) == len(sd) == 328
    config = config_from_pesser(32, (1, 2, 2, 2), 2, [8], 16)
    unet = load_weights(UNet(config), pesser_to_native(pesser_sd, config))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([400, 7])
    with torch.no_grad():
        assert (unet(x, t) - ref(x, t).sample).abs().max().item() <= 1e-5


def test_bad_inputs_give_clear_errors(tmp_path):
    unet = tiny_unet()
    x, y = torch.randn(1, 3, 16, 16), torch.tensor([1])
    with pytest.raises(ValueError, match="branch must be an int in \\[0, 8\\]"):
        unet.forward_full(x, 5, y, branch=9)
    with pytest.raises(ValueError, match="smaller than 4"):
        unet(torch.randn(1, 3, 3, 18), 5, y)
    with pytest.raises(ValueError, match="class labels must lie in \\[0, 4\\]"):
        unet(x, 5, torch.tensor([5]))
    with pytest.raises(ValueError, match="class-conditional"):
        unet(x, 5)
    with pytest.raises(ValueError, match="channel_mult"):
        UNetConfig(channel_mult=())
    with pytest.raises(ValueError, match="unknown field"):
        UNetConfig.from_dict({"model_channel": 3})
    sd = unet.state_dict()
    broken = dict(sd)
    broken.pop("out_conv.weight")
    broken["extra.weight"] = torch.zeros(1)
    broken["input_blocks.0.0.weight"] = torch.zeros(1, 1, 3, 3)
    fresh = tiny_unet()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_weights(fresh, broken)
    msg = str(err.value)
    assert "missing key(s): out_conv.weight" in msg and "unexpected key(s): extra.weight" in msg
    assert "input_blocks.0.0.weight: file (1, 1, 3, 3)" in msg
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # nothing assigned


def test_compiled_paths_give_the_same_numbers():
    """UNet.compile wraps both paths; the 'eager' backend checks the wiring without slow codegen."""
    pytest.importorskip("torch._dynamo")
    from minidiff import packing

    unet = tiny_unet(channel_mult=(1, 2), num_res_blocks=1)
    packing.pack(unet)  # compile_paths packs: the same kernels on both sides
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 3])
    with torch.no_grad():
        ref = unet(x, 10, y)
        _, cache = unet.forward_full(x, 10, y, branch=2)
        ref_shallow = unet.forward_shallow(x, 10, y, cache=cache)
        unet.compile_paths(backend="eager")
        assert torch.equal(unet(x, 10, y), ref)
        out, cache = unet.forward_full(x, 10, y, branch=2)
        assert torch.equal(out, ref)
        assert torch.equal(unet.forward_shallow(x, 10, y, cache=cache), ref_shallow)


def test_recording_off_adds_no_tensor_work():
    """The recorder hook is one attribute check per layer: with it off, forward dispatches the same
    tensor ops as with a do-nothing recorder; a recorder that copies adds visible work."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpLog(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    unet = tiny_unet()
    x, y = torch.randn(1, 3, 16, 16), torch.tensor([2])

    def ops_with(recorder):
        unet.recorder = recorder
        try:
            with torch.no_grad(), OpLog() as log:
                unet(x, 7, y)
        finally:
            unet.recorder = None
        return log.ops

    off = ops_with(None)
    assert ops_with(lambda name, h: None) == off
    assert len(ops_with(lambda name, h: h.detach().clone())) > len(off)


def test_macs_count_attention():
    """Attention MACs are counted on CPU too (torch's counter alone scores its CPU kernel as 0)."""
    with_attn = tiny_unet(attention_levels=(0,), mid_attention=False)
    without = tiny_unet(attention_levels=(), mid_attention=False)
    x, y = torch.randn(1, 3, 16, 16), torch.tensor([1])
    extra = with_attn.macs(x, 5, y)["full"] - without.macs(x, 5, y)["full"]
    # 5 full-resolution blocks (2 encoder, 3 decoder) of 256 tokens x 32 channels: q, k, v, out
    # projections (4 C^2 per token) and the QK^T and AV products (2 L C per token)
    tokens, ch = 256, 32
    assert extra == 5 * (4 * ch * ch * tokens + 2 * tokens * tokens * ch)
