"""convert/ddpm.py on files: the original DDPM checkpoints (pesser's TF port) and google's flat folders,
through the command line, checked against diffusers' UNet2DModel; bad input leaves DST alone."""
import json
import re

import pytest
import torch
from conftest import check_half_precision_file, manifest, meta_state_dict, randomize, shared_path

from minidiff.convert.ddpm import _pesser_config, main
from minidiff import load
from minidiff.checkpoint import check_state_dict
from minidiff.unet import UNet
from minidiff.formats.unet_keys import config_from_diffusers, pesser_to_native

diffusers = pytest.importorskip("diffusers")

# The two public DDPM architectures (google's config.json) with fewer channels.
TOPOLOGY = {
    "cifar10": dict(repo="google--ddpm-cifar10-32", manifest="ddpm-pesser-cifar10.json",
                    channels=[32, 64, 64, 64], size=16, variance="fixed_large", params=35_746_307),
    "lsun": dict(repo="google--ddpm-ema-church-256", manifest="ddpm-pesser-lsun256.json",
                 channels=[32, 32, 64, 64, 128, 128], size=32, variance="fixed_small", params=113_673_219),
}
DEPRECATED_ATTENTION = [(".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."),
                        (".to_out.0.", ".proj_attn.")]


def max_err(a, b):
    return (a - b).abs().max().item()


def _tiny_google(name, seed=0):
    """google's UNet2DModel config (block types, padding, time embedding) with fewer channels."""
    config = json.loads(shared_path(TOPOLOGY[name]["repo"], "config.json").read_text())
    config.update(block_out_channels=TOPOLOGY[name]["channels"], sample_size=TOPOLOGY[name]["size"])
    return config, randomize(diffusers.UNet2DModel.from_config(config), seed=seed)


def _pesser_state_dict(name, model):
    """The model's weights under the original file's names (the manifest's table); attention as 1x1 convs."""
    sd = model.state_dict()
    table = manifest(TOPOLOGY[name]["manifest"])["keys"]
    original = {}
    for key, info in table.items():
        weight = sd[info["diffusers"]]
        original[key] = weight.reshape(weight.shape + (1,) * (len(info["shape"]) - weight.ndim)).clone()
    assert len(original) == len(sd) and any(v.ndim == 4 and "attn" in k for k, v in original.items())
    return original


def _check_same_output(pipe, model, size):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 3])
    with torch.no_grad():
        expected = model(x, t).sample
        err = max_err(pipe.unet(x, t), expected)
    assert expected.abs().mean() > 1e-2
    return err


def _fails(capsys, argv, *patterns):
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    for pattern in patterns:
        assert pattern in err, err


@pytest.mark.parametrize("name", sorted(TOPOLOGY))
def test_original_ddpm_file_converts_and_matches_diffusers(tmp_path, name):
    config, model = _tiny_google(name, seed=2)
    src = tmp_path / "ema_diffusion_model" / "model-790000.ckpt"
    src.parent.mkdir()
    torch.save(_pesser_state_dict(name, model), src)  # a plain state dict, as pesser's files
    assert main([str(src), str(tmp_path / "native")]) == 0
    pipe = load(tmp_path / "native")
    err = _check_same_output(pipe, model, TOPOLOGY[name]["size"])
    print(f"{name} original file vs diffusers: {err:.2e}")
    assert err <= 1e-5
    sched = pipe.scheduler
    assert (sched.beta_schedule, sched.beta_start, sched.beta_end, sched.num_train_timesteps, sched.clip_sample,
            sched.variance_type) == ("linear", 1e-4, 0.02, 1000, True, TOPOLOGY[name]["variance"])
    assert pipe.unet.config.attention_levels == config_from_diffusers(config).attention_levels


def test_bfloat16_file_through_minidiff_convert_ddpm(tmp_path):
    from minidiff.cli import convert_main

    _, model = _tiny_google("cifar10", seed=2)
    src = tmp_path / "model-790000.ckpt"
    torch.save(_pesser_state_dict("cifar10", model), src)
    assert main([str(src), str(tmp_path / "full")]) == 0
    assert convert_main(["ddpm", str(src), str(tmp_path / "half"), "--dtype", "bfloat16"]) == 0
    ratio = check_half_precision_file(tmp_path / "full", tmp_path / "half", torch.bfloat16)
    full, half = load(tmp_path / "full"), load(tmp_path / "half")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = full.unet(x, torch.tensor([999, 3]))
        err = max_err(half.unet(x, torch.tensor([999, 3])), expected) / expected.abs().max().item()
    print(f"ddpm --dtype bfloat16: file {ratio:.3f}x, U-Net loaded in float32 vs the float32 file {err:.1e} relative")
    assert err <= 1e-2  # weights rounded to 8 significant bits (measured 2.4e-3)


def test_google_flat_folder_with_deprecated_attention_names_converts(tmp_path):
    """The 2022 google/ddpm-* layout: config, scheduler and .bin side by side, `query/key/value/proj_attn`."""
    config, model = _tiny_google("cifar10", seed=4)
    sd = {}
    for key, value in model.state_dict().items():
        for new, old in DEPRECATED_ATTENTION:
            key = key.replace(new, old) if ".attentions." in key else key
        sd[key] = value
    assert any(re.search(r"mid_block\.attentions\.0\.query\.weight$", k) for k in sd)
    assert sd["mid_block.attentions.0.proj_attn.weight"].ndim == 2
    src = tmp_path / "ddpm-cifar10-32"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    scheduler = shared_path("google--ddpm-cifar10-32", "scheduler_config.json")
    (src / "scheduler_config.json").write_text(scheduler.read_text())
    torch.save(sd, src / "diffusion_pytorch_model.bin")
    assert main([str(src), str(tmp_path / "native")]) == 0
    pipe = load(tmp_path / "native")
    err = _check_same_output(pipe, model, 16)
    print(f"google flat folder (deprecated attention names) vs diffusers: {err:.2e}")
    assert err <= 1e-5
    assert (pipe.scheduler.variance_type, pipe.scheduler.clip_sample) == ("fixed_large", True)


@pytest.mark.parametrize("name", sorted(TOPOLOGY))
def test_full_size_original_layouts_map_through_the_converter(name):
    """The real files' keys (shape only): the converter reads the architecture off them and maps every key."""
    state_dict = meta_state_dict(manifest(TOPOLOGY[name]["manifest"])["keys"])
    config = _pesser_config(state_dict)
    google = config_from_diffusers(json.loads(shared_path(TOPOLOGY[name]["repo"], "config.json").read_text()))
    ignore = {"dropout"}  # google's configs leave it out; pesser's training configs say 0.1 (CIFAR) / 0.0 (LSUN)
    assert {k: v for k, v in config.to_dict().items() if k not in ignore} == \
        {k: v for k, v in google.to_dict().items() if k not in ignore}
    with torch.device("meta"):
        unet = UNet(config)
    check_state_dict(unet, pesser_to_native(state_dict, config), f"{name} U-Net")
    assert sum(p.numel() for p in unet.parameters()) == TOPOLOGY[name]["params"]


def test_bad_inputs_are_clear_errors_and_leave_dst_alone(tmp_path, capsys):
    config, model = _tiny_google("cifar10")
    original = _pesser_state_dict("cifar10", model)
    dst = tmp_path / "native"
    _fails(capsys, [tmp_path / "absent", dst], "does not exist")
    folder = tmp_path / "no-weights"
    folder.mkdir()
    _fails(capsys, [folder, dst], "not a diffusers DDPM folder")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    _fails(capsys, [folder, dst], "no weights in")
    ldm = tmp_path / "ldm.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(3, 32, 3, 3)}}, ldm)
    _fails(capsys, [ldm, dst], "not an original DDPM checkpoint", "convert/ldm.py")
    assert not dst.exists()

    extra = tmp_path / "extra.ckpt"
    torch.save({**original, "extra.weight": torch.zeros(2)}, extra)
    _fails(capsys, [extra, dst], "unexpected key(s): extra.weight")
    misshaped = tmp_path / "misshaped.ckpt"
    torch.save({**original, "conv_out.weight": torch.zeros(3, 32, 1, 1)}, misshaped)
    _fails(capsys, [misshaped, dst], "out_conv.weight: file (3, 32, 1, 1) vs model (3, 32, 3, 3)")
    missing = tmp_path / "missing.ckpt"
    torch.save({k: v for k, v in original.items() if k != "mid.attn_1.q.weight"}, missing)
    _fails(capsys, [missing, dst], "missing key(s): middle_block.1.to_q.weight")
    assert not dst.exists()

    good = tmp_path / "good.ckpt"
    torch.save(original, good)
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    _fails(capsys, [good, dst], "exists; pass --overwrite")
    _fails(capsys, [good, dst, "--overwrite"], "is not a minidiff model but holds 1 other entries (keep.txt)")
    assert [p.name for p in dst.iterdir()] == ["keep.txt"] and (dst / "keep.txt").read_text() == "mine"
    assert main([str(good), str(dst / "model")]) == 0
    _fails(capsys, [misshaped, dst / "model", "--overwrite"], "mis-shaped")
    assert load(dst / "model").unet.state_dict().keys()  # a failed conversion leaves the previous model whole
    assert main([str(good), str(dst / "model"), "--overwrite"]) == 0
    dst = dst / "model"
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors", "scheduler.json"]
