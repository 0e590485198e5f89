"""CLIP text side of Stable Diffusion 1.x: the byte-level BPE tokenizer and the text transformer.

The tokenizer reproduces transformers' `CLIPTokenizer` (the only one transformers 5.x ships, backed
by `tokenizers`): NFC, whitespace collapse, per-character lowercase, CLIP's word split, byte-level
BPE with a `</w>` end-of-word marker. The encoder is CLIP ViT-L/14's text tower; SD conditions on
its `last_hidden_state` after the final layer norm, shape (B, 77, 768).
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import re
import unicodedata
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .writing import atomic_path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_ID = 49406  # ids of the two specials in CLIP's 49408-token vocabulary
EOS_ID = 49407
CONTEXT_LENGTH = 77
END_OF_WORD = "</w>"
# OpenAI's CLIP vocabulary (MIT; see assets/LICENSE-clip-bpe.txt), shipped as package data.
DEFAULT_BPE = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"

# Unicode White_Space, which is what `\s` means to the Oniguruma regexes inside `tokenizers`.
# Python's str.isspace() differs: it also counts U+001C..U+001F, which CLIP keeps as symbols.
_WHITESPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WHITESPACE_RUN = re.compile(f"[{_WHITESPACE}]+")
# Marks added in Unicode 10-14 (plus U+11930, which composes into U+11938). `tokenizers` runs NFC
# with Unicode 9 tables, where these are plain starters: never reordered, never composed. Python's
# newer tables would move them, so NFC runs on the text between them and leaves them in place.
_MARKS_UNKNOWN_TO_TOKENIZERS_NFC = re.compile(
    "([\u07fd\u0898-\u089f\u08ca-\u08d3\u09fe\u0c3c\u0d3b-\u0d3c\u0eba\u1715\u1abf-\u1ace\u1df6-\u1dfa"
    "\ua82c\U00010d24-\U00010d27\U00010eab-\U00010eac\U00010f46-\U00010f50\U00010f82-\U00010f85"
    "\U00011070\U0001133b\U0001145e\U00011839-\U0001183a\U00011930\U0001193d-\U0001193e\U00011943"
    "\U000119e0\U00011a34\U00011a47\U00011a99\U00011d42\U00011d44-\U00011d45\U00011d97"
    "\U00016ff0-\U00016ff1\U0001e130-\U0001e136\U0001e2ae\U0001e2ec-\U0001e2ef])")
_SPECIALS = re.compile(f"({re.escape(BOS_TOKEN)}|{re.escape(EOS_TOKEN)})")
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable character, so BPE can work on strings without control bytes.

    The order matters: CLIP numbers its first 256 tokens in this dict's order, printable bytes first.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    unprintable = [byte for byte in range(256) if byte not in table]
    table.update({byte: chr(256 + i) for i, byte in enumerate(unprintable)})  # borrow code points above 255
    return table


@functools.lru_cache(maxsize=4096)
def _char_kind(char: str) -> str:
    """Which of CLIP's word classes a character belongs to: space, letter, number or symbol."""
    if _WHITESPACE_RUN.match(char):
        return "space"
    category = unicodedata.category(char)[0]
    return {"L": "letter", "N": "number"}.get(category, "symbol")


def normalize(text: str) -> str:
    """NFC, whitespace runs to one space, lowercase one character at a time (so final Σ stays σ)."""
    pieces = _MARKS_UNKNOWN_TO_TOKENIZERS_NFC.split(text)  # odd indices are the marks themselves
    text = "".join(piece if i % 2 else unicodedata.normalize("NFC", piece) for i, piece in enumerate(pieces))
    text = _WHITESPACE_RUN.sub(" ", text)
    return "".join(char.lower() for char in text)


def pre_tokenize(text: str) -> list[str]:
    """Split normalised text into CLIP's words.

    Same as CLIP's pattern `'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+`: contractions,
    letter runs, single digits and symbol runs; whitespace only separates.
    """
    words, start = [], 0
    while start < len(text):
        kind = _char_kind(text[start])
        if kind == "space":
            start += 1
            continue
        contraction = next((c for c in _CONTRACTIONS if text.startswith(c, start)), None)
        if contraction:
            words.append(contraction)
            start += len(contraction)
            continue
        end = start + 1
        if kind != "number":  # digits are words on their own, so "2024" costs four tokens
            while end < len(text) and _char_kind(text[end]) == kind:
                end += 1
        words.append(text[start:end])
        start = end
    return words


class CLIPTokenizer:
    """Byte-level BPE tokenizer of CLIP, producing SD1.x's (B, 77) id tensors."""

    def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]]):
        self._byte_chars = bytes_to_unicode()
        byte_tokens = list(self._byte_chars.values())
        needed = [BOS_TOKEN, EOS_TOKEN, *byte_tokens, *(t + END_OF_WORD for t in byte_tokens)]
        absent = [token for token in needed if token not in vocab]
        if absent:
            raise ValueError(f"The vocabulary lacks {len(absent)} tokens every CLIP vocabulary has, e.g. "
                             f"{absent[:5]}; it needs {BOS_TOKEN!r}, {EOS_TOKEN!r} and all 512 byte tokens.")
        self.vocab = dict(vocab)
        self.merges = [tuple(pair) for pair in merges]
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        # SD1.x pads with <|endoftext|>; OpenCLIP (SD2) would pad with 0.
        self.bos_id, self.eos_id, self.pad_id = vocab[BOS_TOKEN], vocab[EOS_TOKEN], vocab[EOS_TOKEN]
        # Prompts repeat words a lot; BPE on a word is the slow part, so remember it.
        self._bpe = functools.lru_cache(maxsize=65536)(self._bpe_uncached)

    @classmethod
    def from_folder(cls, path: str | Path) -> CLIPTokenizer:
        """Read `vocab.json` and `merges.txt`, e.g. a diffusers `tokenizer/` folder."""
        folder = Path(path)
        vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
        for file, what in ((vocab_file, "a JSON object mapping token to id"),
                           (merges_file, "one BPE merge 'a b' per line after a '#version' header")):
            if not file.is_file():
                raise FileNotFoundError(f"CLIP tokenizer file {file} is missing; expected {what} there "
                                        f"(a diffusers checkpoint keeps both files in its tokenizer/ folder).")
        try:
            vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{vocab_file} is not valid UTF-8 JSON ({error}); re-download the tokenizer.") from None
        try:
            lines = merges_file.read_text(encoding="utf-8").split("\n")
        except UnicodeDecodeError as error:
            raise ValueError(f"{merges_file} is not UTF-8 text ({error}); re-download the tokenizer.") from None
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise ValueError(f"{vocab_file} must be a JSON object mapping each token to an integer id.")
        if len(set(vocab.values())) != len(vocab):
            raise ValueError(f"{vocab_file} gives the same id to two tokens; the file is corrupt.")
        has_header = lines[0].startswith("#version")
        merges = _parse_merges(lines[has_header:], merges_file, first_line=1 + has_header)
        for left, right in merges:
            if left + right not in vocab:
                raise ValueError(f"{merges_file} merges {left!r} and {right!r} into {left + right!r}, which "
                                 f"{vocab_file} lacks; the two files do not belong to the same tokenizer.")
        return cls(vocab, merges)

    @classmethod
    def from_bpe_gz(cls, path: str | Path) -> CLIPTokenizer:
        """Build the vocabulary from OpenAI's `bpe_simple_vocab_16e6.txt.gz`, as CLIP itself does."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"CLIP BPE file {path} is missing; expected OpenAI's "
                                    f"bpe_simple_vocab_16e6.txt.gz (it ships with the `clip` package).")
        try:
            lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not a gzip of UTF-8 text ({error}); re-download it.") from None
        # CLIP keeps the first 49152 - 256 - 2 merges: 256 byte tokens and 2 specials fill the rest.
        merges = _parse_merges(lines[1:49152 - 256 - 2 + 1], path, first_line=2)
        byte_tokens = list(bytes_to_unicode().values())
        tokens = byte_tokens + [t + END_OF_WORD for t in byte_tokens]
        tokens += ["".join(pair) for pair in merges] + [BOS_TOKEN, EOS_TOKEN]
        return cls({token: i for i, token in enumerate(tokens)}, merges)

    @classmethod
    def default(cls) -> CLIPTokenizer:
        """SD 1.x's tokenizer (CLIP ViT-L/14's), from the BPE vocabulary shipped with minidiff, so
        single-file checkpoints, which hold no vocabulary, convert offline."""
        return cls.from_bpe_gz(DEFAULT_BPE)

    def save(self, folder: str | Path) -> None:
        """Write `vocab.json` and `merges.txt` byte-for-byte in the layout diffusers ships."""
        folder = Path(folder)
        with atomic_path(folder / "vocab.json") as tmp:
            text = json.dumps(self.vocab, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
            tmp.write_text(text, encoding="utf-8")
        with atomic_path(folder / "merges.txt") as tmp:
            tmp.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges), encoding="utf-8")

    def _bpe_uncached(self, word: str) -> tuple[str, ...]:
        """Merge one byte-encoded word, always taking the lowest-ranked adjacent pair first."""
        parts = [*word[:-1], word[-1] + END_OF_WORD]
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, math.inf))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS and without truncation."""
        ids = []
        # Special tokens are matched on the raw text, before lowercasing, as in transformers.
        for segment in _SPECIALS.split(text):
            if segment in (BOS_TOKEN, EOS_TOKEN):
                ids.append(self.vocab[segment])
                continue
            for word in pre_tokenize(normalize(segment)):
                byte_word = "".join(self._byte_chars[b] for b in word.encode("utf-8"))
                ids.extend(self.vocab[token] for token in self._bpe(byte_word))
        return ids

    def __call__(self, texts: str | Sequence[str], max_length: int = CONTEXT_LENGTH) -> torch.Tensor:
        """(B, max_length) LongTensor: BOS, ids, EOS, then EOS as padding; long prompts are cut."""
        if isinstance(texts, str):
            texts = [texts]
        if max_length < 2:
            raise ValueError(f"max_length must leave room for BOS and EOS (at least 2), got {max_length}.")
        rows = []
        for text in texts:
            ids = self.encode(text)
            if len(ids) > max_length - 2:
                warnings.warn(f"Prompt is {len(ids) + 2} tokens with BOS/EOS; dropped the last "
                              f"{len(ids) - (max_length - 2)} tokens to fit {max_length}: {text[:60]!r}...",
                              stacklevel=2)
                ids = ids[:max_length - 2]
            row = [self.bos_id, *ids, self.eos_id]
            rows.append(row + [self.pad_id] * (max_length - len(row)))
        return torch.tensor(rows, dtype=torch.long)


def _parse_merges(lines: Sequence[str], source: Path, first_line: int) -> list[tuple[str, str]]:
    """Pairs from 'left right' lines; blank lines are skipped, anything else is an error."""
    pairs = [line.split() for line in lines]  # one pass; models load this file every time
    for number, (line, pair) in enumerate(zip(lines, pairs), start=first_line):
        if len(pair) not in (0, 2):
            raise ValueError(f"{source} line {number} should hold two tokens separated by a space, got "
                             f"{line[:80]!r}; the merges file is malformed.")
    return [(pair[0], pair[1]) for pair in pairs if pair]


# ---------------------------------------------------------------------------------------------------
# Text encoder


@dataclass
class CLIPTextConfig:
    """Shape of the CLIP text transformer; the defaults are CLIP ViT-L/14, SD1.x's text encoder."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"CLIPTextConfig.{name} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by "
                             f"num_attention_heads {self.num_attention_heads}.")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(_ACTIVATIONS)}.")
        if isinstance(self.layer_norm_eps, bool) or not isinstance(self.layer_norm_eps, (int, float)) \
                or self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}.")

    @classmethod
    def from_dict(cls, config: Mapping) -> CLIPTextConfig:
        """Read a transformers `config.json`; keys that do not shape the network are ignored."""
        if config.get("model_type") == "clip" and "text_config" in config:
            config = config["text_config"]  # a full CLIPModel config nests the text tower
        model_type = config.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            raise ValueError(f"Expected a CLIP text model config (model_type 'clip_text_model'), "
                             f"got model_type {model_type!r}.")
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})

    def to_dict(self) -> dict:
        """Plain dict of the fields, loadable by `from_dict`."""
        return {"model_type": "clip_text_model", **asdict(self)}


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's sigmoid approximation of GELU; the weights were trained with it."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": _quick_gelu, "gelu": F.gelu}


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each token sees only itself and earlier tokens."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        width = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, L, H*D) -> (B, H, L, D)
        q, k, v = (rearrange(proj(x), "b l (h d) -> b h l d", h=self.heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(rearrange(out, "b h l d -> b l (h d)"))


class MLP(nn.Module):
    """Two linear layers around the configured activation."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer layer: attention then MLP, each added to the residual stream."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CausalSelfAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    """Token plus learned position embeddings; positions are always 0..L-1."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class Encoder(nn.Module):
    """The stack of transformer layers (a module so the keys read `encoder.layers.{i}`)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))


class CLIPTextEncoder(nn.Module):
    """CLIP's text transformer; state-dict keys are transformers' without the `text_model.` prefix."""

    def __init__(self, config: CLIPTextConfig | None = None):
        super().__init__()
        self.config = config or CLIPTextConfig()
        self.embeddings = Embeddings(self.config)
        self.encoder = Encoder(self.config)
        self.final_layer_norm = nn.LayerNorm(self.config.hidden_size, eps=self.config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, hidden) last_hidden_state after the final layer norm."""
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"Got {input_ids.shape[1]} tokens but the encoder has only "
                             f"{self.config.max_position_embeddings} positions; tokenize with that max_length.")
        x = self.embeddings(input_ids)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)
