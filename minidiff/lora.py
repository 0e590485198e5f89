"""LoRA files merged into a pipeline's weights, and taken out again bit for bit.

A LoRA stores, for some Linear or Conv2d layers, a low-rank pair `up` [out, r(, 1, 1)] and
`down` [r, in(, kh, kw)] and maybe a scalar `alpha`; loading adds

    W += scale * alpha / r * up @ down        (alpha defaults to r)

to each layer's weight once, so sampling runs at the plain model's speed. The two layouts people
publish name the layers differently, and both are read:
- kohya / sd-scripts: `lora_unet_<diffusers name with _ for .>.lora_down.weight`, `.lora_up.weight`,
  `.alpha`; `lora_te_text_model_encoder_layers_0_self_attn_q_proj...` for the text encoder;
- diffusers / PEFT (`pytorch_lora_weights.safetensors`): `unet.<diffusers name>.lora_A.weight` /
  `.lora_B.weight`, the older `.lora.down.weight` / `.lora.up.weight` and attention-processor
  forms, `text_encoder.text_model.encoder...`.
Layer names go through the key tables of minidiff.formats (export_keys inverts unet_keys), so a
LoRA reaches exactly the weights a converted checkpoint fills. The whole file is checked before any
weight changes: nothing is ever merged halfway. Only .safetensors is read (nothing is unpickled).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, read_state_dict
from .formats.export_keys import unet_names

# The suffix of each LoRA tensor: which part it is. The module name is what comes before it.
_PARTS = [
    (re.compile(r"^(.+)\.lora_down\.weight$"), "down"), (re.compile(r"^(.+)\.lora_up\.weight$"), "up"),
    (re.compile(r"^(.+)\.alpha$"), "alpha"),
    (re.compile(r"^(.+)\.lora_A(?:\.default)?\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora_B(?:\.default)?\.weight$"), "up"),
    (re.compile(r"^(.+)\.lora(?:_linear_layer)?\.down\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora(?:_linear_layer)?\.up\.weight$"), "up"),
]
# diffusers' attention-processor form: `attn1.processor.to_q_lora.down.weight` is layer `attn1.to_q`.
_PROCESSOR = (re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\."), r".\1.lora.")
# Layer names of other architectures, refused by name: SDXL's (openaimodel-style U-Net names in
# kohya files, a second text encoder) and adapter types that are not LoRA.
_SDXL_MARKERS = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_", "lora_te1_",
                 "lora_te2_", "text_encoder_2.", "add_embedding")
_NOT_LORA = {"hada_": "a LyCORIS LoHa", "lokr_": "a LyCORIS LoKr", "dora_scale": "a DoRA",
             ".diff": "a full-weight difference (LyCORIS 'full')"}


@dataclass
class _Delta:
    """One layer's low-rank update, checked against the layer."""
    component: str  # "unet" or "text_encoder"
    layer: str  # the native module name
    key: str  # the file's name for it, for messages
    up: torch.Tensor
    down: torch.Tensor
    alpha: float

    def weight(self, shape) -> torch.Tensor:
        """alpha / r * up @ down in float32, shaped as the layer's weight."""
        rank = self.down.shape[0]
        product = self.up.float().reshape(self.up.shape[0], rank) @ self.down.float().reshape(rank, -1)
        return (self.alpha / rank * product).reshape(shape)


@dataclass
class LoraState:
    """What is merged into a pipeline: the files with their scales, and the original weight of every
    layer any of them touched (kept once, from before the first merge)."""
    loaded: list = field(default_factory=list)
    originals: dict = field(default_factory=dict)  # (component, layer) -> original weight


def _state(pipe) -> LoraState:
    return pipe.__dict__.setdefault("_lora_state", LoraState())


def loaded(pipe) -> list:
    """[(path, scale), ...] of the LoRA files merged into `pipe`, in load order."""
    return list(_state(pipe).loaded)


def _layers(module: nn.Module) -> dict:
    """{native module name: layer} of every Linear and Conv2d, the layers a LoRA can reach."""
    return {name: m for name, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _names(pipe) -> dict:
    """Every name a LoRA file may give a layer -> (component, native module name)."""
    names = {}
    unet_layers = _layers(pipe.denoiser)
    diffusers = unet_names([f"{layer}.weight" for layer in unet_layers], pipe.denoiser.config, "diffusers")
    for native, public in diffusers.items():
        module = public[: -len(".weight")]
        target = ("unet", native[: -len(".weight")])
        names.update({f"lora_unet_{module.replace('.', '_')}": target, f"unet.{module}": target, module: target})
    if pipe.text_encoder is not None:
        for layer in _layers(pipe.text_encoder):
            target = ("text_encoder", layer)
            names.update({f"lora_te_text_model_{layer.replace('.', '_')}": target,
                          f"text_encoder.text_model.{layer}": target, f"text_encoder.{layer}": target})
    return names


def _refuse_other_kinds(key: str, source: str):
    for marker, what in _NOT_LORA.items():
        if marker in key:
            raise CheckpointError(f"{source}: LoRA key {key!r} belongs to {what} adapter, not a LoRA; minidiff merges "
                                  "plain LoRA (lora_down/lora_up or lora_A/lora_B) only")
    if key.startswith(_SDXL_MARKERS) or any(marker in key for marker in _SDXL_MARKERS[-2:]):
        raise CheckpointError(f"{source}: LoRA key {key!r} is a Stable Diffusion XL layer name (openaimodel-style "
                              "U-Net names, a second text encoder): this LoRA is for SDXL, and the model is SD1.x-shaped")


def _group(tensors: dict, source: str) -> dict:
    """{module name in the file: {"up", "down", "alpha"}}, every key accounted for."""
    groups: dict = {}
    for key, value in tensors.items():
        _refuse_other_kinds(key, source)
        name = _PROCESSOR[0].sub(_PROCESSOR[1], key)
        match = next(((m, part) for pattern, part in _PARTS if (m := pattern.match(name))), None)
        if match is None:
            raise CheckpointError(f"{source}: key {key!r} is not part of a LoRA (expected names ending in "
                                  ".lora_down.weight / .lora_up.weight / .alpha, or .lora_A.weight / .lora_B.weight)")
        module, part = match[0].group(1), match[1]
        if part in groups.setdefault(module, {}):
            raise CheckpointError(f"{source}: layer {module!r} has two {part} tensors (two spellings of one "
                                  f"layer, second {key!r})")
        groups[module][part] = (key, value)
    return groups


def _delta(module: str, parts: dict, target, layer: nn.Module, source: str) -> _Delta:
    """Check one layer's LoRA tensors against the layer; the message names the key at fault."""
    for need in ("up", "down"):
        if need not in parts:
            have = ", ".join(key for key, _ in parts.values())
            raise CheckpointError(f"{source}: layer {module!r} has no lora {need} weight (found only {have}); "
                                  "the file is incomplete")
    (up_key, up), (down_key, down) = parts["up"], parts["down"]
    weight = layer.weight
    out_ch, in_ch, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
    if up.ndim not in (2, 4) or down.ndim not in (2, 4) or not up.is_floating_point():
        raise CheckpointError(f"{source}: {up_key!r} {tuple(up.shape)} and {down_key!r} {tuple(down.shape)} are not "
                              "LoRA matrices (2-D, or 4-D for convolutions)")
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise CheckpointError(f"{source}: rank mismatch at {module!r}: {down_key!r} has rank {rank} but {up_key!r} "
                              f"has rank {up.shape[1]}")
    kernel_ok = tuple(down.shape[2:]) == kernel or math.prod(down.shape[2:]) == math.prod(kernel) == 1
    if up.shape[0] != out_ch or down.shape[1] != in_ch or math.prod(up.shape[2:]) != 1 or not kernel_ok:
        raise CheckpointError(f"{source}: {up_key!r} {tuple(up.shape)} @ {down_key!r} {tuple(down.shape)} does not "
                              f"fit the layer's weight {tuple(weight.shape)}: a LoRA for another base model "
                              "(SDXL, SD2.x) or another size?")
    alpha = float(rank)
    if "alpha" in parts:
        alpha_key, value = parts["alpha"]
        if value.numel() != 1 or not math.isfinite(float(value.reshape(()))):
            raise CheckpointError(f"{source}: {alpha_key!r} must be one finite number, got shape {tuple(value.shape)}")
        alpha = float(value.reshape(()))
    return _Delta(target[0], target[1], up_key, up, down, alpha)


def read_lora(path, pipe) -> list:
    """The checked updates of a LoRA file for `pipe`'s layers; raises CheckpointError naming the key
    at fault (unknown layer, rank or shape mismatch, another architecture) before anything changes."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"LoRA file {path} is not .safetensors; minidiff reads LoRA only as safetensors "
                              "(other formats would have to be unpickled)")
    tensors = read_state_dict(path)
    if not tensors:
        raise CheckpointError(f"LoRA file {path} holds no tensors")
    names = _names(pipe)
    modules = {"unet": dict(pipe.denoiser.named_modules()),
               "text_encoder": dict(pipe.text_encoder.named_modules()) if pipe.text_encoder is not None else {}}
    deltas, seen = [], {}
    for module, parts in _group(tensors, str(path)).items():
        first_key = next(key for key, _ in parts.values())
        target = names.get(module)
        if target is None:
            where = "the text encoder, which this model does not have" if module.startswith(
                ("lora_te_", "text_encoder.")) else "no layer of this model"
            raise CheckpointError(f"{path}: LoRA key {first_key!r} matches {where}; is the file for another base "
                                  "model?")
        if target in seen:
            raise CheckpointError(f"{path}: {first_key!r} and {seen[target]!r} both name layer {target[1]!r}")
        seen[target] = first_key
        deltas.append(_delta(module, parts, target, modules[target[0]][target[1]], str(path)))
    return deltas


def load_lora(pipe, path, scale: float = 1.0):
    """Merge the LoRA file at `path` into `pipe`'s U-Net and text encoder, times `scale`.

    Repeatable, each file with its own scale; `unload_lora` restores the weights from before the first.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"LoRA scale must be a finite number, got {scale!r}")
    if not hasattr(pipe.denoiser, "input_blocks"):
        raise ValueError("LoRA files name U-Net and text-encoder layers; this pipeline's denoiser is a DiT")
    deltas = read_lora(path, pipe)
    state = _state(pipe)
    for delta in deltas:
        layer = getattr(pipe, delta.component).get_submodule(delta.layer)
        weight = layer.state_dict()["weight"]  # plain layout, also for packed layers
        state.originals.setdefault((delta.component, delta.layer), weight.detach().clone())
        merged = weight.float() + scale * delta.weight(weight.shape).to(weight.device)
        layer.load_state_dict({"weight": merged.to(weight.dtype)}, strict=False)  # packed layers repack on next use
    state.loaded.append((str(path), float(scale)))


def unload_lora(pipe):
    """Put back the original weight of every layer a LoRA touched, bit for bit."""
    state = _state(pipe)
    for (component, layer), original in state.originals.items():
        module = getattr(pipe, component).get_submodule(layer)
        module.load_state_dict({"weight": original}, strict=False)
    state.originals.clear()
    state.loaded.clear()


def parse_lora_arg(text: str) -> tuple:
    """`FILE[:SCALE]` (the CLI's --lora) -> (path, scale); a path may itself hold colons."""
    path, _, tail = text.rpartition(":")
    try:
        scale = float(tail) if path else None
    except ValueError:
        scale = None
    if scale is None:
        path, scale = text, 1.0
    if not math.isfinite(scale):
        raise ValueError(f"--lora {text!r}: the scale after ':' must be a finite number")
    return path, scale
