"""convert/sd15.py: both public SD1.5 layouts against the reference libraries on identical random
weights (diffusers UNet2DConditionModel; the original ldm openaimodel U-Net and KL Encoder/Decoder
with a transformers CLIPTextModel, as .safetensors and .ckpt), the full-size key manifest, and the
refusal of SD2.x / SDXL / incomplete inputs."""

import json

import pytest
import torch

import minidiff
from conftest import SHARED, check_half_precision_file, randomize_with_norms, sharpen_attention
from minidiff.convert import sd15
from minidiff.formats import text_keys, unet_keys
from minidiff.autoencoder import Autoencoder
from minidiff.checkpoint import CheckpointError, check_state_dict
from minidiff.convert.compvis import ema_key
from minidiff.text import CLIPTextConfig, CLIPTextEncoder
from minidiff.unet import UNet

SD15_DIR = SHARED / "runwayml--stable-diffusion-v1-5"
TOKENIZER_DIR = SD15_DIR / "tokenizer"
MANIFEST = SHARED / "_generated-key-manifests" / "sd15-ldm-single-file.json"
TOLERANCE = 1e-4
TEXT_WIDTH = 32  # tiny CLIP width = U-Net context width

pytestmark = pytest.mark.skipif(not TOKENIZER_DIR.is_dir(), reason=f"shared reference configs not found at {SD15_DIR}")





def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


# -- tiny reference components (diffusers / transformers) -------------------------------------------

def tiny_clip(seed=0):
    from transformers import CLIPTextConfig as HFConfig, CLIPTextModel

    config = HFConfig(vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu")
    return randomize_with_norms(CLIPTextModel(config), seed)


def tiny_diffusers_unet(seed=0, **overrides):
    from diffusers import UNet2DConditionModel

    params = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  attention_head_dim=2, cross_attention_dim=TEXT_WIDTH, norm_num_groups=32)
    return randomize_with_norms(UNet2DConditionModel(**{**params, **overrides}), seed)


def tiny_diffusers_vae(seed=0, norm_num_groups=32):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        sample_size=16, norm_num_groups=norm_num_groups)
    return randomize_with_norms(vae, seed)


def sd_pndm_scheduler():
    from diffusers import PNDMScheduler

    return PNDMScheduler.from_pretrained(SD15_DIR / "scheduler")


def tiny_diffusers_pipeline(unet=None, seed=0, vae=None):
    """A diffusers StableDiffusionPipeline of tiny random components with SD1.5's tokenizer and scheduler."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    unet = unet if unet is not None else tiny_diffusers_unet(seed)
    return StableDiffusionPipeline(
        vae=vae if vae is not None else tiny_diffusers_vae(seed), text_encoder=tiny_clip(seed), unet=unet,
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR), scheduler=sd_pndm_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def convert_diffusers(pipe, tmp_path, name="sd"):
    """save_pretrained, convert/sd15.py, minidiff.load: the whole road a user takes."""
    src, dst = tmp_path / f"{name}-diffusers", tmp_path / f"{name}-native"
    pipe.save_pretrained(src)
    assert sd15.main([str(src), str(dst)]) == 0
    return minidiff.load(dst)


# -- full-size layout ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def manifest_keys():
    if not MANIFEST.is_file():
        pytest.skip(f"key manifest {MANIFEST} not found")
    return json.loads(MANIFEST.read_text())["keys"]


def _meta_modules(config):
    with torch.device("meta"):
        return {"unet": UNet(config.unet), "autoencoder": Autoencoder(config.autoencoder),
                "text_encoder": CLIPTextEncoder(config.text or CLIPTextConfig())}


def test_builtin_config_is_the_shared_v1_inference_yaml():
    assert sd15.config_from_yaml(SD15_DIR / "v1-inference.yaml") == sd15.config_from_yaml()
    folder = sd15._diffusers_config(SD15_DIR)  # the diffusers configs describe the same model
    builtin = sd15.config_from_yaml()
    assert {**folder.unet.to_dict(), "class_cond": None} == {**builtin.unet.to_dict(), "class_cond": None}
    assert folder.scheduler == builtin.scheduler
    assert folder.text == CLIPTextConfig()


def test_full_size_single_file_keys_map_one_to_one(manifest_keys):
    state = {k: torch.empty(v["shape"], device="meta") for k, v in manifest_keys.items()}
    native = sd15.single_file_to_native(state, sd15.config_from_yaml())
    modules = _meta_modules(sd15.config_from_yaml())
    for name, module in modules.items():
        check_state_dict(module, native[name], name)  # zero missing, unexpected or mis-shaped keys
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    assert counts == {"unet": 859_520_964, "autoencoder": 83_653_863, "text_encoder": 123_060_480}
    assert sorted(state) == sorted(SCHEDULE_BUFFERS)  # left unread: LatentDiffusion's schedule buffers


def test_full_size_diffusers_keys_map_one_to_one(manifest_keys):
    groups = {}
    for value in manifest_keys.values():
        if value["diffusers"]:
            folder, _, key = value["diffusers"].partition(".")
            component = {"vae": "autoencoder"}.get(folder, folder)
            groups.setdefault(component, {})[key] = torch.empty(value["diffusers_shape"], device="meta")
    config = sd15.config_from_yaml()
    config.text = CLIPTextConfig()
    native = sd15.diffusers_to_native(groups, config)
    for name, module in _meta_modules(config).items():
        check_state_dict(module, native[name], name)


# -- diffusers folder ---------------------------------------------------------------------------------

UNET_CONFIGS = {
    "one-level-attention": dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "linear-projection-depth-2": dict(use_linear_projection=True, transformer_layers_per_block=2,
                                      attention_head_dim=4),
    # SD's quirk: attention_head_dim means the number of heads; a list gives one count per level
    # (up blocks reversed, the middle block the last), here 1, 2 and 4 heads over 32, 64, 64 channels
    "per-level-heads": dict(attention_head_dim=[1, 2, 4], down_block_types=("CrossAttnDownBlock2D",) * 3,
                            up_block_types=("CrossAttnUpBlock2D",) * 3),
    "eight-norm-groups": dict(norm_num_groups=8, attention_head_dim=[2, 4, 4]),
    "attention-low-res-one-head": dict(block_out_channels=(32, 32, 64), attention_head_dim=1,
                                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
}


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_unet_matches_diffusers_unet2dconditionmodel_through_the_converter(name, tmp_path):
    reference = sharpen_attention(tiny_diffusers_unet(seed=3, **UNET_CONFIGS[name]))
    pipe = convert_diffusers(tiny_diffusers_pipeline(reference), tmp_path)
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, TEXT_WIDTH, generator=g)
    t = torch.tensor([981, 21])
    with torch.no_grad():
        err = max_err(pipe.unet(x, t, context), reference(x, t, encoder_hidden_states=context).sample)
    print(f"U-Net {name} vs diffusers: {err:.2e}")
    assert err <= TOLERANCE


@pytest.mark.parametrize("groups", [32, 8])
def test_diffusers_folder_text_encoder_and_vae_match(groups, tmp_path):
    reference = tiny_diffusers_pipeline(vae=tiny_diffusers_vae(norm_num_groups=groups))
    pipe = convert_diffusers(reference, tmp_path)
    ids = reference.tokenizer(["a photograph of an astronaut riding a horse", ""], padding="max_length",
                              max_length=77, return_tensors="pt").input_ids
    assert torch.equal(pipe.tokenizer(["a photograph of an astronaut riding a horse", ""]), ids)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        errors = {
            "text": max_err(pipe.text_encoder(ids), reference.text_encoder(ids).last_hidden_state),
            "encode": max_err(pipe.autoencoder.encode(images), reference.vae.encode(images).latent_dist.mean * 0.18215),
            "decode": max_err(pipe.autoencoder.decode(latents), reference.vae.decode(latents / 0.18215).sample),
        }
    print(f"diffusers folder, {groups}-group VAE:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) <= TOLERANCE and pipe.autoencoder.config.norm_groups == groups
    # save_pretrained writes every key, timestep_spacing too; SD1.5's own scheduler_config.json does not.
    assert pipe.scheduler == sd15.sd_scheduler(timestep_spacing="leading") and pipe.meta["layout"] == "diffusers"


def test_per_level_heads_of_either_spelling_map_to_per_level_num_heads():
    base = dict(_class_name="UNet2DConditionModel", block_out_channels=[32, 64, 64], cross_attention_dim=TEXT_WIDTH,
                down_block_types=["CrossAttnDownBlock2D"] * 3, up_block_types=["CrossAttnUpBlock2D"] * 3)
    assert unet_keys.config_from_diffusers({**base, "attention_head_dim": [1, 2, 4]}).num_heads == (1, 2, 4)
    assert unet_keys.config_from_diffusers({**base, "attention_head_dim": [4, 4, 4]}).num_heads == 4
    # num_attention_heads (which diffusers itself still refuses to build) takes precedence, as diffusers reads it
    mapped = unet_keys.config_from_diffusers({**base, "attention_head_dim": 8, "num_attention_heads": [2, 4, 8]})
    assert (mapped.num_heads, mapped.head_channels) == ((2, 4, 8), None)
    with pytest.raises(ValueError, match=r"per-level head counts \[1, 2\] give 2 values for 3 down blocks"):
        unet_keys.config_from_diffusers({**base, "attention_head_dim": [1, 2]})
    pixel = dict(_class_name="UNet2DModel", block_out_channels=[32, 64], attention_head_dim=[8, 16],
                 down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"])
    with pytest.raises(ValueError, match="UNet2DModel takes one head width for every block"):
        unet_keys.config_from_diffusers(pixel)
    assert unet_keys.config_from_diffusers({**pixel, "attention_head_dim": 16}).head_channels == 16


def test_diffusers_folder_with_deprecated_vae_attention_names_and_text_model_prefix(tmp_path):
    from safetensors.torch import load_file, save_file

    reference = tiny_diffusers_pipeline()
    src = tmp_path / "old"
    reference.save_pretrained(src)
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    vae_file = src / "vae" / "diffusion_pytorch_model.safetensors"
    vae = {}
    for key, value in load_file(vae_file).items():
        for new, old in old_names.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        vae[key] = value
    save_file(vae, vae_file)
    text_file = src / "text_encoder" / "model.safetensors"
    text = {"text_model." + k: v for k, v in load_file(text_file).items()}
    text["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # as transformers 4.22 wrote it
    save_file(text, text_file)
    sd15.convert(src, tmp_path / "native")
    pipe = minidiff.load(tmp_path / "native")
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ids = pipe.tokenizer(["a red fox"])
    with torch.no_grad():
        expected = reference.vae.encode(images).latent_dist.mean * 0.18215
        assert max_err(pipe.autoencoder.encode(images), expected) <= TOLERANCE
        assert max_err(pipe.text_encoder(ids), reference.text_encoder(ids).last_hidden_state) <= TOLERANCE


# -- original single file -----------------------------------------------------------------------------

LDM_UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                num_res_blocks=2, channel_mult=[1, 2, 2], num_heads=2, use_spatial_transformer=True,
                transformer_depth=1, context_dim=TEXT_WIDTH, use_checkpoint=False, legacy=False)
LDM_DDCONFIG = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0)
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")


def tiny_yaml(tmp_path, unet=LDM_UNET, flow=False):
    import yaml

    config = json.loads(json.dumps(sd15.SD15_INFERENCE))  # a deep copy
    params = config["model"]["params"]
    params["image_size"] = 8
    params["unet_config"]["params"] = unet
    params["first_stage_config"]["params"] = {"embed_dim": 4, "ddconfig": LDM_DDCONFIG}
    path = tmp_path / "tiny-inference.yaml"
    path.write_text(yaml.safe_dump(config, default_flow_style=flow))
    return path


class LdmFirstStage(torch.nn.Module):
    """The four modules of ldm's AutoencoderKL, with its key names."""

    def __init__(self):
        super().__init__()
        from ldm.modules.diffusionmodules.model import Decoder, Encoder

        self.encoder, self.decoder = Encoder(**LDM_DDCONFIG), Decoder(**LDM_DDCONFIG)
        self.quant_conv, self.post_quant_conv = torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(4, 4, 1)

    def encode_mean(self, x):
        return self.quant_conv(self.encoder(x)).chunk(2, dim=1)[0]

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


@pytest.fixture(scope="module")
def ldm_parts():
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    return {"unet": randomize_with_norms(UNetModel(**LDM_UNET), 5), "ema_unet": randomize_with_norms(UNetModel(**LDM_UNET), 6),
            "vae": randomize_with_norms(LdmFirstStage(), 7), "clip": tiny_clip(8)}


def single_file_state(parts, *, ema=False):
    """The parts under the prefixes of v1-5-pruned-emaonly (or, with ema, of v1-5-pruned)."""
    state = {f"model.diffusion_model.{k}": v for k, v in parts["unet"].state_dict().items()}
    if ema:  # v1-5-pruned: training weights under model., the EMA copy under model_ema.<dotless>
        state.update({ema_key(f"model.diffusion_model.{k}"): v for k, v in parts["ema_unet"].state_dict().items()})
        state["model_ema.decay"], state["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(1000)
    state.update({f"first_stage_model.{k}": v for k, v in parts["vae"].state_dict().items()})
    state.update({f"cond_stage_model.transformer.text_model.{k}": v for k, v in parts["clip"].state_dict().items()})
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state.update({name: torch.linspace(0.1, 0.9, 1000) for name in SCHEDULE_BUFFERS})
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def write_single_file(state, path):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 470000, "epoch": 6}, path)
    return path


def _check_against_ldm(pipe, parts, unet):
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, TEXT_WIDTH, generator=g)
    t = torch.tensor([981, 21])
    images = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    ids = pipe.tokenizer(["a photograph of an astronaut riding a horse", "a red fox"])
    with torch.no_grad():
        errors = {"unet": max_err(pipe.unet(x, t, context), unet(x, t, context=context)),
                  "encode": max_err(pipe.autoencoder.encode(images), parts["vae"].encode_mean(images) * 0.18215),
                  "decode": max_err(pipe.autoencoder.decode(x), parts["vae"].decode(x / 0.18215)),
                  "text": max_err(pipe.text_encoder(ids), parts["clip"](ids).last_hidden_state)}
    return errors


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_matches_ldm_modules_and_transformers_clip(suffix, ldm_parts, tmp_path):
    src = write_single_file(single_file_state(ldm_parts), tmp_path / f"v1-5-pruned-emaonly{suffix}")
    text_config = tmp_path / "text-config.json"
    text_config.write_text(json.dumps(ldm_parts["clip"].config.to_dict()))
    dst = tmp_path / "native"
    assert sd15.main([str(src), str(dst), "--config", str(tiny_yaml(tmp_path)), "--tokenizer", str(TOKENIZER_DIR),
                      "--text-config", str(text_config)]) == 0
    pipe = minidiff.load(dst)
    errors = _check_against_ldm(pipe, ldm_parts, ldm_parts["unet"])
    print(f"single file {suffix} vs ldm/transformers:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) <= TOLERANCE
    assert pipe.scheduler == sd15.sd_scheduler() and pipe.unet.config.sample_size == 8
    assert pipe.text_encoder.config.num_attention_heads == 2


def test_single_file_prefers_the_ema_copy(ldm_parts, tmp_path):
    src = write_single_file(single_file_state(ldm_parts, ema=True), tmp_path / "v1-5-pruned.safetensors")
    config = sd15.config_from_yaml(tiny_yaml(tmp_path))
    config.text = CLIPTextConfig.from_dict(ldm_parts["clip"].config.to_dict())
    tokenizer = sd15.load_tokenizer(TOKENIZER_DIR)
    ema = sd15.from_single_file(src, config=config, tokenizer=tokenizer)
    assert ema.meta["ema_from_model_ema"] is True
    assert max(_check_against_ldm(ema, ldm_parts, ldm_parts["ema_unet"]).values()) <= TOLERANCE
    trained = sd15.from_single_file(src, config=config, tokenizer=tokenizer, ema=False)
    assert max(_check_against_ldm(trained, ldm_parts, ldm_parts["unet"]).values()) <= TOLERANCE


def test_single_file_with_num_head_channels_in_a_flow_style_yaml_matches_ldm(ldm_parts, tmp_path):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet_params = {**LDM_UNET, "num_heads": -1, "num_head_channels": 16}  # 2, then 4 heads of 16 channels
    parts = {**ldm_parts, "unet": sharpen_attention(randomize_with_norms(UNetModel(**unet_params), 9))}
    src = write_single_file(single_file_state(parts), tmp_path / "model.safetensors")
    config = sd15.config_from_yaml(tiny_yaml(tmp_path, unet_params, flow=True))
    assert (config.unet.num_heads, config.unet.head_channels) == (None, 16)
    config.text = CLIPTextConfig.from_dict(parts["clip"].config.to_dict())
    errors = _check_against_ldm(sd15.from_single_file(src, config=config), parts, parts["unet"])
    print("num_head_channels single file vs ldm:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) <= TOLERANCE


def test_single_file_text_config_is_read_off_the_weights(ldm_parts, tmp_path):
    text = {k: v for k, v in single_file_state(ldm_parts).items() if k.startswith("cond_stage_model.")}
    native = {k[len(sd15.SINGLE_FILE_PREFIXES["text_encoder"]):]: v for k, v in text.items()}
    inferred = text_keys.text_config_from_weights(native)
    assert (inferred.vocab_size, inferred.hidden_size, inferred.intermediate_size, inferred.num_hidden_layers,
            inferred.max_position_embeddings) == (49408, TEXT_WIDTH, 64, 2, 77)
    assert inferred.num_attention_heads == 1  # 64-channel heads; this tiny model needs --text-config


# -- refused inputs -----------------------------------------------------------------------------------

SD2_MARKERS = {
    "OpenCLIP": {"cond_stage_model.model.token_embedding.weight": (49408, 1024),
                 "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)},
    "1024-wide": {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
    "linear": {"model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320)},
}
SDXL_MARKERS = {
    "conditioner": {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)},
    "label_emb": {"model.diffusion_model.label_emb.0.0.weight": (1280, 2816)},
    "add_embedding": {"add_embedding.linear_1.weight": (1280, 2816)},
}


@pytest.mark.parametrize("family,markers", [("2.x", m) for m in SD2_MARKERS.values()]
                         + [("XL", m) for m in SDXL_MARKERS.values()])
def test_sd2_and_sdxl_state_dicts_are_refused_by_name(family, markers):
    with pytest.raises(CheckpointError, match=f"Stable Diffusion {family}"):
        sd15.reject_other_families(markers, "model.safetensors")
    sd15.reject_other_families({"model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1)})


@pytest.mark.parametrize("family,markers", [("2.x", SD2_MARKERS["OpenCLIP"]), ("XL", SDXL_MARKERS["conditioner"])])
def test_sd2_and_sdxl_files_are_refused_and_nothing_is_written(family, markers, tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(v) for k, v in markers.items()}, str(src))
    with pytest.raises(CheckpointError, match=f"Stable Diffusion {family}.*1.x only"):
        sd15.convert(src, tmp_path / "out", tokenizer_dir=TOKENIZER_DIR)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family,files", [
    ("2.x", {"unet/config.json": {"_class_name": "UNet2DConditionModel", "cross_attention_dim": 1024},
             "text_encoder/config.json": {"model_type": "clip_text_model", "hidden_size": 1024,
                                          "num_attention_heads": 16}}),
    ("XL", {"model_index.json": {"_class_name": "StableDiffusionXLPipeline"},
            "unet/config.json": {"_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time"}}),
])
def test_sd2_and_sdxl_diffusers_folders_are_refused(family, files, tmp_path):
    for name, content in files.items():
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / name).write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=f"Stable Diffusion {family}"):
        sd15.convert(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_single_file_converts_offline_with_the_shipped_vocabulary(ldm_parts, tmp_path):
    """No --tokenizer / --bpe: CLIP ViT-L/14's vocabulary shipped with minidiff, the same ids as SD1.5's own."""
    from transformers import CLIPTokenizer as HFTokenizer

    src = write_single_file(single_file_state(ldm_parts), tmp_path / "v1-5-pruned-emaonly.safetensors")
    text_config = tmp_path / "text-config.json"
    text_config.write_text(json.dumps(ldm_parts["clip"].config.to_dict()))
    dst = tmp_path / "native"
    assert sd15.main([str(src), str(dst), "--config", str(tiny_yaml(tmp_path)), "--text-config",
                      str(text_config)]) == 0
    pipe = minidiff.load(dst)
    prompts = ["a photograph of an astronaut riding a horse", "Ünïcode, punctuation!? and   spaces", ""]
    expected = HFTokenizer.from_pretrained(TOKENIZER_DIR)(prompts, padding="max_length", max_length=77,
                                                         truncation=True, return_tensors="pt").input_ids
    assert torch.equal(pipe.tokenizer(prompts), expected)
    assert max(_check_against_ldm(pipe, ldm_parts, ldm_parts["unet"]).values()) <= TOLERANCE


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_file_is_half_the_size_and_loads_in_float32_and_half(dtype, ldm_parts, tmp_path):
    src = write_single_file(single_file_state(ldm_parts), tmp_path / "model.safetensors")
    args = [str(src), "--config", str(tiny_yaml(tmp_path))]
    assert sd15.main([args[0], str(tmp_path / "full"), *args[1:]]) == 0
    assert sd15.main([args[0], str(tmp_path / "half"), *args[1:], "--dtype", dtype]) == 0
    half_dtype = getattr(torch, dtype)
    ratio = check_half_precision_file(tmp_path / "full", tmp_path / "half", half_dtype)
    full, as_float32 = minidiff.load(tmp_path / "full"), minidiff.load(tmp_path / "half")
    as_half = minidiff.load(tmp_path / "half", dtype=half_dtype)
    for pipe, want in ((as_float32, torch.float32), (as_half, half_dtype)):
        assert {p.dtype for m in (pipe.unet, pipe.text_encoder) for p in m.parameters()} == {want}
        assert {p.dtype for p in pipe.autoencoder.parameters()} == {torch.float32}  # decoding stays float32
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, TEXT_WIDTH, generator=g)
    t = torch.tensor([981, 21])
    with torch.no_grad():
        expected = full.unet(x, t, context)
        scale = expected.abs().max().item()
        errors = {"float32": max_err(as_float32.unet(x, t, context), expected) / scale,
                  dtype: max_err(as_half.unet(x.to(half_dtype), t, context.to(half_dtype)), expected) / scale}
    print(f"--dtype {dtype}: file {ratio:.3f}x; U-Net vs the float32 conversion, relative:",
          {k: f"{v:.1e}" for k, v in errors.items()})
    # weights rounded to 11 (float16) or 8 (bfloat16) significant bits (measured 4.8e-4 / 2.5e-3),
    # then computing in that precision (7.7e-4 / 5.9e-3)
    bound = {"float16": 2e-3, "bfloat16": 1e-2}[dtype]
    assert errors["float32"] <= bound and errors[dtype] <= 2 * bound
    images = as_half.generate(prompt="a red fox", steps=2, height=16, width=16, seed=0, progress=False)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_wrong_config_and_existing_destination_are_errors(ldm_parts, tmp_path):
    src = write_single_file(single_file_state(ldm_parts), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="fit"):  # SD1.5's full-size config against tiny weights
        sd15.convert(src, tmp_path / "out", tokenizer_dir=TOKENIZER_DIR)
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        sd15.convert(src, tmp_path / "out", tokenizer_dir=TOKENIZER_DIR)
