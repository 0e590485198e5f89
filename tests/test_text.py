"""Tests for minidiff.text: CLIP tokenizer and text encoder, with parity against transformers."""

import gzip
import json
import random
import unicodedata
import warnings

import pytest
import torch

from conftest import SHARED
from minidiff.text import (
    BOS_ID,
    EOS_ID,
    CLIPTextConfig,
    CLIPTextEncoder,
    CLIPTokenizer,
    bytes_to_unicode,
)
from minidiff.formats.text_keys import text_keys_to_native

SD15 = SHARED / "runwayml--stable-diffusion-v1-5"
TOKENIZER_DIR = SD15 / "tokenizer"
MANIFEST = SHARED / "_generated-key-manifests" / "sd15-ldm-single-file.json"
SINGLE_FILE_PREFIX = "cond_stage_model.transformer.text_model."

needs_shared = pytest.mark.skipif(not TOKENIZER_DIR.is_dir(),
                                  reason=f"shared reference configs not found at {SD15}")


@pytest.fixture(scope="module")
def tokenizer():
    if not TOKENIZER_DIR.is_dir():
        pytest.skip(f"CLIP vocab not found at {TOKENIZER_DIR}")
    return CLIPTokenizer.from_folder(TOKENIZER_DIR)


# ---------------------------------------------------------------------------------------------------
# Tokenizer

HAND_WRITTEN = [
    "a photograph of an astronaut riding a horse",
    "A Photograph Of An ASTRONAUT, riding a horse!!! (masterpiece:1.2), [best quality]",
    "don't can't won't it's I'M we've they'll she'd you're O'Neil's rock'n'roll ''s '''t",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &#39;quoted&#39; &quot;x&quot; AT&T",
    "  leading   and trailing   ", "tabs\t\tand\nnew\r\nlines\u3000ideographic\xa0nbsp\x1cfs",
    "", " ", "\n\t",
    "emoji 😀🎨👩‍🚀 skin 👍🏽 flags 🇯🇵🇫🇷 keycap 1️⃣",
    "東京タワーの夜景、高精細 한국어 프롬프트 中文提示词 ｆｕｌｌｗｉｄｔｈ",
    "Ελληνικά ΟΔΟΣ ΣΑΣ Русский текст العربية עברית हिन्दी ไทย ქართული",
    "café naïve façade résumé | decomposed: cafe\u0301 nai\u0308ve | Å Å Å",
    "İstanbul ß ẞ ﬁ ﬂ ǅ ǈ Ⅻ ½ ² ① ٣ ௰",
    "numbers 1234567890 3.14159 1,000,000 -42 +7 1e-5 0x1F",
    "<|startoftext|> inside <|endoftext|>text!<|endoftext|> <|ENDOFTEXT|> <|endoftext",
    "symbols ~`!@#$%^&*()_+-={}[]|\\:;\"'<>,.?/ ... --- *** ###",
    "x" * 300,
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    ", ".join(["highly detailed", "8k", "octane render", "trending on artstation"] * 12),
    "a " * 76, "a " * 75, "a " * 74, "1" * 80,
]


def generated_prompts(tokenizer, count=400, seed=0):
    """Deterministic mix of vocabulary words, scripts, marks, emoji and whitespace runs."""
    rng = random.Random(seed)
    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    words = []
    for token in list(tokenizer.vocab)[:49406:7]:
        try:
            words.append(bytes(to_byte[c] for c in token.removesuffix("</w>")).decode("utf-8"))
        except UnicodeDecodeError:
            continue
    pool = ("abcXYZ éñüÅ\u0301\u0308\u0316 's 't don't 0123456789 !?.,;:-_()&amp;<>'\" 中文日本語한국어 "
            "ΣΑΣ İ ß ﬁ Ⅻ ½ 😀👍🏽🇯🇵 \t\n\u3000\xa0\x1c\u200b\u200d\ufeff")
    prompts = []
    for i in range(count):
        kind = i % 3
        if kind == 0:
            separators = [" ", "  ", ", ", "", "\t"]
            text = "".join(rng.choice(words) + rng.choice(separators) for _ in range(rng.randint(1, 30)))
        elif kind == 1:
            text = "".join(rng.choice(pool) * rng.choice([1, 1, 1, 2, 5]) for _ in range(rng.randint(0, 60)))
        else:
            text = " ".join(rng.choice(words).upper() if rng.random() < 0.3 else rng.choice(words)
                            for _ in range(rng.randint(1, 90)))
        prompts.append(text)
    return prompts


def character_sweep(step=37, per_string=24):
    """Strings made of assigned code points across all planes, so every script gets a look."""
    chars = [chr(c) for c in range(0x20, 0x30000, step)
             if unicodedata.category(chr(c)) not in ("Cn", "Cs", "Co")]
    return ["".join(chars[i:i + per_string]) for i in range(0, len(chars), per_string)]


@needs_shared
def test_tokenizer_matches_transformers_on_varied_prompts(tokenizer):
    hf_module = pytest.importorskip("transformers")
    reference = hf_module.CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    prompts = HAND_WRITTEN + generated_prompts(tokenizer) + character_sweep()
    assert len(prompts) >= 400
    expected = reference(prompts, padding="max_length", truncation=True, max_length=77).input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # long prompts are meant to be cut here
        got = tokenizer(prompts).tolist()
    mismatches = [(p, g, e) for p, g, e in zip(prompts, got, expected) if g != e]
    assert not mismatches, f"{len(mismatches)} of {len(prompts)} differ, first: {mismatches[0]}"


def test_known_vectors(tokenizer):
    ids = tokenizer("a photograph of an astronaut riding a horse")
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0].tolist() == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558] + [49407] * 68
    assert tokenizer("")[0].tolist() == [49406] + [49407] * 76
    assert tokenizer(["a", "b c"]).shape == (2, 77)
    assert tokenizer.encode("don't") == [847, 713]


def test_bpe_gz_builds_same_vocab_and_merges_as_folder(tokenizer, tmp_path):
    merges = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    merges = [line for line in merges if line]
    assert len(merges) == 49152 - 256 - 2
    # OpenAI's file has a header line and far more merges than CLIP keeps; the tail must be ignored.
    lines = ['"bpe_simple_vocab_16e6.txt#version: 0.2'] + merges + ["zz qq", "qq zz"]
    gz = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    gz.write_bytes(gzip.compress("\n".join(lines).encode("utf-8")))
    from_gz = CLIPTokenizer.from_bpe_gz(gz)
    assert from_gz.vocab == tokenizer.vocab
    assert from_gz.merges == tokenizer.merges
    assert from_gz.encode("a photograph of an astronaut") == tokenizer.encode("a photograph of an astronaut")


@needs_shared
def test_save_writes_the_diffusers_files_byte_for_byte(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer")
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "tokenizer" / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes()


def test_long_prompt_warns_and_keeps_eos(tokenizer):
    prompt = "red " * 100
    with pytest.warns(UserWarning, match="dropped the last 25 tokens"):
        ids = tokenizer(prompt)[0].tolist()
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID and ids[1:76] == [736] * 75
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenizer("red " * 75)  # exactly fits: no warning


def test_missing_tokenizer_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "merges.txt")):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="bpe_simple_vocab_16e6"):
        CLIPTokenizer.from_bpe_gz(tmp_path / "nothing.txt.gz")


def test_malformed_tokenizer_files_are_reported(tmp_path):
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["ab</w>", "<|startoftext|>", "<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b</w>\n")
    assert CLIPTokenizer.from_folder(tmp_path).merges == [("a", "b</w>")]
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match="line 2 should hold two tokens"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nb a\n")
    with pytest.raises(ValueError, match="do not belong to the same tokenizer"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid UTF-8 JSON"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="lacks 513 tokens every CLIP vocabulary has"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="not a gzip"):
        CLIPTokenizer.from_bpe_gz(tmp_path / "bad.gz")


# ---------------------------------------------------------------------------------------------------
# Config

@needs_shared
def test_config_reads_transformers_config_json():
    raw = json.loads((SD15 / "text_encoder" / "config.json").read_text())
    config = CLIPTextConfig.from_dict(raw)
    assert config == CLIPTextConfig()
    assert CLIPTextConfig.from_dict(config.to_dict()) == config
    assert CLIPTextConfig.from_dict({"model_type": "clip", "text_config": {"hidden_size": 512,
                                     "num_attention_heads": 8}}).hidden_size == 512


@pytest.mark.parametrize("bad, match", [
    ({"hidden_act": "relu"}, "hidden_act 'relu' is not supported"),
    ({"hidden_size": 100, "num_attention_heads": 12}, "must be divisible by num_attention_heads"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
    ({"vocab_size": "49408"}, "vocab_size must be a positive integer"),
    ({"layer_norm_eps": -1.0}, "layer_norm_eps must be positive"),
    ({"layer_norm_eps": "1e-5"}, "layer_norm_eps must be positive"),
    ({"model_type": "t5"}, "model_type 't5'"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        CLIPTextConfig.from_dict(bad)


# ---------------------------------------------------------------------------------------------------
# Text encoder

def transformers_text_model(config: CLIPTextConfig, seed: int):
    """transformers' CLIPTextModel of the same shape, every parameter random (LayerNorm scales near 1)."""
    hf_module = pytest.importorskip("transformers")
    hf_config = hf_module.CLIPTextConfig(**{k: v for k, v in config.to_dict().items() if k != "model_type"},
                                         bos_token_id=0, eos_token_id=2, pad_token_id=1)
    model = hf_module.CLIPTextModel(hf_config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if "layer_norm" in name and name.endswith("weight") else 0.1 * noise)
    return model


def spelled(state_dict, spelling):
    """The same weights under one of the three key spellings found in real files."""
    if spelling == "transformers>=5.6":
        return dict(state_dict)
    prefix = "text_model." if spelling == "diffusers" else SINGLE_FILE_PREFIX
    renamed = {prefix + key: value for key, value in state_dict.items()}
    renamed[prefix + "embeddings.position_ids"] = torch.arange(77)[None]  # old files carry this buffer
    if spelling == "single-file":
        renamed["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # other models' keys are skipped
    return renamed


TINY_CONFIGS = {
    "h64-l2-v1000": CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=256,
                                   num_hidden_layers=2, num_attention_heads=4),
    "h64-l3-v1000-gelu": CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=3, num_attention_heads=4, hidden_act="gelu"),
    "h32-l2-v49408": CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4),
}


@pytest.mark.parametrize("spelling", ["transformers>=5.6", "diffusers", "single-file"])
@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_encoder_matches_transformers_clip_text_model(name, spelling):
    config = TINY_CONFIGS[name]
    reference = transformers_text_model(config, seed=len(name))
    model = CLIPTextEncoder(config).eval()
    model.load_state_dict(text_keys_to_native(spelled(reference.state_dict(), spelling), config=model.config))
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, config.vocab_size, (3, 77), generator=generator)
    input_ids[:, 0], input_ids[0, 10:] = 0, 2  # a BOS-like start and a padded row
    with torch.no_grad():
        got = model(input_ids)
        for attention in ("sdpa", "eager"):  # measured: 0 against sdpa, ~1.6e-6 against eager
            reference.set_attn_implementation(attention)
            expected = reference(input_ids=input_ids).last_hidden_state
            error = (got - expected).abs().max().item()
            assert error <= 1e-4, f"max abs error {error:.2e} against {attention} attention"
    assert got.shape == (3, 77, config.hidden_size)


def test_full_size_encoder_matches_single_file_manifest():
    with torch.device("meta"):
        model = CLIPTextEncoder(CLIPTextConfig())
    assert sum(p.numel() for p in model.parameters()) == 123_060_480
    if not MANIFEST.is_file():
        pytest.skip(f"key manifest not found at {MANIFEST}")
    manifest = json.loads(MANIFEST.read_text())["keys"]
    text_keys = {k[len(SINGLE_FILE_PREFIX):]: tuple(v["shape"]) for k, v in manifest.items()
                 if k.startswith(SINGLE_FILE_PREFIX) and not k.endswith("position_ids")}
    assert len(text_keys) == 196
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == text_keys
    # The whole single-file key set (UNet and VAE keys included) converts without complaint.
    checkpoint = {k: torch.empty(v["shape"], device="meta") for k, v in manifest.items()}
    assert text_keys_to_native(checkpoint).keys() == text_keys.keys()


def test_missing_extra_and_misshaped_keys_are_listed_before_loading():
    config = TINY_CONFIGS["h64-l2-v1000"]
    model = CLIPTextEncoder(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint = {"text_model." + k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    del checkpoint["text_model.final_layer_norm.bias"]
    checkpoint["text_model.encoder.layers.2.mlp.fc1.weight"] = torch.zeros(256, 64)
    checkpoint["text_model.embeddings.token_embedding.weight"] = torch.zeros(999, 64)
    with pytest.raises(ValueError) as error:
        model.load_state_dict(text_keys_to_native(checkpoint, config=model.config))
    message = str(error.value)
    assert "1 missing key(s): final_layer_norm.bias" in message
    assert "1 unexpected key(s): encoder.layers.2.mlp.fc1.weight" in message
    assert "embeddings.token_embedding.weight: file (999, 64) vs model (1000, 64)" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "weights changed"


def test_too_many_tokens_is_an_error():
    model = CLIPTextEncoder(TINY_CONFIGS["h32-l2-v49408"])
    with pytest.raises(ValueError, match="only 77 positions"):
        model(torch.zeros(1, 78, dtype=torch.long))
