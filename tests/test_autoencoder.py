"""Autoencoder: parity with diffusers and the original LDM modules on random weights, key layouts of
the full-size SD1.5 KL-f8 and cin256-v2 VQ-f4 first stages, fp32 decoding, and refused state dicts."""

import json
import math

import pytest
import torch
from torch import nn

from conftest import SHARED, randomize_norms_and_biases
from minidiff.autoencoder import Autoencoder, AutoencoderConfig
from minidiff.formats.vae_keys import (autoencoder_config_from_diffusers, autoencoder_config_from_ldm, diffusers_to_native,
                                      ldm_to_native)

REFS = SHARED
MANIFESTS = REFS / "_generated-key-manifests"
TOLERANCE = 1e-4





def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def images(batch=2, size=16, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)


def tiny_kl(**overrides) -> AutoencoderConfig:
    params = dict(kind="kl", base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, resolution=16)
    return AutoencoderConfig(**{**params, **overrides})


# ---------------------------------------------------------------- diffusers parity

def _rename_attention(state_dict, spelling, ndim):
    deprecated = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for key, tensor in state_dict.items():
        for new, old in deprecated.items():
            if f".attentions.0.{new}." in key:
                if spelling == "deprecated":
                    key = key.replace(f".{new}.", f".{old}.")
                if ndim == 4 and key.endswith("weight"):
                    tensor = tensor[:, :, None, None]
        out[key] = tensor
    return out


@pytest.mark.parametrize("spelling,ndim", [("current", 2), ("deprecated", 2), ("deprecated", 4)])
def test_kl_matches_diffusers_autoencoderkl(spelling, ndim):
    from diffusers import AutoencoderKL

    reference = randomize_norms_and_biases(AutoencoderKL(
        block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4, sample_size=16))
    config = autoencoder_config_from_diffusers(reference.config)
    assert config.scale_factor == 0.18215 and config.channel_mult == (1, 2, 2)
    model = Autoencoder(config).eval()
    model.load_weights(diffusers_to_native(_rename_attention(reference.state_dict(), spelling, ndim), config))

    x = images()
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        encode_err = max_err(model.encode(x), reference.encode(x).latent_dist.mean * 0.18215)
        decode_err = max_err(model.decode(latents), reference.decode(latents / 0.18215).sample)
    print(f"KL vs diffusers ({spelling}, {ndim}-D attention): encode {encode_err:.2e}, decode {decode_err:.2e}")
    assert encode_err <= TOLERANCE and decode_err <= TOLERANCE


@pytest.mark.parametrize("groups", [32, 8])
def test_vq_matches_diffusers_vqmodel_decode_with_quantisation(groups):
    from diffusers import VQModel

    reference = randomize_norms_and_biases(VQModel(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=3,
        num_vq_embeddings=16, vq_embed_dim=3, sample_size=16, norm_num_groups=groups))
    with pytest.raises(ValueError, match="scale_factor"):  # diffusers' 0.18215 default is wrong for VQ-f4
        autoencoder_config_from_diffusers(reference.config)
    config = autoencoder_config_from_diffusers(reference.config, scale_factor=1.0)
    assert config.norm_groups == groups
    model = Autoencoder(config).eval()
    model.load_weights(diffusers_to_native(reference.state_dict(), config))

    x = images()
    with torch.no_grad():
        reference_latents = reference.encode(x).latents
        latents = model.encode(x)
        decoded, reference_decoded = model.decode(latents), reference.decode(reference_latents).sample
        unquantised = model.decoder(model.post_quant_conv(latents))
    encode_err, decode_err = max_err(latents, reference_latents), max_err(decoded, reference_decoded)
    print(f"VQ ({groups} groups) vs diffusers: encode {encode_err:.2e}, decode {decode_err:.2e}")
    assert encode_err <= TOLERANCE and decode_err <= TOLERANCE
    assert max_err(decoded, unquantised) > 1e-3, "decode must snap latents to the codebook first"


# ---------------------------------------------------------------- original LDM parity

def _ldm_first_stage(ddconfig, embed_dim, n_embed=None):
    """The CompVis modules, holding weights under the names of an LDM checkpoint's first stage."""
    from ldm.modules.diffusionmodules.model import Decoder, Encoder

    stage = nn.Module()
    stage.encoder, stage.decoder = Encoder(**ddconfig), Decoder(**ddconfig)
    z = ddconfig["z_channels"]
    if n_embed is None:
        stage.quant_conv = nn.Conv2d(2 * z, 2 * embed_dim, 1)
    else:
        stage.quant_conv = nn.Conv2d(z, embed_dim, 1)
        stage.quantize = nn.Module()
        stage.quantize.embedding = nn.Embedding(n_embed, embed_dim)
    stage.post_quant_conv = nn.Conv2d(embed_dim, z, 1)
    randomize_norms_and_biases(stage)
    checkpoint = {f"first_stage_model.{k}": v for k, v in stage.state_dict().items()}
    checkpoint["model.diffusion_model.out.2.bias"] = torch.zeros(3)  # other models' keys: reported unused
    return stage, checkpoint


def _load_ldm(checkpoint, config):
    native, unused = ldm_to_native(checkpoint)
    assert unused == ["model.diffusion_model.out.2.bias"]
    model = Autoencoder(config).eval()
    model.load_weights(native)
    return model


def _ddconfig(**overrides):
    ddconfig = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
    return {**ddconfig, **overrides}


def test_kl_matches_ldm_encoder_decoder():
    from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

    ddconfig = _ddconfig()  # attention at the 8 px level too, so `down.1.attn.0` / `up.1.attn.j` load
    stage, checkpoint = _ldm_first_stage(ddconfig, embed_dim=4)
    model = _load_ldm(checkpoint, autoencoder_config_from_ldm(ddconfig, 4, scale_factor=0.18215))

    x = images()
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        posterior = DiagonalGaussianDistribution(stage.quant_conv(stage.encoder(x)))
        torch.manual_seed(7)  # LDM samples from the global generator; the same stream as a seeded one
        reference_sample = posterior.sample()
        sample = model.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
        errors = {
            "encode": max_err(model.encode(x), posterior.mean * 0.18215),
            "sample": max_err(sample, reference_sample * 0.18215),
            "decode": max_err(model.decode(latents), stage.decoder(stage.post_quant_conv(latents / 0.18215))),
        }
    print("KL vs ldm:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) <= TOLERANCE


def test_vq_matches_ldm_encoder_decoder_and_nearest_codebook_entry():
    ddconfig = _ddconfig(double_z=False, z_channels=3, ch_mult=[1, 2])
    stage, checkpoint = _ldm_first_stage(ddconfig, embed_dim=3, n_embed=16)
    model = _load_ldm(checkpoint, autoencoder_config_from_ldm(ddconfig, 3, n_embed=16))
    assert model.scale_factor == 1.0

    x = images()
    with torch.no_grad():
        reference_latents = stage.quant_conv(stage.encoder(x))
        flat = reference_latents.permute(0, 2, 3, 1).reshape(-1, 3)
        codebook = stage.quantize.embedding.weight
        nearest = codebook[torch.cdist(flat, codebook).argmin(1)]  # L2 nearest entry
        quantised = nearest.reshape(2, 8, 8, 3).permute(0, 3, 1, 2)
        reference_decoded = stage.decoder(stage.post_quant_conv(quantised))
        latents = model.encode(x)
        errors = {"encode": max_err(latents, reference_latents),
                  "decode": max_err(model.decode(latents), reference_decoded)}
    print("VQ vs ldm:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) <= TOLERANCE
    with pytest.raises(ValueError, match="KL"):
        model.encode(x, sample=True)


# ---------------------------------------------------------------- full-size key layouts

def _first_stage_manifest(name):
    keys = json.loads((MANIFESTS / name).read_text())["keys"]
    return {k: v for k, v in keys.items() if k.startswith("first_stage_model.")}


def _ldm_yaml_config(path, first_stage_yaml_key="first_stage_config"):
    from omegaconf import OmegaConf

    params = OmegaConf.to_container(OmegaConf.load(path))["model"]["params"]
    first = params[first_stage_yaml_key]["params"]
    return autoencoder_config_from_ldm(first["ddconfig"], first["embed_dim"], first.get("n_embed"),
                                                  scale_factor=params.get("scale_factor", 1.0))


@pytest.mark.parametrize("manifest,yaml_path,diffusers_config,n_keys,n_params", [
    ("sd15-ldm-single-file.json", "runwayml--stable-diffusion-v1-5/v1-inference.yaml",
     "runwayml--stable-diffusion-v1-5/vae/config.json", 248, 83_653_863),
    ("cin256-v2-ldm.json", "CompVis--latent-diffusion/configs/latent-diffusion/cin256-v2.yaml",
     "CompVis--ldm-celebahq-256/vqvae/config.json", 205, 55_322_782),
])
def test_full_size_keys_match_manifest(manifest, yaml_path, diffusers_config, n_keys, n_params):
    config = _ldm_yaml_config(REFS / yaml_path)
    with torch.device("meta"):
        model = Autoencoder(config)
    native = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    entries = _first_stage_manifest(manifest)
    expected = {k.removeprefix("first_stage_model."): tuple(v["shape"]) for k, v in entries.items()}
    assert sorted(set(expected) - set(native)) == [] and sorted(set(native) - set(expected)) == []
    assert native == expected and len(native) == n_keys
    assert sum(p.numel() for p in model.parameters()) == n_params == sum(math.prod(s) for s in expected.values())

    # the manifests' diffusers names convert back to exactly the native keys and shapes
    from_diffusers = {v["diffusers"].split(".", 1)[1]: torch.empty(v["diffusers_shape"], device="meta")
                      for v in entries.values()}
    converted = diffusers_to_native(from_diffusers, config)
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected

    diffusers_json = json.loads((REFS / diffusers_config).read_text())
    scale = None if config.kind == "kl" else 1.0  # SD's vae/config.json relies on the 0.18215 default
    assert autoencoder_config_from_diffusers(diffusers_json, scale_factor=scale).to_dict() == {
        **config.to_dict(), "resolution": diffusers_json["sample_size"]}


def test_meta_model_takes_checkpoint_tensors():
    config = tiny_kl()
    weights = randomize_norms_and_biases(Autoencoder(config)).state_dict()
    with torch.device("meta"):
        model = Autoencoder(config)
    model.load_weights(weights)
    assert not any(p.is_meta for p in model.parameters())


# ---------------------------------------------------------------- precision

def test_half_precision_latents_and_module_decode_in_float32():
    model = randomize_norms_and_biases(Autoencoder(tiny_kl()))
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model.decode(latents)
        for dtype in (torch.float16, torch.bfloat16):
            out = model.decode(latents.to(dtype))
            assert out.dtype == torch.float32 and torch.isfinite(out).all()
            assert max_err(out, model.decode(latents.to(dtype).float())) == 0.0
        model.to(torch.bfloat16)
        out = model.decode(latents.to(torch.bfloat16))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert max_err(out, full) < 0.5  # only the bf16 rounding of the weights remains
    assert all(p.dtype == torch.float32 for p in model.decoder.parameters())
    assert model.encoder.conv_in.weight.dtype == torch.bfloat16


# ---------------------------------------------------------------- refused inputs

def test_bad_state_dict_lists_every_problem_and_assigns_nothing():
    model = randomize_norms_and_biases(Autoencoder(tiny_kl()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {k: torch.zeros_like(v) for k, v in before.items()}
    del bad["decoder.conv_out.bias"]
    bad["decoder.extra.weight"] = torch.zeros(1)
    bad["encoder.conv_in.weight"] = torch.zeros(32, 3, 1, 1)
    with pytest.raises(ValueError) as caught:
        model.load_weights(bad)
    message = str(caught.value)
    for text in ("missing", "decoder.conv_out.bias", "unexpected", "decoder.extra.weight",
                 "mis-shaped", "encoder.conv_in.weight"):
        assert text in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_duplicate_attention_spellings_are_refused():
    state_dict = {"encoder.mid_block.attentions.0.to_q.weight": torch.zeros(64, 64),
                  "encoder.mid_block.attentions.0.query.weight": torch.zeros(64, 64)}
    with pytest.raises(ValueError, match="both map to"):
        diffusers_to_native(state_dict, tiny_kl())


@pytest.mark.parametrize("changes,field", [
    ({"kind": "gan"}, "kind"),
    ({"base_channels": 48}, "base_channels"),
    ({"kind": "vq", "double_z": False}, "n_embed"),
    ({"double_z": False}, "double_z"),
    ({"scale_factor": 0.0}, "scale_factor"),
    ({"channels": 3}, "channels"),
])
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        AutoencoderConfig.from_dict({**tiny_kl().to_dict(), **changes})


def test_config_round_trips_through_dict():
    config = tiny_kl(attn_resolutions=(8,))
    assert AutoencoderConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_ldm_ddconfig_may_name_its_norm_groups():
    ddconfig = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    assert autoencoder_config_from_ldm(ddconfig, 4).norm_groups == 32  # LDM's Normalize
    assert autoencoder_config_from_ldm({**ddconfig, "norm_num_groups": 8}, 4).norm_groups == 8
    with pytest.raises(ValueError, match="norm_groups"):  # 32 and 64 channels do not split into 24 groups
        autoencoder_config_from_ldm({**ddconfig, "norm_num_groups": 24}, 4)
