"""Convert Stable Diffusion 1.x (v1.5 and its fine-tunes) to a minidiff model folder.

    python convert/sd15.py SRC DST [--overwrite] [--dtype float16|bfloat16]
                           [--tokenizer DIR | --bpe FILE.txt.gz] [--config v1-inference.yaml]
                           [--text-config config.json] [--non-ema]

SRC is either
- the original single file, `.safetensors` or `.ckpt`: `model.diffusion_model.*` (U-Net, openaimodel
  layout), `first_stage_model.*` (KL VAE), `cond_stage_model.transformer.text_model.*` (CLIP ViT-L/14).
  `v1-5-pruned.*` keeps its EMA U-Net under `model_ema.*`; that copy is preferred (--non-ema to
  refuse it). The file holds no tokenizer and no architecture: CLIP ViT-L/14's vocabulary ships with
  minidiff and is used unless --tokenizer or --bpe names another one, and SD1.5's v1-inference.yaml
  is built in (--config for a non-standard size);
- a diffusers folder: unet/ vae/ text_encoder/ tokenizer/ scheduler/ (weights .safetensors or .bin;
  the tokenizer as vocab.json + merges.txt or, as transformers 5 saves it, tokenizer.json).

The noise schedule is SD1.5's (scaled_linear 0.00085..0.012, steps_offset 1, set_alpha_to_one
False); which sampler runs on it is chosen at `generate` time. SD2.x and SDXL are refused with a
message naming what the file is. The model is built component by component on the meta device and
takes the file's tensors as its weights, so conversion holds about one copy of the model, plus the
one the writer makes; DST is written atomically, never half. `--dtype float16` writes the weights
in half precision, a file half the size (as the public `*-fp16` files); `minidiff.load` reads it
back in float32 or float16.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch

from ..formats import unet_keys, vae_keys
from ..autoencoder import Autoencoder, AutoencoderConfig
from ..checkpoint import CheckpointError, check_finite, check_state_dict, read_state_dict
from ..writing import check_conversion_paths
from .compvis import YamlError, ema_key, read_yaml
from ..pipeline import Pipeline
from ..schedules import SchedulerConfig
from ..text import CLIPTextConfig, CLIPTextEncoder, CLIPTokenizer
from .storage import add_dtype_argument, storage_dtype
from ..formats.text_keys import text_config_from_weights, text_keys_to_native, tokenizer_from_folder
from ..unet import UNet, UNetConfig

# Where each model sits in the single file (LatentDiffusion's attribute names).
SINGLE_FILE_PREFIXES = {
    "unet": "model.diffusion_model.",
    "autoencoder": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.text_model.",
}
# Sub-folders of a diffusers checkpoint, and the weight files tried in each, best first. The
# `.non_ema` U-Net variant is never picked: the plain file is already the EMA one.
DIFFUSERS_FOLDERS = {"unet": "unet", "autoencoder": "vae", "text_encoder": "text_encoder"}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                "pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
                "diffusion_pytorch_model.fp16.bin", "pytorch_model.fp16.bin")

# The values of runwayml/stable-diffusion-v1-5's v1-inference.yaml that shape the model, laid out
# as in the yaml so that `--config` files go through the same reader.
SD15_INFERENCE = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
    "linear_start": 0.00085, "linear_end": 0.0120, "timesteps": 1000, "image_size": 64, "channels": 4,
    "conditioning_key": "crossattn", "scale_factor": 0.18215,
    "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
        "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8,
        "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768, "use_checkpoint": True,
        "legacy": False}},
    "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
        "embed_dim": 4, "ddconfig": {
            "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
            "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}},
    "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
}}}

@dataclass
class SD1Config:
    """The architecture of an SD1.x model: what a single file cannot tell by itself."""
    unet: UNetConfig
    autoencoder: AutoencoderConfig
    scheduler: SchedulerConfig
    text: Optional[CLIPTextConfig] = None  # None: read the shapes off the weights


def sd_scheduler(linear_start: float = 0.00085, linear_end: float = 0.012, timesteps: int = 1000,
                 **overrides) -> SchedulerConfig:
    """SD1.x's noise schedule with the conventions of its PNDM scheduler_config.json.

    LDM's beta_schedule "linear" is linear in sqrt(beta), which diffusers calls scaled_linear.
    """
    values = dict(num_train_timesteps=timesteps, beta_start=linear_start, beta_end=linear_end,
                  beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1)
    return SchedulerConfig(**{**values, **overrides})


def config_from_yaml(source=None) -> SD1Config:
    """SD1Config of a CompVis `v1-inference.yaml` (a path or its parsed dict); None gives SD1.5's."""
    if source is None:
        data = copy.deepcopy(SD15_INFERENCE)
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        try:
            data = read_yaml(Path(source).read_text(), str(source))
        except (OSError, UnicodeDecodeError, YamlError) as e:
            raise CheckpointError(f"cannot read the model config {source}: {e}") from None
    try:
        params = data["model"]["params"]
        unet_params = params["unet_config"]["params"]
        first = params["first_stage_config"]["params"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{source} is not a latent-diffusion inference yaml: expected model.params with "
                              "unet_config and first_stage_config (like v1-inference.yaml)") from None
    cond_target = str(params.get("cond_stage_config", {}).get("target", ""))
    if "OpenCLIP" in cond_target or unet_params.get("context_dim") == 1024:
        raise CheckpointError(f"{source} describes Stable Diffusion 2.x (OpenCLIP ViT-H text encoder, 1024-wide "
                              "context); convert/sd15.py converts Stable Diffusion 1.x only")
    if params.get("parameterization", "eps") != "eps":
        raise CheckpointError(f"{source} sets parameterization {params['parameterization']!r} (an SD2-768 "
                              "v-prediction model); SD1.x predicts the noise ('eps')")
    if params.get("beta_schedule", "linear") != "linear":
        raise CheckpointError(f"beta_schedule {params['beta_schedule']!r} in {source} is not SD1.x's 'linear'")
    unet = unet_keys.config_from_openaimodel(unet_params)
    # The U-Net's own image_size is marked unused in SD's yaml; the model's latent size is this one.
    unet = dataclasses.replace(unet, sample_size=params.get("image_size", unet.sample_size))
    autoencoder = vae_keys.autoencoder_config_from_ldm(first["ddconfig"], first["embed_dim"],
                                                         scale_factor=params.get("scale_factor", 1.0))
    scheduler = sd_scheduler(params.get("linear_start", 0.00085), params.get("linear_end", 0.012),
                             params.get("timesteps", 1000))
    return SD1Config(unet, autoencoder, scheduler)


# -- what is this file? --------------------------------------------------------------------------

def reject_other_families(shapes: Mapping, source: str = "the checkpoint", *, linear_projection: bool = False):
    """Raise a CheckpointError naming the model if `shapes` ({key: shape}) is SDXL or SD2.x, not SD1.x.

    Works on both layouts. `linear_projection` says the config expects linear proj_in/proj_out,
    otherwise they are taken as SD2's signature.
    """
    keys = list(shapes)
    sdxl = [k for k in keys if k.startswith(("conditioner.embedders.", "model.diffusion_model.label_emb."))
            or k.startswith("add_embedding.") or ".add_embedding." in k]
    if sdxl:
        raise CheckpointError(f"{source} is a Stable Diffusion XL checkpoint (it has keys like {sdxl[0]!r}: a "
                              "second text encoder and size conditioning); convert/sd15.py converts Stable "
                              "Diffusion 1.x only, and minidiff does not implement SDXL")
    openclip = [k for k in keys if k.startswith("cond_stage_model.model.")]
    wide = [k for k in keys if k.endswith("attn2.to_k.weight") and tuple(shapes[k])[-1] == 1024]
    linear = [k for k in keys if re.search(r"\.proj_in\.weight$", k) and len(tuple(shapes[k])) == 2
              and k.startswith("model.diffusion_model.")]
    evidence = (f"an OpenCLIP text encoder under {openclip[0]!r}" if openclip else
                f"1024-wide cross-attention in {wide[0]!r}" if wide else
                None if linear_projection or not linear else f"linear transformer projections in {linear[0]!r}")
    if evidence:
        raise CheckpointError(f"{source} is a Stable Diffusion 2.x checkpoint ({evidence}); convert/sd15.py "
                              "converts Stable Diffusion 1.x only (CLIP ViT-L/14, 768-wide context)")


# -- key mapping ---------------------------------------------------------------------------------

def _take(source, prefix: str, rename=None) -> dict:
    """Remove the tensors under `prefix` from `source` and return them with the prefix stripped."""
    keys = [k for k in list(source.keys()) if k.startswith(prefix)]
    return {k[len(prefix):]: source.pop(rename(k) if rename else k) for k in keys}


def single_file_to_native(source, config: SD1Config, *, ema: bool = True) -> dict:
    """Native {"unet", "autoencoder", "text_encoder"} state dicts from a single-file state dict.

    `source` is a dict (or a `SingleFile`); its tensors are popped component by component. The
    LatentDiffusion schedule buffers, `position_ids`, `logvar` and, with EMA taken, the non-EMA
    U-Net are left unread.
    """
    unet_prefix = SINGLE_FILE_PREFIXES["unet"]
    has_ema = any(k.startswith("model_ema.diffusion_model") for k in source.keys())
    rename = ema_key if ema and has_ema else None
    if rename:
        missing = [k for k in source.keys() if k.startswith(unet_prefix) and ema_key(k) not in source.keys()]
        if missing:
            raise CheckpointError(f"the EMA copy under model_ema.* is incomplete ({len(missing)} U-Net tensors "
                                  f"have none, e.g. {ema_key(missing[0])!r}); pass --non-ema to convert the "
                                  "training weights instead")
    native = {"unet": unet_keys.openaimodel_to_native(_take(source, unet_prefix, rename), config.unet)}
    autoencoder, unused = vae_keys.ldm_to_native(_take(source, SINGLE_FILE_PREFIXES["autoencoder"]), "")
    if unused:
        raise CheckpointError(f"unexpected first_stage_model keys {unused[:5]}; this is not a KL autoencoder")
    native["autoencoder"] = autoencoder
    text = _take(source, SINGLE_FILE_PREFIXES["text_encoder"])
    native["text_encoder"] = text_keys_to_native(text, "", config.text or text_config_from_weights(text))
    return native


def diffusers_to_native(state_dicts: Mapping, config: SD1Config) -> dict:
    """Native state dicts from diffusers-layout {"unet", "autoencoder" (vae/), "text_encoder"} ones.

    The VAE may use the deprecated `query/key/value/proj_attn` names, the text encoder keys may or
    may not start with `text_model.`.
    """
    text = state_dicts["text_encoder"]
    return {"unet": unet_keys.diffusers_to_native(state_dicts["unet"], config.unet),
            "autoencoder": vae_keys.diffusers_to_native(state_dicts["autoencoder"], config.autoencoder),
            "text_encoder": text_keys_to_native(text, None, config.text)}


# -- building --------------------------------------------------------------------------------------

def _materialize(module_cls, config, state: dict, what: str, allow_nan: bool):
    """Build on the meta device and adopt the file's tensors as weights: no second copy in memory."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    if not allow_nan:
        check_finite(state, what)
    with torch.device("meta"):
        module = module_cls(config)
    check_state_dict(module, state, what)
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


def build_pipeline(native: dict, config: SD1Config, tokenizer: CLIPTokenizer, *, meta: Optional[dict] = None,
                   allow_nan: bool = False) -> Pipeline:
    """A Pipeline from native state dicts (consumed: `native` is emptied as the models take them)."""
    text_config = config.text or text_config_from_weights(native["text_encoder"])
    if config.unet.context_dim != text_config.hidden_size:
        raise CheckpointError(f"the U-Net cross-attends to {config.unet.context_dim}-wide context but the text "
                              f"encoder is {text_config.hidden_size} wide; the config does not fit the weights")
    largest_id = max(tokenizer.vocab.values())
    if largest_id >= text_config.vocab_size:
        raise CheckpointError(f"the tokenizer has ids up to {largest_id} but the text encoder's vocabulary holds "
                              f"{text_config.vocab_size} tokens; the tokenizer belongs to another model")
    unet = _materialize(UNet, config.unet, native.pop("unet"), "SD U-Net", allow_nan)
    autoencoder = _materialize(Autoencoder, config.autoencoder, native.pop("autoencoder"), "SD VAE", allow_nan)
    text_encoder = _materialize(CLIPTextEncoder, text_config, native.pop("text_encoder"), "CLIP text encoder",
                                allow_nan)
    return Pipeline(unet, config.scheduler, autoencoder=autoencoder, text_encoder=text_encoder,
                    tokenizer=tokenizer, meta={"family": "sd1", **(meta or {})})


# -- reading ---------------------------------------------------------------------------------------

class SingleFile:
    """A single-file checkpoint whose tensors are read only when popped.

    safetensors are memory-mapped and read tensor by tensor; a `.ckpt` goes through the safe
    (weights-only, memory-mapped) pickle reader.
    """

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                self._file = safe_open(str(path), framework="pt")
                self._keys = set(self._file.keys())
                self.shapes = {k: tuple(self._file.get_slice(k).get_shape()) for k in self._keys}
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{path} is not a valid safetensors file (corrupt or truncated?): {e}") \
                    from None
            self._tensors = None
        else:
            self._tensors = read_state_dict(path, allow_nan=True)
            self._keys = set(self._tensors)
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}

    def keys(self):
        return self._keys

    def pop(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        self._keys.discard(key)
        return self._tensors.pop(key) if self._tensors is not None else self._file.get_tensor(key)


def load_tokenizer(tokenizer_dir=None, bpe=None) -> CLIPTokenizer:
    """The tokenizer of --tokenizer DIR or --bpe FILE; with neither, CLIP ViT-L/14's shipped with minidiff."""
    if tokenizer_dir is not None and bpe is not None:
        raise ValueError("pass either --tokenizer or --bpe, not both")
    if tokenizer_dir is not None:
        return tokenizer_from_folder(tokenizer_dir)
    return CLIPTokenizer.from_bpe_gz(bpe) if bpe is not None else CLIPTokenizer.default()


def from_single_file(path, *, config: Optional[SD1Config] = None, tokenizer: Optional[CLIPTokenizer] = None,
                     ema: bool = True, allow_nan: bool = False) -> Pipeline:
    """Pipeline of an original SD1.x `.safetensors` / `.ckpt` file; without `tokenizer`, SD1.x's own
    (CLIP ViT-L/14's vocabulary, shipped with minidiff)."""
    path = Path(path)
    config = config or config_from_yaml()
    source = SingleFile(path)
    reject_other_families(source.shapes, str(path), linear_projection=config.unet.use_linear_projection)
    tokenizer = tokenizer if tokenizer is not None else CLIPTokenizer.default()
    if not any(k.startswith(SINGLE_FILE_PREFIXES["unet"]) for k in source.keys()):
        raise CheckpointError(f"{path} has no model.diffusion_model.* keys, so it is not a Stable Diffusion "
                              "single file (a lone U-Net, VAE or text encoder?)")
    has_ema = any(k.startswith("model_ema.diffusion_model") for k in source.keys())
    native = single_file_to_native(source, config, ema=ema)
    return build_pipeline(native, config, tokenizer, allow_nan=allow_nan,
                          meta={"source": str(path), "layout": "single-file", "ema_from_model_ema": ema and has_ema})


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; a diffusers Stable Diffusion folder has unet/, vae/, "
                              "text_encoder/, tokenizer/ and scheduler/ sub-folders, each with its config")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _weights(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}")


def _diffusers_config(src: Path) -> SD1Config:
    index = json.loads((src / "model_index.json").read_text()) if (src / "model_index.json").is_file() else {}
    unet_config = _read_json(src / "unet" / "config.json")
    if "XL" in str(index.get("_class_name", "")) or (src / "text_encoder_2").exists() \
            or unet_config.get("addition_embed_type") is not None:
        raise CheckpointError(f"{src} is a Stable Diffusion XL folder (second text encoder, added size "
                              "embeddings); convert/sd15.py converts Stable Diffusion 1.x only")
    text = CLIPTextConfig.from_dict(_read_json(src / "text_encoder" / "config.json"))
    if unet_config.get("cross_attention_dim") == 1024 or text.hidden_size == 1024:
        raise CheckpointError(f"{src} is a Stable Diffusion 2.x folder (OpenCLIP ViT-H text encoder, 1024-wide "
                              "context); convert/sd15.py converts Stable Diffusion 1.x only")
    unet = unet_keys.config_from_diffusers(unet_config)
    autoencoder = vae_keys.autoencoder_config_from_diffusers(_read_json(src / "vae" / "config.json"))
    # The noise schedule from the folder; keys that configure a scheduler class, not the noise, are skipped.
    schedule = _read_json(src / "scheduler" / "scheduler_config.json")
    noise_keys = {f.name for f in dataclasses.fields(SchedulerConfig)} - {"variance_type", "clip_sample_range"}
    scheduler = sd_scheduler(**{k: v for k, v in schedule.items() if k in noise_keys})
    return SD1Config(unet, autoencoder, scheduler, text)


def from_diffusers_folder(src, *, allow_nan: bool = False) -> Pipeline:
    """Pipeline of a diffusers StableDiffusionPipeline folder."""
    src = Path(src)
    config = _diffusers_config(src)
    tokenizer = tokenizer_from_folder(src / "tokenizer")
    state_dicts = {}
    for name, folder in DIFFUSERS_FOLDERS.items():
        state_dicts[name] = read_state_dict(_weights(src / folder), allow_nan=True)
        reject_other_families({k: v.shape for k, v in state_dicts[name].items()}, str(src / folder),
                              linear_projection=True)
    return build_pipeline(diffusers_to_native(state_dicts, config), config, tokenizer, allow_nan=allow_nan,
                          meta={"source": str(src), "layout": "diffusers"})


def convert(src, dst, *, overwrite: bool = False, config=None, tokenizer_dir=None, bpe=None, text_config=None,
            ema: bool = True, allow_nan: bool = False, dtype=None) -> Pipeline:
    """Read SRC (single file or diffusers folder) and write the native folder DST atomically (in
    `dtype`: "float16" / "bfloat16" halve the file)."""
    dtype = storage_dtype(dtype)
    src, dst = check_conversion_paths(src, dst, overwrite)
    if src.is_dir():
        if config is not None or text_config is not None:
            raise ValueError("--config and --text-config are for single files; a diffusers folder has its configs")
        if tokenizer_dir is not None or bpe is not None:
            raise ValueError("a diffusers folder brings its own tokenizer/; drop --tokenizer / --bpe")
        pipe = from_diffusers_folder(src, allow_nan=allow_nan)
    else:
        sd1 = config if isinstance(config, SD1Config) else config_from_yaml(config)
        if text_config is not None:
            text = text_config if isinstance(text_config, Mapping) else _read_json(Path(text_config))
            sd1.text = CLIPTextConfig.from_dict(text)
        pipe = from_single_file(src, config=sd1, tokenizer=load_tokenizer(tokenizer_dir, bpe), ema=ema,
                                allow_nan=allow_nan)
    pipe.save(dst, overwrite=overwrite, dtype=dtype)
    return pipe


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="SD1.x single file (.safetensors/.ckpt) or diffusers folder")
    parser.add_argument("dst", help="minidiff model folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--tokenizer", metavar="DIR", help="folder with vocab.json + merges.txt (single files)")
    parser.add_argument("--bpe", metavar="FILE", help="OpenAI's bpe_simple_vocab_16e6.txt.gz (single files)")
    parser.add_argument("--config", metavar="YAML", help="v1-inference.yaml-style config for non-standard sizes")
    parser.add_argument("--text-config", metavar="JSON", help="transformers CLIPTextModel config.json (default: "
                        "read from the weights, 64-channel heads)")
    parser.add_argument("--non-ema", action="store_true", help="use model.diffusion_model.* even if model_ema.* exists")
    parser.add_argument("--allow-nan", action="store_true", help="convert weights that contain NaN/Inf")
    add_dtype_argument(parser)
    args = parser.parse_args(argv)
    try:
        pipe = convert(args.src, args.dst, overwrite=args.overwrite, config=args.config, tokenizer_dir=args.tokenizer,
                       bpe=args.bpe, text_config=args.text_config, ema=not args.non_ema, allow_nan=args.allow_nan,
                       dtype=args.dtype)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    modules = {"U-Net": pipe.denoiser, "VAE": pipe.autoencoder, "text encoder": pipe.text_encoder}
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}
    print(f"wrote {args.dst}: Stable Diffusion 1.x ({pipe.meta['layout']}), "
          + ", ".join(f"{name} {n:,}" for name, n in counts.items())
          + f" parameters; {pipe.denoiser.num_branches} cache branches; {args.dtype} weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
