"""convert/ldm.py: CompVis class-conditional LDM checkpoints (cin256-v2's family), checked against the
original CompVis modules and DDIM sampler on tiny models, plus the full-size key layout."""
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import (check_half_precision_file, manifest, meta_state_dict, randomize_near_unit_norms,
                      shared_path)
from torch import nn

from minidiff.convert.ldm import CIN256_V2, check_family, convert, ldm_config, load_config, main, map_checkpoint
from minidiff.convert.compvis import YamlError, YamlSubsetError, ema_key, read_block_yaml, read_yaml
from minidiff import load
from minidiff.autoencoder import Autoencoder
from minidiff.checkpoint import check_state_dict
from minidiff.unet import UNet

yaml = pytest.importorskip("yaml")
pytest.importorskip("ldm")
from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402
from ldm.modules.diffusionmodules.model import Decoder, Encoder  # noqa: E402
from ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402
from ldm.modules.diffusionmodules.util import make_beta_schedule  # noqa: E402

SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")
DDCONFIG = dict(double_z=False, z_channels=3, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)
# Tiny openaimodel U-Nets: one wide head at levels 1-2 as cin256-v2 (with its 1001 classes), several
# heads with two transformer layers at full resolution, and heads given by width (legacy: False).
TINY = {
    "cin-like-1head": dict(model_channels=32, channel_mult=[1, 2, 3], attention_resolutions=[4, 2],
                           num_res_blocks=2, num_heads=1, context_dim=24, n_classes=1001),
    "4heads-depth2-full-res": dict(model_channels=32, channel_mult=[1, 2], attention_resolutions=[1, 2],
                                   num_res_blocks=1, num_heads=4, transformer_depth=2, context_dim=16, n_classes=7),
    "head-channels-not-legacy": dict(model_channels=32, channel_mult=[1, 2], attention_resolutions=[2],
                                     num_res_blocks=2, num_head_channels=16, legacy=False, context_dim=8,
                                     n_classes=5),
    # num_head_channels wins over num_heads in openaimodel, legacy or not: 4 then 8 heads of 8 channels
    "head-channels-legacy-over-heads": dict(model_channels=32, channel_mult=[1, 2], attention_resolutions=[1, 2],
                                            num_res_blocks=1, num_heads=8, num_head_channels=8, context_dim=16,
                                            n_classes=5),
    "head-channels-heads-unset": dict(model_channels=32, channel_mult=[1, 2, 2], attention_resolutions=[2, 4],
                                      num_res_blocks=1, num_heads=-1, num_head_channels=32, legacy=False,
                                      context_dim=16, n_classes=5),
}


def max_err(a, b):
    return (a - b).abs().max().item()


def tolerance(sample):
    """1e-4, or 2e-6 of the sample's size when larger: a random U-Net's eps does not fit its input, so DDIM
    samples reach |x| ~ 100 and float32 rounding (U-Net outputs agree to ~4e-6) is amplified by 1/sqrt(alpha_bar)."""
    return max(1e-4, 2e-6 * sample.abs().max().item())


def _original(spec, seed=0):
    """The original modules of a class-conditional LDM: U-Net, ClassEmbedder table, VQ first stage."""
    unet_kwargs = {k: v for k, v in spec.items() if k != "n_classes"}
    # this ldm build's SpatialTransformer wants one context width (and context) per layer once depth > 1
    depth = spec.get("transformer_depth", 1)
    unet_kwargs["context_dim"] = [spec["context_dim"]] * depth
    first = nn.Module()
    first.encoder, first.decoder = Encoder(**DDCONFIG), Decoder(**DDCONFIG)
    first.quant_conv, first.post_quant_conv = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
    first.quantize = nn.Module()
    first.quantize.embedding = nn.Embedding(16, 3)
    unet = randomize_near_unit_norms(UNetModel(image_size=8, in_channels=3, out_channels=3,
                                               use_spatial_transformer=True, **unet_kwargs), seed)
    embedder = randomize_near_unit_norms(nn.Embedding(spec["n_classes"], spec["context_dim"]), seed + 1)
    return SimpleNamespace(unet=unet, apply_model=lambda x, t, context: unet(x, t, context=[context] * depth),
                           embedder=embedder, first_stage=randomize_near_unit_norms(first, seed + 2), spec=spec)


def _checkpoint(orig, ema_unet=None):
    """The state dict LatentDiffusion would save: prefixed modules, schedule buffers, logvar."""
    sd = {f"model.diffusion_model.{k}": v for k, v in orig.unet.state_dict().items()}
    sd.update({f"first_stage_model.{k}": v for k, v in orig.first_stage.state_dict().items()})
    sd["cond_stage_model.embedding.weight"] = orig.embedder.weight.detach()
    sd.update({name: torch.rand(1000) for name in SCHEDULE_BUFFERS})
    sd["logvar"] = torch.zeros(1000)
    if ema_unet is not None:
        sd.update({ema_key(f"model.diffusion_model.{k}"): v for k, v in ema_unet.state_dict().items()})
        sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(12, dtype=torch.int)
    return {k: v.detach().clone() for k, v in sd.items()}


def _yaml_config(spec):
    unet = {k: v for k, v in spec.items() if k != "n_classes"}
    config = {"model": {"base_learning_rate": 1e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "conditioning_key": "crossattn",
        "cond_stage_key": "class_label", "image_size": 8, "channels": 3, "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                        "params": {"image_size": 8, "in_channels": 3, "out_channels": 3,
                                   "use_spatial_transformer": True, **unet}},
        "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface",
                               "params": {"embed_dim": 3, "n_embed": 16,
                                          "ddconfig": DDCONFIG, "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                              "params": {"n_classes": spec["n_classes"], "embed_dim": spec["context_dim"]}}}}}
    return yaml.safe_dump(config)


def _write(tmp_path, orig, name="model.ckpt", state_dict=None):
    src, config = tmp_path / name, tmp_path / "model.yaml"
    state_dict = _checkpoint(orig) if state_dict is None else state_dict
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(state_dict, str(src))
    else:
        torch.save({"state_dict": state_dict, "global_step": 7, "epoch": 1}, src)
    config.write_text(_yaml_config(orig.spec))
    return src, config


def _convert(tmp_path, orig, *extra, name="model.ckpt", state_dict=None):
    src, config = _write(tmp_path, orig, name, state_dict)
    assert main([str(src), str(tmp_path / "native"), "--config", str(config), *extra]) == 0
    return load(tmp_path / "native")


class OriginalLDM:
    """What the original DDIMSampler reads from a LatentDiffusion, with its U-Net call."""

    parameterization, device = "eps", "cpu"

    def __init__(self, apply_model):
        betas = make_beta_schedule("linear", 1000, linear_start=0.0015, linear_end=0.0195)  # float64 numpy
        alphas_cumprod = np.cumprod(1.0 - betas)  # float64, stored float32, as register_schedule does
        self.num_timesteps = 1000
        self.betas = torch.tensor(betas, dtype=torch.float32)
        self.alphas_cumprod = torch.tensor(alphas_cumprod, dtype=torch.float32)
        self.alphas_cumprod_prev = torch.tensor(np.append(1.0, alphas_cumprod[:-1]), dtype=torch.float32)
        self.apply_model = apply_model


def _original_ddim(apply_model, noise, cond, uncond, scale, steps=10):
    sampler = DDIMSampler(OriginalLDM(apply_model))
    with torch.no_grad():
        sample, _ = sampler.sample(steps, noise.shape[0], tuple(noise.shape[1:]), conditioning=cond, x_T=noise,
                                   eta=0.0, verbose=False, unconditional_guidance_scale=scale,
                                   unconditional_conditioning=uncond)
    return sample


def _original_decode(first_stage, z):
    """VQModelInterface.decode: snap to the nearest codebook entry (L2), post_quant_conv, decoder."""
    codebook = first_stage.quantize.embedding.weight
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    distance = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.T
    quantised = codebook[distance.argmin(1)].reshape(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
    with torch.no_grad():
        return first_stage.decoder(first_stage.post_quant_conv(quantised))


# ---------------------------------------------------------------- parity with the original code

@pytest.mark.parametrize("name", sorted(TINY))
def test_converted_unet_and_first_stage_match_original_ldm_modules(tmp_path, name):
    orig = _original(TINY[name])
    pipe = _convert(tmp_path, orig)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([1, 981])
    labels = torch.tensor([0, TINY[name]["n_classes"] - 1])
    z = torch.randn(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        expected = orig.apply_model(x, t, orig.embedder(labels)[:, None])
        unet_err = max_err(pipe.unet(x, t, labels), expected)
        decode_err = max_err(pipe.autoencoder.decode(z), _original_decode(orig.first_stage, z))
    print(f"{name}: U-Net {unet_err:.2e} (output mean |{expected.abs().mean():.2f}|), VQ decode {decode_err:.2e}")
    assert expected.abs().mean() > 0.05
    assert unet_err <= 1e-5 and decode_err <= 1e-5
    assert pipe.null_class == TINY[name]["n_classes"] - 1 and pipe.meta["weights"] == "model"
    sched = pipe.scheduler
    assert (sched.beta_schedule, sched.beta_start, sched.beta_end, sched.steps_offset, sched.set_alpha_to_one,
            sched.timestep_spacing, sched.clip_sample) == ("scaled_linear", 0.0015, 0.0195, 1, False, "leading", False)


@pytest.fixture(scope="module")
def cin_like(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cin-like")
    orig = _original(TINY["cin-like-1head"], seed=5)
    return orig, _convert(tmp, orig)


@pytest.mark.parametrize("guidance", [None, 1.5])
@pytest.mark.parametrize("output", ["latent", "image"])
def test_generate_matches_original_ddim_sampler(cin_like, guidance, output):
    orig, pipe = cin_like
    labels = torch.tensor([207, 3])
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    embed = orig.embedder
    cond = embed(labels)[:, None].detach()
    uncond = embed(torch.full_like(labels, 1000))[:, None].detach()
    expected = _original_ddim(orig.apply_model, noise, cond, uncond,
                              1.0 if guidance is None else guidance)
    if output == "image":
        expected = ((_original_decode(orig.first_stage, expected) + 1) / 2).clamp(0, 1)
    got = pipe.generate(steps=10, sampler="ddim", eta=0.0, noise=noise, class_labels=labels.tolist(),
                        guidance_scale=guidance, output=output, progress=False)
    err = max_err(got, expected)
    print(f"DDIM 10 steps, guidance {guidance}, {output}: max err {err:.2e} (max |x| {expected.abs().max():.3g})")
    assert got.shape == expected.shape and err <= tolerance(expected)
    if output == "image":
        assert ((expected > 0) & (expected < 1)).float().mean() > 0.5  # mostly unclamped pixels
    assert pipe.last_run.full_calls == 10


def test_class_207_with_guidance_1_5(cin_like):
    _, pipe = cin_like
    images = pipe.generate(steps=4, class_labels=[207], guidance_scale=1.5, seed=0, progress=False)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    assert 0 <= images.min() and images.max() <= 1


def test_cached_generate_equals_hand_run_of_forward_full_and_forward_shallow(cin_like):
    """Interval 3, branch 1: full U-Net at steps 0, 3, 6, 9, the skip branch alone in between."""
    _, pipe = cin_like
    unet = pipe.unet
    labels = torch.tensor([207, 999])
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    state = {"step": 0, "cache": None}

    def by_hand(x, t, c):
        full = state["step"] % 3 == 0
        state["step"] += 1
        if full:
            out, state["cache"] = unet.forward_full(x, t, c, branch=1)
            return out
        return unet.forward_shallow(x, t, c, cache=state["cache"])

    with torch.no_grad():
        expected = _original_ddim(by_hand, noise, labels, torch.full_like(labels, 1000), 1.5)
    got = pipe.generate(steps=10, noise=noise, class_labels=labels.tolist(), guidance_scale=1.5,
                        cache_interval=3, cache_branch=1, output="latent", progress=False)
    uncached = pipe.generate(steps=10, noise=noise, class_labels=labels.tolist(), guidance_scale=1.5,
                             output="latent", progress=False)
    err = max_err(got, expected)
    print(f"cached DDIM (N=3, branch 1) vs by hand: {err:.2e} (max |x| {expected.abs().max():.3g}); "
          f"vs uncached {max_err(got, uncached):.2e}")
    assert err <= tolerance(expected) and max_err(got, uncached) > 1e-2
    assert (pipe.last_run.full_calls, pipe.last_run.shallow_calls) == (10, 0)
    pipe.generate(steps=10, noise=noise, class_labels=labels.tolist(), cache_interval=3, cache_branch=1,
                  output="latent", progress=False)
    assert (pipe.last_run.full_calls, pipe.last_run.shallow_calls) == (4, 6)


# ---------------------------------------------------------------- weights and files

def test_ema_weights_are_preferred_unless_no_ema(tmp_path):
    orig = _original(TINY["4heads-depth2-full-res"])
    ema = _original(orig.spec, seed=9)
    sd = _checkpoint(orig, ema_unet=ema.unet)
    x, t, labels = torch.randn(1, 3, 8, 8), torch.tensor([500]), torch.tensor([2])
    context = orig.embedder(labels)[:, None]
    for extra, reference, weights in (((), ema, "ema"), (("--no-ema",), orig, "model")):
        pipe = _convert(tmp_path, orig, "--overwrite", *extra, state_dict=sd)
        assert pipe.meta["weights"] == weights
        with torch.no_grad():
            assert max_err(pipe.unet(x, t, labels), reference.apply_model(x, t, context)) <= 1e-5
    sd.pop(ema_key("model.diffusion_model.out.2.weight"))
    src, config = _write(tmp_path, orig, "partial-ema.ckpt", sd)
    with pytest.raises(ValueError, match=r"EMA weights are incomplete.*model_ema\.diffusion_modelout2weight.*--no-ema"):
        convert(src, tmp_path / "partial", config=config)
    assert not (tmp_path / "partial").exists()


def test_safetensors_checkpoint_converts(tmp_path):
    orig = _original(TINY["head-channels-not-legacy"])
    pipe = _convert(tmp_path, orig, name="model.safetensors")
    x, labels = torch.randn(1, 3, 8, 8), torch.tensor([4])
    with torch.no_grad():
        expected = orig.apply_model(x, torch.tensor([10]), orig.embedder(labels)[:, None])
        assert max_err(pipe.unet(x, 10, labels), expected) <= 1e-5


def test_half_precision_file_through_minidiff_convert_ldm(tmp_path):
    from minidiff.cli import convert_main

    orig = _original(TINY["cin-like-1head"])
    src, config = _write(tmp_path, orig)
    assert main([str(src), str(tmp_path / "full"), "--config", str(config)]) == 0
    assert convert_main(["ldm", str(src), str(tmp_path / "half"), "--config", str(config), "--dtype", "float16"]) == 0
    ratio = check_half_precision_file(tmp_path / "full", tmp_path / "half", torch.float16)
    full, half = load(tmp_path / "full"), load(tmp_path / "half")
    x, labels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 1000])
    with torch.no_grad():
        expected = full.unet(x, 500, labels)
        err = max_err(half.unet(x, 500, labels), expected) / expected.abs().max().item()
    print(f"ldm --dtype float16: file {ratio:.3f}x, U-Net loaded in float32 vs the float32 file {err:.1e} relative")
    assert err <= 4e-3  # weights rounded to 11 significant bits (measured 1.6e-3)
    with pytest.raises(SystemExit):  # argparse: "invalid choice: 'int8' (choose from ...)"
        convert_main(["ldm", str(src), str(tmp_path / "x"), "--dtype", "int8"])
    with pytest.raises(ValueError, match="dtype must be one of float32, float16, bfloat16, got 'half'"):
        convert(src, tmp_path / "y", config=config, dtype="half")
    assert not (tmp_path / "y").exists()


class _WritesMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def _fails(capsys, argv, *patterns):
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    for pattern in patterns:
        assert pattern in err, err
    return err


def test_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    orig = _original(TINY["4heads-depth2-full-res"])
    marker = tmp_path / "marker"
    sd = _checkpoint(orig)
    src = tmp_path / "evil.ckpt"
    torch.save({"state_dict": sd, "callback": _WritesMarker(marker)}, src)
    assert b"exec" in src.read_bytes()  # the payload is in the file
    _fails(capsys, [src, tmp_path / "native"], "evil.ckpt", "refused")
    assert not marker.exists() and not (tmp_path / "native").exists()


def test_truncated_checkpoint_is_refused(tmp_path, capsys):
    orig = _original(TINY["4heads-depth2-full-res"])
    for name in ("model.ckpt", "model.safetensors"):
        src, config = _write(tmp_path, orig, name)
        src.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
        _fails(capsys, [src, tmp_path / "native", "--config", config], "truncated")
        assert not (tmp_path / "native").exists()


@pytest.mark.parametrize("keys,message", [
    (["model.diffusion_model.input_blocks.0.0.weight",
      "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"],
     "text-conditioned Stable Diffusion checkpoint; use convert/sd15.py"),
    (["temb.dense.0.weight", "conv_in.weight", "down.0.block.0.norm1.weight"], "use convert/ddpm.py"),
    (["time_embedding.linear_1.weight", "conv_in.weight"], "diffusers U-Net weights"),
    (["encoder.conv_in.weight", "quantize.embedding.weight"], "first-stage autoencoder alone"),
    (["something.else"], "no model.diffusion_model.* keys"),
])
def test_checkpoints_of_other_families_name_the_right_converter(tmp_path, capsys, keys, message):
    src = tmp_path / "other.ckpt"
    torch.save({"state_dict": {k: torch.zeros(2) for k in keys}}, src)
    _fails(capsys, [src, tmp_path / "native"], message)
    assert not (tmp_path / "native").exists()


def test_missing_and_misshaped_keys_are_listed_and_nothing_is_written(tmp_path, capsys):
    orig = _original(TINY["4heads-depth2-full-res"])
    sd = _checkpoint(orig)
    sd.pop("model.diffusion_model.output_blocks.2.1.transformer_blocks.1.attn2.to_k.weight")
    sd["first_stage_model.quant_conv.weight"] = torch.zeros(3, 3, 3, 3)
    sd["model.diffusion_model.extra.weight"] = torch.zeros(1)
    src, config = _write(tmp_path, orig, state_dict=sd)
    _fails(capsys, [src, tmp_path / "native", "--config", config],
           "missing key(s): output_blocks.2.1.blocks.1.attn2.to_k.weight", "unexpected key(s): extra.weight")
    assert not (tmp_path / "native").exists()
    sd.pop("model.diffusion_model.extra.weight")
    sd["model.diffusion_model.output_blocks.2.1.transformer_blocks.1.attn2.to_k.weight"] = torch.zeros(32, 16)
    src, config = _write(tmp_path, orig, state_dict=sd)
    _fails(capsys, [src, tmp_path / "native", "--config", config],
           "quant_conv.weight: file (3, 3, 3, 3) vs model (3, 3, 1, 1)")
    sd.pop("cond_stage_model.embedding.weight")
    src, config = _write(tmp_path, orig, state_dict=sd)
    _fails(capsys, [src, tmp_path / "native", "--config", config], "missing key(s): class_embed.weight")
    assert not (tmp_path / "native").exists()


def test_existing_destination_is_left_alone(tmp_path, capsys):
    orig = _original(TINY["4heads-depth2-full-res"])
    src, config = _write(tmp_path, orig)
    dst = tmp_path / "native"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    _fails(capsys, [src, dst, "--config", config], "exists; pass --overwrite")
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    _fails(capsys, [src, dst, "--config", config, "--overwrite"], "not a minidiff model", "nothing was touched")
    _fails(capsys, [broken, tmp_path / "fresh", "--config", config], "broken.ckpt")
    assert [p.name for p in dst.iterdir()] == ["keep.txt"] and (dst / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "fresh").exists()
    _fails(capsys, [tmp_path / "absent.ckpt", tmp_path / "new"], "does not exist")


# ---------------------------------------------------------------- configs

def test_yaml_reader_agrees_with_pyyaml_and_builtin_default_is_cin256_v2():
    root = shared_path()
    files = sorted(root.rglob("*.yaml")) + sorted(root.rglob("*.yml"))
    assert len(files) >= 4
    for path in files:
        assert read_yaml(path.read_text(), str(path)) == yaml.safe_load(path.read_text()), path
    assert read_yaml(yaml.safe_dump(CIN256_V2)) == CIN256_V2  # PyYAML's list style: "- x" under the key
    cin = shared_path("CompVis--latent-diffusion", "configs", "latent-diffusion", "cin256-v2.yaml")
    assert load_config(cin) == load_config(None)
    assert read_yaml("a: 1e-4\nb: 1.e-6\n") == {"a": 1e-4, "b": 1e-6}  # floats as OmegaConf reads them


@pytest.mark.parametrize("text,message", [
    ("a: &anchor 1\n", "config:1: '&anchor 1' uses YAML syntax"),
    ("a:\n  b: 1\n   c: 2\n", "config:3: unexpected indentation"),
    ("a: [[1], 2]\n", "config:1: only one-line flat lists"),
    ("a: 1\na: 2\n", "config:2: duplicate key 'a'"),
    ("a:\n\tb: 1\n", "config:2: tabs"),
])
def test_block_yaml_reader_names_the_line_it_cannot_read(text, message):
    with pytest.raises(YamlError, match=message.replace("[", r"\[").replace("*", r"\*")):
        read_block_yaml(text)


@pytest.mark.parametrize("text,message", [
    ("a:\n  b: 1\n   c: 2\n", "config:3: not valid YAML"),
    ("a: [1, 2\n", "config:2: not valid YAML"),
    ("a: 1\na: 2\n", "config:2: not valid YAML (duplicate key 'a')"),  # safe_load would keep the last
    ("a:\n\tb: 1\n", "config:2: not valid YAML"),
    ("- 1\n- 2\n", "config: the document is a list, expected a mapping"),
    ("a: !!python/object/apply:os.system [echo hi]\n", "config:1: not valid YAML"),  # no Python objects
])
def test_pyyaml_reader_names_the_line_of_invalid_yaml(text, message):
    with pytest.raises(YamlError, match=re.escape(message)):
        read_yaml(text)


FLOW = Path(__file__).parent / "data" / "flow-yaml"
BLOCK_CIN = ("CompVis--latent-diffusion", "configs", "latent-diffusion", "cin256-v2.yaml")
BLOCK_SD = ("CompVis--stable-diffusion", "configs", "stable-diffusion", "v1-inference.yaml")


def test_flow_style_and_anchor_yaml_gives_the_block_style_configs():
    from minidiff.convert import sd15

    cin_block, cin_flow = shared_path(*BLOCK_CIN), FLOW / "cin256-v2-flow.yaml"
    sd_block, sd_flow = shared_path(*BLOCK_SD), FLOW / "v1-inference-flow.yaml"
    assert read_yaml(cin_flow.read_text())["model"] == read_yaml(cin_block.read_text())["model"]
    assert read_yaml(sd_flow.read_text()) == read_yaml(sd_block.read_text())
    assert load_config(cin_flow) == load_config(cin_block) == load_config(None)
    assert sd15.config_from_yaml(sd_flow) == sd15.config_from_yaml(sd_block) == sd15.config_from_yaml()


def test_without_pyyaml_block_style_still_reads_and_flow_style_names_the_extra(monkeypatch):
    from minidiff.convert import sd15

    with_pyyaml = {name: read_yaml(shared_path(*name).read_text()) for name in (BLOCK_CIN, BLOCK_SD)}
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` now raises ImportError
    for name, expected in with_pyyaml.items():
        assert read_yaml(shared_path(*name).read_text()) == expected
    assert load_config(shared_path(*BLOCK_CIN)) == load_config(None)
    assert sd15.config_from_yaml(shared_path(*BLOCK_SD)) == sd15.config_from_yaml()
    hint = re.escape("pip install 'minidiff[convert]'")
    with pytest.raises(YamlSubsetError, match=r"cin256-v2-flow.yaml:\d+: .*" + hint):
        load_config(FLOW / "cin256-v2-flow.yaml")
    with pytest.raises(ValueError, match=r"v1-inference-flow.yaml:\d+: .*" + hint):
        sd15.config_from_yaml(FLOW / "v1-inference-flow.yaml")


def test_config_of_another_family_is_a_clear_error(tmp_path, capsys):
    sd15 = shared_path("CompVis--stable-diffusion", "configs", "stable-diffusion", "v1-inference.yaml")
    with pytest.raises(ValueError, match="text-conditioned Stable Diffusion config; use convert/sd15.py"):
        load_config(sd15)
    concat = read_yaml(yaml.safe_dump(CIN256_V2))
    concat["model"]["params"]["conditioning_key"] = "concat"
    with pytest.raises(ValueError, match="conditioning_key is 'concat'"):
        ldm_config(concat)
    src, config = _write(tmp_path, _original(TINY["4heads-depth2-full-res"]))
    config.write_text(config.read_text().replace("n_classes: 7", "n_classes: 8"))
    _fails(capsys, [src, tmp_path / "native", "--config", config], "class_embed.weight: file (7, 16) vs model (8, 16)")


# ---------------------------------------------------------------- full size

def test_full_size_cin256_v2_checkpoint_maps_onto_the_native_models():
    """Every key of the real file's layout (shape-only tensors) through convert/ldm.py's mapping."""
    cin = manifest("cin256-v2-ldm.json")
    state_dict = meta_state_dict(cin["keys"])
    assert len(state_dict) == 906
    config = load_config(None)
    with torch.device("meta"):
        unet, autoencoder = UNet(config.unet), Autoencoder(config.autoencoder)
    parts = map_checkpoint(state_dict, config.unet)
    check_state_dict(unet, parts["unet"], "cin256-v2 U-Net")  # zero missing, unexpected or mis-shaped
    check_state_dict(autoencoder, parts["autoencoder"], "VQ-f4")
    assert sorted(parts["ignored"]) == sorted(SCHEDULE_BUFFERS) and not parts["ema"]
    unet_params = sum(p.numel() for p in unet.parameters())
    class_params = unet.class_embed.weight.numel()
    ae_params = sum(p.numel() for p in autoencoder.parameters())
    print(f"cin256-v2: U-Net {unet_params - class_params:,} + class embedding {class_params:,}, VQ-f4 {ae_params:,}")
    assert (unet_params - class_params, class_params, ae_params) == (400_920_579, 512_512, 55_322_782)
    assert (cin["info"]["unet_params"], cin["info"]["cond_stage_params"], cin["info"]["first_stage_params"]) == \
        (400_920_579, 512_512, 55_322_782)
    # the same keys with an EMA copy beside them (dotless LitEma names) map the same way
    with_ema = {**state_dict, **{ema_key(k): v for k, v in state_dict.items() if k.startswith("model.diffusion")}}
    check_state_dict(unet, map_checkpoint(with_ema, config.unet)["unet"])
    check_family(state_dict)
