"""CLIP text encoder weights and tokenizer files in their public spellings -> minidiff's."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import torch

from ..checkpoint import CheckpointError, check_state_dict
from ..text import CLIPTextConfig, CLIPTextEncoder, CLIPTokenizer


TEXT_PREFIXES = ("cond_stage_model.transformer.text_model.", "text_model.", "")


def text_keys_to_native(state_dict: Mapping[str, torch.Tensor], prefix: str | None = None,
                        config: CLIPTextConfig | None = None) -> dict[str, torch.Tensor]:
    """Strip a checkpoint's text-encoder prefix and check every key and shape against `config`.

    `prefix` is found when not given: CompVis single files use
    `cond_stage_model.transformer.text_model.`, diffusers folders `text_model.`, and
    transformers>=5.6 saves none. Keys outside the prefix belong to other models and are skipped;
    the `embeddings.position_ids` buffer of older files is dropped, since positions are always 0..L-1.
    """
    if prefix is None:
        prefix = next((p for p in TEXT_PREFIXES if any(key.startswith(p) for key in state_dict)), "")
    native = {key[len(prefix):]: value for key, value in state_dict.items()
              if key.startswith(prefix) and key != prefix + "embeddings.position_ids"}
    with torch.device("meta"):  # shapes only, no memory
        expected = CLIPTextEncoder(config)
    check_state_dict(expected, native, f"text encoder (keys after prefix {prefix!r}, {expected.config})")
    return native


def text_config_from_weights(state_dict: Mapping) -> CLIPTextConfig:
    """The CLIP text tower's shape read off its weights (native keys); heads are 64 channels wide.

    Every CLIP text tower (ViT-B/L, OpenCLIP H/bigG) uses 64-channel heads; --text-config overrides.
    """
    try:
        vocab, hidden = state_dict["embeddings.token_embedding.weight"].shape
        positions = state_dict["embeddings.position_embedding.weight"].shape[0]
        intermediate = state_dict["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"the text encoder weights lack {e.args[0]!r}; is this a CLIP text model?") from None
    layers = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    return CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                          num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                          max_position_embeddings=positions)


def tokenizer_from_folder(folder) -> CLIPTokenizer:
    """vocab.json + merges.txt, or the tokenizer.json that transformers 5 writes instead of them."""
    folder = Path(folder)
    fast = folder / "tokenizer.json"
    if (folder / "vocab.json").is_file() or not fast.is_file():
        return CLIPTokenizer.from_folder(folder)
    try:
        model = json.loads(fast.read_text()).get("model", {})
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{fast} is not valid JSON: {e}") from None
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
        raise CheckpointError(f"{fast} is not a CLIP BPE tokenizer (model type {model.get('type')!r})")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return CLIPTokenizer(model["vocab"], merges)
