"""Hostile inputs: weight files that try to run code or lie about their size, corrupt folders and
configs, absurd arguments, and writers killed mid-save. Each must end in a valid result or a clear
error: never code from a file running, a crash, a hang, an allocation of what a file claims, or half
a checkpoint in place of a whole one.
"""
import json
import os
import pickle
import random
import re
import resource
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import REPO, randomize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kill_writer import TINY, VERSION_STRIDE, tiny_pipeline

import minidiff
from minidiff import writing
from minidiff.checkpoint import CheckpointError, check_state_dict, load_weights, read_state_dict
from minidiff.writing import atomic_folder, atomic_path, remove_stale_temps, save_json, save_safetensors
from minidiff.pipeline import Pipeline
from minidiff.schedules import SchedulerConfig
from minidiff.unet import UNet, UNetConfig

EXAMPLES = Counter()  # hypothesis examples run, by test and outcome; printed when the module ends
CLEAR_ERRORS = (ValueError, TypeError, CheckpointError)


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_report(request):
    """Tiny models run ~50x faster on one thread when the cores are shared; report examples at the end."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if EXAMPLES and capture is not None:
        with capture.global_and_fixture_disabled():
            print(f"\ntest_hostile hypothesis examples: {dict(sorted(EXAMPLES.items()))}")


class Hang(Exception):
    """Raised by time_limit: the code under test ran past its budget."""


@contextmanager
def time_limit(seconds: float):
    """Turn a hang into a failure (SIGALRM interrupts Python code between bytecodes)."""
    def expire(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def assert_clear(error: BaseException, *fragments: str):
    """A clear error: a ValueError/TypeError (CheckpointError is one) whose message says what it is about."""
    assert isinstance(error, CLEAR_ERRORS), f"{type(error).__name__}: {error}"
    message = str(error)
    assert len(message) > 10, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def clear_error(fn, *fragments: str, seconds: float = 20):
    with time_limit(seconds), pytest.raises(CLEAR_ERRORS) as info:
        fn()
    assert_clear(info.value, *fragments)
    return info.value


# -- pickles ----------------------------------------------------------------------------------------

class RunsShell:
    """Unpickling this runs a shell command (the classic malicious checkpoint)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class WritesFile:
    """Unpickling this calls builtins.exec with code that writes a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _torch_zip(path, obj):
    torch.save(obj, path)


def _torch_legacy(path, obj):
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def _plain_pickle(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=2))


@pytest.mark.parametrize("payload", [RunsShell, WritesFile])
@pytest.mark.parametrize("suffix,writer", [(".ckpt", _torch_zip), (".pt", _torch_legacy), (".bin", _plain_pickle),
                                           (".pth", _torch_zip)])
def test_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, payload, suffix, writer):
    marker = tmp_path / "MARKER"
    path = tmp_path / f"evil{suffix}"
    writer(path, {"state_dict": {"w": torch.ones(2)}, "extra": payload(marker)})
    error = clear_error(lambda: read_state_dict(path), str(path))
    assert "refused" in str(error) or "safe loader" in str(error)
    if writer is not _plain_pickle:  # torch's own formats: the message names what the file wanted to call
        assert "refused" in str(error) and ("system" in str(error) or "exec" in str(error))
    assert not marker.exists()


@pytest.mark.parametrize("payload", [RunsShell, WritesFile])
def test_control_the_payloads_do_run_when_unpickled_unsafely(tmp_path, payload):
    """Without this, 'the marker does not exist' could pass because the payload never worked."""
    marker = tmp_path / "MARKER"
    pickle.loads(pickle.dumps(payload(marker)))  # our own bytes, built just above: safe to run here
    assert marker.exists()


@pytest.mark.parametrize("writer", [_torch_zip, _torch_legacy])
def test_plain_weight_pickles_load_and_lightning_nesting_is_unwrapped(tmp_path, writer):
    w = torch.randn(3, 4)
    writer(tmp_path / "ok.ckpt", {"state_dict": {"model.w": w, "step": 7}, "epoch": 3})
    assert torch.equal(read_state_dict(tmp_path / "ok.ckpt")["model.w"], w)


@pytest.mark.parametrize("writer", [_torch_zip, _torch_legacy])
def test_truncated_pickles_are_clear_errors(tmp_path, writer):
    full = tmp_path / "full.pt"
    writer(full, {"w": torch.randn(64, 64)})
    data = full.read_bytes()
    for cut in (1, 16, len(data) // 3, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        clear_error(lambda: read_state_dict(tmp_path / "cut.pt"), "cut.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    clear_error(lambda: read_state_dict(tmp_path / "empty.pt"), "empty")


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch warns about odd pickle protocols it then refuses
@pytest.mark.parametrize("writer", [_torch_zip, _torch_legacy])
def test_damaged_pickle_bytes_load_or_fail_clearly(tmp_path, writer):
    """Random cuts and bit flips: torch's safe unpickler fails with IndexError, KeyError...; all become clear."""
    writer(tmp_path / "base.pt", {"state_dict": {"a": torch.randn(16, 16), "b": torch.arange(5)}, "epoch": 3})
    data = (tmp_path / "base.pt").read_bytes()
    rng = random.Random(2)
    outcomes = Counter()
    for trial in range(80):
        damaged = bytearray(data[: rng.randrange(len(data))] if trial % 2 else data)
        for _ in range(0 if trial % 2 else rng.randrange(1, 4)):
            damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        path = tmp_path / "damaged.pt"
        path.write_bytes(bytes(damaged))
        try:
            with time_limit(10):
                read_state_dict(path)
            outcomes["loaded"] += 1
        except CheckpointError as e:
            assert_clear(e, "damaged.pt")
            outcomes["error"] += 1
    assert outcomes["error"] >= 40, outcomes


def _patch_numel(data: bytes, old: int, new: int) -> bytes:
    """Change a storage size in a protocol-2 torch pickle (stored as BININT)."""
    needle = b"J" + struct.pack("<i", old)
    assert needle in data
    return data.replace(needle, b"J" + struct.pack("<i", new))


def test_legacy_pickle_claiming_a_huge_storage_is_an_error_without_using_that_memory(tmp_path):
    path = tmp_path / "huge.pt"
    _torch_legacy(path, {"w": torch.zeros(123_457)})
    path.write_bytes(_patch_numel(path.read_bytes(), 123_457, 2 ** 31 - 1))  # claims 8 GiB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    clear_error(lambda: read_state_dict(path), "huge.pt")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200 * 1024  # KiB


def test_unknown_suffix_folder_and_missing_file_are_clear_errors(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"PK")
    clear_error(lambda: read_state_dict(tmp_path / "w.npz"), "unknown weight file type")
    clear_error(lambda: read_state_dict(tmp_path), "is a folder")
    clear_error(lambda: read_state_dict(tmp_path / "absent.safetensors"), "does not exist")


# -- safetensors ------------------------------------------------------------------------------------

def _raw_safetensors(path: Path, header, data: bytes = b"", header_len=None):
    """A safetensors file with whatever header we like (the real writer would refuse most of these)."""
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def _entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


@pytest.fixture
def mapping_never_reached(monkeypatch):
    """Fail if a hostile header gets as far as the mmap/allocation step."""
    def refuse(*args, **kwargs):
        raise AssertionError("safetensors.load_file reached for a file whose header should have been refused")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)


HOSTILE_HEADERS = {
    "huge tensor": ({"w": _entry("F32", [10 ** 6, 10 ** 6], 0, 4 * 10 ** 12)}, 16, "only 16 bytes of data"),
    "offsets past the end": ({"a": _entry("F32", [4], 0, 16), "b": _entry("F32", [4], 16, 32)}, 16, "bytes 16..32"),
    "overlapping offsets": ({"a": _entry("F32", [4], 0, 16), "b": _entry("F32", [4], 8, 24)}, 24, "overlapping"),
    "same bytes twice": ({"a": _entry("F32", [4], 0, 16), "b": _entry("F32", [4], 0, 16)}, 16, "overlapping"),
    "shape vs bytes": ({"w": _entry("F32", [5], 0, 16)}, 16, "needs 20 bytes"),
    "shape overflow": ({"w": _entry("F32", [2 ** 62, 2 ** 62, 4], 0, 16)}, 16, "needs"),
    "unknown dtype": ({"w": _entry("Q99", [4], 0, 16)}, 16, "dtype 'Q99'"),
    "negative shape": ({"w": _entry("F32", [-4], 0, 16)}, 16, "non-negative"),
    "float shape": ({"w": _entry("F32", [4.0], 0, 16)}, 16, "non-negative ints"),
    "reversed offsets": ({"w": _entry("F32", [0], 16, 0)}, 16, "begin <= end"),
    "missing offsets": ({"w": {"dtype": "F32", "shape": [4]}}, 16, "data_offsets"),
    "entry not an object": ({"w": [1, 2, 3]}, 16, "no dtype"),
    "header a list": ([1, 2], 0, "JSON list"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_HEADERS))
def test_hostile_safetensors_header_is_refused_before_mapping(tmp_path, mapping_never_reached, name):
    header, data_len, fragment = HOSTILE_HEADERS[name]
    path = _raw_safetensors(tmp_path / "hostile.safetensors", header, b"\0" * data_len)
    clear_error(lambda: read_state_dict(path), "hostile.safetensors", fragment)


def test_header_length_past_the_file_is_refused(tmp_path, mapping_never_reached):
    for claimed in (2 ** 63, 2 ** 40, 10 ** 9):
        path = _raw_safetensors(tmp_path / "len.safetensors", {"w": _entry("F32", [1], 0, 4)}, b"\0" * 4, claimed)
        clear_error(lambda: read_state_dict(path), "header claims")


@pytest.fixture
def valid_safetensors(tmp_path):
    path = tmp_path / "valid.safetensors"
    save_safetensors({"conv.weight": torch.randn(8, 4, 3, 3), "conv.bias": torch.randn(8)}, path,
                     metadata={"format": "pt"})
    return path


def test_truncated_safetensors_at_every_kind_of_cut_point(tmp_path, valid_safetensors):
    data = valid_safetensors.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    cuts = [0, 1, 7, 8, 9, header_end // 2, header_end - 1, header_end, header_end + 1, (header_end + len(data)) // 2,
            len(data) - 4, len(data) - 1]
    for cut in cuts:
        path = tmp_path / "cut.safetensors"
        path.write_bytes(data[:cut])
        clear_error(lambda: read_state_dict(path), "cut.safetensors")


def test_garbage_header_is_a_clear_error(tmp_path, valid_safetensors):
    data = bytearray(valid_safetensors.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    rng = random.Random(0)
    data[8:header_end] = bytes(rng.randrange(256) for _ in range(header_end - 8))
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(bytes(data))
    clear_error(lambda: read_state_dict(path), "not valid JSON")


def test_bit_flips_in_the_header_load_consistently_or_fail_clearly(tmp_path, valid_safetensors):
    """A flipped bit may still be a valid file (a renamed key); then shapes must match the bytes."""
    data = valid_safetensors.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    rng = random.Random(1)
    outcomes = Counter()
    for trial in range(60):
        flipped = bytearray(data)
        position = rng.randrange(0, header_end)
        flipped[position] ^= 1 << rng.randrange(8)
        path = tmp_path / f"flip{trial}.safetensors"
        path.write_bytes(bytes(flipped))
        try:
            with time_limit(10):
                sd = read_state_dict(path)
        except CheckpointError as e:
            assert_clear(e, path.name)
            outcomes["error"] += 1
            continue
        assert sum(v.numel() * v.element_size() for v in sd.values()) == len(data) - header_end
        outcomes["loaded"] += 1
        path.unlink()
    assert outcomes["error"] > 30, outcomes


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    pytest.skip(f"/proc/self/status has no {field} on this system")


def test_safetensors_are_memory_mapped_not_copied(tmp_path):
    path = tmp_path / "big.safetensors"
    save_safetensors({f"w{i}": torch.randn(1024, 1024) for i in range(16)}, path)  # 64 MiB
    anon_before = _status_mb("RssAnon")
    sd = read_state_dict(path)  # touches every page (NaN check) but copies none
    anon_growth = _status_mb("RssAnon") - anon_before
    maps = Path("/proc/self/maps").read_text()
    assert str(path) in maps, "the weight file is not mapped into the process"
    assert anon_growth < 16, f"loading 64 MiB grew anonymous memory by {anon_growth:.0f} MiB: copied, not mapped"
    assert sum(v.numel() for v in sd.values()) == 16 * 1024 * 1024


# -- what a state dict must match -------------------------------------------------------------------

def _tiny_config(**overrides):
    return UNetConfig(**{**TINY, **overrides})


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _unchanged(module, snapshot):
    return all(torch.equal(v, snapshot[k]) for k, v in module.state_dict().items())


def test_missing_unexpected_and_misshaped_keys_are_listed_and_nothing_is_assigned():
    unet = randomize(UNet(_tiny_config()))
    before = _snapshot(unet)
    sd = {k: torch.zeros_like(v) for k, v in unet.state_dict().items()}
    dropped = sorted(sd)[0]
    del sd[dropped]
    sd["extra.weight"] = torch.zeros(3)
    sd["out_conv.weight"] = torch.zeros(2, 8, 3, 3)
    error = clear_error(lambda: load_weights(unet, sd, "tiny U-Net"), "tiny U-Net", "1 missing key(s): " + dropped,
                        "1 unexpected key(s): extra.weight", "out_conv.weight: file (2, 8, 3, 3) vs model (1, 8, 3, 3)")
    assert isinstance(error, CheckpointError)
    assert _unchanged(unet, before)


def test_keys_of_another_model_family_are_a_clear_listing():
    """A Stable-Diffusion-style (LDM) state dict fed to a DDPM-layout U-Net."""
    unet = randomize(UNet(_tiny_config()))
    before = _snapshot(unet)
    sd_like = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               "model.diffusion_model.time_embed.0.weight": torch.zeros(1280, 320),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(512, 4, 3, 3),
               "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(49408, 768)}
    n = len(unet.state_dict())
    clear_error(lambda: load_weights(unet, sd_like, "DDPM U-Net"), f"{n} missing key(s)", "4 unexpected key(s)",
                "model.diffusion_model.input_blocks.0.0.weight", "right file and config")
    assert _unchanged(unet, before)


def test_int_weights_are_an_error_but_other_float_precisions_are_cast(tmp_path):
    unet = randomize(UNet(_tiny_config()))
    ints = {k: v.long() for k, v in unet.state_dict().items()}
    clear_error(lambda: check_state_dict(unet, ints, "U-Net"), "wrong kind of dtype")
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        save_safetensors({k: v.to(dtype) for k, v in unet.state_dict().items()}, tmp_path / "half.safetensors")
        fresh = UNet(_tiny_config())
        load_weights(fresh, read_state_dict(tmp_path / "half.safetensors"))
        assert fresh.out_conv.weight.dtype == torch.float32
        assert torch.equal(fresh.out_conv.weight, unet.out_conv.weight.to(dtype).float())


def test_a_float16_model_folder_loads_as_float32_unless_asked(tmp_path):
    pipe = tiny_pipeline(3)
    pipe.to(dtype=torch.float16).save(tmp_path / "half")
    assert minidiff.load(tmp_path / "half").dtype == torch.float32
    assert minidiff.load(tmp_path / "half", dtype=torch.float16).dtype == torch.float16


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_unless_allowed(tmp_path, bad):
    weights = torch.randn(4, 4)
    weights[1, 2] = bad
    path = tmp_path / "w.safetensors"
    save_safetensors({"fine": torch.randn(3), "damaged": weights}, path)
    clear_error(lambda: read_state_dict(path), "1 tensor(s) contain NaN or Inf", "damaged", "allow_nan")
    assert read_state_dict(path, allow_nan=True)["damaged"][1, 2].item() != 0

    pipe = tiny_pipeline(1)
    with torch.no_grad():
        pipe.unet.out_conv.bias.fill_(bad)
    pipe.save(tmp_path / "model")
    clear_error(lambda: minidiff.load(tmp_path / "model", check="now"), "out_conv.bias", "allow_nan")
    lazy = minidiff.load(tmp_path / "model")  # checked by each layer before it first runs
    clear_error(lambda: lazy.generate(steps=3, progress=False, seed=0), "out_conv.bias", "allow_nan")
    loaded = minidiff.load(tmp_path / "model", allow_nan=True)
    with time_limit(30), pytest.raises(FloatingPointError, match=r"at step 1 \(timestep \d+\)"):
        loaded.generate(steps=3, progress=False, seed=0)


# -- folders and configs ----------------------------------------------------------------------------

@pytest.fixture
def model_folder(tmp_path):
    tiny_pipeline(1).save(tmp_path / "model")
    return tmp_path / "model"


def _write(name, text):
    return lambda folder: (folder / name).write_text(text)


def _config_with(**changes):
    def change(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
    return change


def _unet_with(**changes):
    def change(folder):
        config = json.loads((folder / "config.json").read_text())
        config["unet"].update(changes)
        (folder / "config.json").write_text(json.dumps(config))
    return change


FOLDER_DAMAGE = {
    "no config.json": (lambda f: (f / "config.json").unlink(), "config.json (model config) is missing"),
    "corrupt config.json": (_write("config.json", '{"format": "minidiff", "unet": {'), "not valid JSON"),
    "binary config.json": (lambda f: (f / "config.json").write_bytes(b"\xff\xfe\0junk"), "not valid JSON"),
    "foreign config.json": (_write("config.json", '{"_class_name": "UNet2DModel"}'), "not a minidiff config"),
    "no scheduler.json": (lambda f: (f / "scheduler.json").unlink(), "scheduler.json (noise schedule) is missing"),
    "bad scheduler.json": (_write("scheduler.json", '{"beta_start": 0.5, "beta_end": 0.1}'), "beta_start"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "model.safetensors is missing"),
    "empty weights": (_write("model.safetensors", ""), "empty"),
    "negative channels": (_unet_with(model_channels=-8), "model_channels"),
    "unknown unet field": (_unet_with(wings=2), "unknown field(s) ['wings']"),
    "weights of another width": (_unet_with(model_channels=16), "mis-shaped"),
    "unknown component": (lambda f: save_safetensors({"vae.w": torch.ones(1), **{
        k: v for k, v in read_state_dict(f / "model.safetensors").items()}}, f / "model.safetensors"),
        "unknown component(s) ['vae']"),
}


@pytest.mark.parametrize("name", sorted(FOLDER_DAMAGE))
def test_damaged_model_folder_is_a_clear_error(model_folder, name):
    damage, fragment = FOLDER_DAMAGE[name]
    damage(model_folder)
    clear_error(lambda: minidiff.load(model_folder), fragment)


DAMAGED_FOLDERS = {  # each once a crash deep inside load; now an error naming the folder
    "config.json is a JSON list": _write("config.json", "[1, 2]"),
    "config.json without unet": _write("config.json", '{"format": "minidiff"}'),
    "scheduler.json is a JSON list": _write("scheduler.json", "[]"),
    "config.json is a folder": lambda f: ((f / "config.json").unlink(), (f / "config.json").mkdir()),
}


@pytest.mark.parametrize("name", sorted(DAMAGED_FOLDERS))
def test_damaged_model_folder_names_the_folder(model_folder, name):
    DAMAGED_FOLDERS[name](model_folder)
    clear_error(lambda: minidiff.load(model_folder), str(model_folder))


ABSURD_UNET = {
    "negative channels": (dict(model_channels=-64), "model_channels"),
    "zero channels": (dict(in_channels=0), "in_channels"),
    "10^9 channels": (dict(model_channels=10 ** 9), "model_channels"),
    "empty channel_mult": (dict(channel_mult=()), "channel_mult"),
    "zero multiplier": (dict(channel_mult=(1, 0)), "channel_mult"),
    "13 levels": (dict(channel_mult=(1,) * 13), "at most 12"),
    "norm_groups not dividing": (dict(model_channels=24, norm_groups=32), "not divisible by norm_groups"),
    "attention at a missing level": (dict(attention_levels=(5,)), "attention_levels"),
    "heads not dividing": (dict(num_heads=3), "heads"),
    "string channels": (dict(model_channels="128"), "model_channels"),
    "NaN dropout": (dict(dropout=float("nan")), "dropout"),
    "dropout 1": (dict(dropout=1.0), "dropout"),
    "zero norm_eps": (dict(norm_eps=0.0), "norm_eps"),
    "context without transformer": (dict(context_dim=64), "context_dim"),
    "unknown attention": (dict(attention_type="flash"), "attention_type"),
    "zero classes": (dict(num_classes=0), "num_classes"),
    "padding 2": (dict(downsample_padding=2), "downsample_padding"),
}


@pytest.mark.parametrize("name", sorted(ABSURD_UNET))
def test_absurd_unet_config_is_a_clear_error(name):
    changes, fragment = ABSURD_UNET[name]
    clear_error(lambda: UNetConfig(**changes), "UNetConfig", fragment)


def test_unet_config_from_dict_rejects_unknown_and_non_dict_input():
    clear_error(lambda: UNetConfig.from_dict({"model_channels": 32, "wings": 2}), "unknown field(s) ['wings']")
    clear_error(lambda: UNetConfig.from_dict(None))


def test_in_range_fields_with_an_absurd_product_are_rejected_before_building():
    with pytest.raises(ValueError):
        UNetConfig(model_channels=1_000_000, channel_mult=(1024,), norm_groups=32, attention_levels=())


ABSURD_SCHEDULER = {
    "beta_start > beta_end": (dict(beta_start=0.02, beta_end=0.0001), "beta_start"),
    "beta_end 1": (dict(beta_end=1.0), "beta_end"),
    "NaN beta": (dict(beta_start=float("nan")), "beta_start"),
    "zero timesteps": (dict(num_train_timesteps=0), "num_train_timesteps"),
    "float timesteps": (dict(num_train_timesteps=1000.5), "num_train_timesteps"),
    "unknown schedule": (dict(beta_schedule="cubic"), "beta_schedule"),
    "learned variance": (dict(variance_type="learned_range"), "variance_type"),
    "unknown key": (dict(wings=2), "Unknown scheduler config key 'wings'"),
    "thresholding": (dict(thresholding=True), "thresholding"),
    "trained_betas of wrong length": (dict(num_train_timesteps=10, trained_betas=[0.1] * 3), "trained_betas"),
    "offset past the end": (dict(num_train_timesteps=10, steps_offset=10), "steps_offset"),
}


@pytest.mark.parametrize("name", sorted(ABSURD_SCHEDULER))
def test_absurd_scheduler_config_is_a_clear_error(name):
    changes, fragment = ABSURD_SCHEDULER[name]
    clear_error(lambda: SchedulerConfig.from_dict(changes), fragment)


def test_absurd_number_of_training_timesteps_is_rejected():
    with pytest.raises(ValueError):
        SchedulerConfig(num_train_timesteps=10 ** 12)


# -- writes -----------------------------------------------------------------------------------------

def _siblings(path: Path) -> list:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name and p.name.startswith("."))


def test_atomic_path_refuses_to_overwrite_and_an_error_midway_keeps_the_old_file(tmp_path):
    target = tmp_path / "weights.safetensors"
    save_safetensors({"w": torch.ones(3)}, target)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_safetensors({"w": torch.zeros(3)}, target, overwrite=False)
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a file")
            raise RuntimeError("disk on fire")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a file")
            raise KeyboardInterrupt
    assert torch.equal(read_state_dict(target)["w"], torch.ones(3))
    assert _siblings(target) == []


def test_atomic_folder_refuses_to_overwrite_and_an_error_midway_keeps_the_old_folder(tmp_path):
    dst = tmp_path / "model"
    tiny_pipeline(1).save(dst)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tiny_pipeline(2).save(dst)
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_folder(dst, overwrite=True) as tmp:
            save_json({"format": "minidiff"}, tmp / "config.json")
            raise RuntimeError("midway")
    assert minidiff.load(dst).meta["version"] == 1
    assert _siblings(dst) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        tiny_pipeline(2).save(tmp_path / "file", overwrite=True)


def test_written_files_follow_the_umask_not_0600(tmp_path):
    dst = tmp_path / "model"
    tiny_pipeline(1).save(dst)
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (dst / "model.safetensors", dst / "config.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    assert dst.stat().st_mode & 0o777 == 0o777 & ~umask


def test_overwrite_without_atomic_exchange_still_replaces_whole_folders(tmp_path, monkeypatch):
    """Where renameat2 is missing (macOS, some network file systems) two renames are used."""
    monkeypatch.setattr(writing, "_exchange", lambda a, b: False)
    dst = tmp_path / "model"
    tiny_pipeline(1).save(dst)
    tiny_pipeline(2).save(dst, overwrite=True)
    assert minidiff.load(dst).meta["version"] == 2
    assert _siblings(dst) == []


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_temporaries_of_dead_writers_are_removed_by_the_next_write_and_live_ones_kept(tmp_path):
    dst = tmp_path / "model"
    tiny_pipeline(1).save(dst)
    dead, live = _dead_pid(), os.getpid()
    (tmp_path / f".model.{dead}.0badc0de.tmp").mkdir()
    (tmp_path / f".model.{dead}.0badc0de.tmp" / "config.json").write_text("{")
    (tmp_path / f".model.{live}.00c0ffee.tmp").mkdir()
    (tmp_path / f".model.safetensors.{dead}.12345678.tmp").write_text("partial")
    (tmp_path / ".modelx.1.12345678.tmp").mkdir()  # another target's: not ours to touch
    assert minidiff.load(dst).meta["version"] == 1  # loading ignores (and keeps) stray temporaries
    assert len(_siblings(dst)) == 4
    tiny_pipeline(2).save(dst, overwrite=True)
    assert _siblings(dst) == [f".model.{live}.00c0ffee.tmp", f".model.safetensors.{dead}.12345678.tmp",
                              ".modelx.1.12345678.tmp"]
    assert remove_stale_temps(tmp_path / "model.safetensors") == [tmp_path / f".model.safetensors.{dead}.12345678.tmp"]


def test_a_writer_killed_between_two_renames_gets_its_old_folder_back(tmp_path):
    dst = tmp_path / "model"
    tiny_pipeline(7).save(dst)
    old = tmp_path / f".model.{_dead_pid()}.0123abcd.old"
    os.replace(dst, old)  # the state a kill inside _swap_in_slowly leaves
    remove_stale_temps(dst)
    assert minidiff.load(dst).meta["version"] == 7
    assert not old.exists()


KILLS = 25


def _gone(pid: int, seconds: float = 5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.002)
    raise AssertionError(f"writer {pid} survived SIGKILL")


def test_writers_killed_at_random_moments_never_leave_a_partial_checkpoint(tmp_path):
    """SIGKILL a process rewriting a model folder and a weight file, 25 times at random moments.

    After every kill both must load whole (every weight equal to the version its config names) and
    versions never go back. Stray temporaries may stay; the next write removes them.
    """
    tiny_pipeline(0).save(tmp_path / "model")
    save_safetensors({"a": torch.zeros(64, 64), "b": torch.zeros(64, 64)}, tmp_path / "weights.safetensors")
    zygote = subprocess.Popen([sys.executable, str(REPO / "tests" / "kill_writer.py"), str(tmp_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    rng = random.Random(9)
    seen, strays, writers = [0], Counter(), []
    try:
        for kill in range(1, KILLS + 1):
            zygote.stdin.write(f"fork {kill}\n")
            zygote.stdin.flush()
            writers.append(int(zygote.stdout.readline()))
            time.sleep(rng.uniform(0.02, 0.4))
            os.kill(writers[-1], signal.SIGKILL)
            _gone(writers[-1])

            pipe = minidiff.load(tmp_path / "model")
            version = pipe.meta["version"]
            assert all(torch.all(p == version) for p in pipe.unet.parameters()), f"mixed folder at kill {kill}"
            assert version >= seen[-1], f"kill {kill} went back from version {seen[-1]} to {version}"
            weights = read_state_dict(tmp_path / "weights.safetensors")
            assert torch.equal(weights["a"], weights["b"]) and len(weights["a"].unique()) == 1
            seen.append(version)
            strays["kills leaving temporaries"] += any(".tmp" in name for name in os.listdir(tmp_path))
            assert sorted(n for n in os.listdir(tmp_path) if not n.startswith(".")) == ["model", "weights.safetensors"]
    finally:
        for pid in writers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        zygote.stdin.close()
        zygote.wait(timeout=30)
    assert len({v // VERSION_STRIDE for v in seen}) > KILLS // 4, f"writers rarely finished a save: {seen}"
    tiny_pipeline(10 ** 6).save(tmp_path / "model", overwrite=True)
    save_safetensors({"a": torch.ones(1)}, tmp_path / "weights.safetensors")
    left = sorted(os.listdir(tmp_path))
    assert left == ["model", "weights.safetensors"], f"stale temporaries not cleaned: {left}"
    print(f"kill test: {KILLS} kills, {strays['kills leaving temporaries']} left temporaries, last version "
          f"{seen[-1]}")


# -- sampling ---------------------------------------------------------------------------------------

CLASS_CONFIG = dict(TINY, num_classes=3, sample_size=8)  # class 2 is the unconditional (null) class


@pytest.fixture(scope="module")
def class_pipe():
    return Pipeline(randomize(UNet(UNetConfig(**CLASS_CONFIG)), seed=3), SchedulerConfig(num_train_timesteps=20),
                    null_class=2)


@pytest.fixture(scope="module")
def plain_pipe():
    return Pipeline(randomize(UNet(UNetConfig(**TINY, sample_size=8)), seed=4), SchedulerConfig(num_train_timesteps=20))


def test_weights_that_overflow_stop_sampling_at_the_first_bad_step_naming_it():
    pipe = Pipeline(randomize(UNet(UNetConfig(**CLASS_CONFIG))), SchedulerConfig(num_train_timesteps=20), null_class=2)
    with torch.no_grad():
        pipe.unet.out_conv.weight.mul_(1e38)  # finite weights whose output overflows to Inf
    finite = []
    with time_limit(30), pytest.raises(FloatingPointError) as info:
        pipe.generate(steps=5, class_labels=0, guidance_scale=3.0, progress=False, seed=0,
                      callback=lambda i, t, x: finite.append(bool(torch.isfinite(x).all())))
    message = str(info.value)
    step = re.search(r"at step (\d+) \(timestep \d+\)", message)
    assert step, message
    assert "guidance_scale=3.0" in message and "weights" in message
    # the user's callback saw every step before the bad one, all finite, and not the bad one
    assert finite == [True] * (int(step.group(1)) - 1)


def test_non_finite_noise_stops_sampling_naming_the_cause(plain_pipe):
    noise = torch.randn(1, 1, 8, 8)
    noise[0, 0, 3, 3] = float("inf")
    with pytest.raises(FloatingPointError, match="noise that is not finite"):
        plain_pipe.generate(steps=2, noise=noise, progress=False)


BAD_ARGUMENTS = [
    (dict(steps=0), "steps must be an int in [1, 10000]"),
    (dict(steps=10_001), "[1, 10000]"),
    (dict(steps=2.5), "[1, 10000]"),
    (dict(steps=True), "not True/False"),
    (dict(steps="10"), "[1, 10000]"),
    (dict(steps=21), "between 1 and num_train_timesteps=20"),
    (dict(sampler="lms"), "choose one of ['ddim', 'ddpm', 'dpmpp_2m', 'euler', 'euler_a', 'heun', 'plms', 'unipc']"),
    (dict(sampler=["ddim"]), "choose one of"),
    (dict(eta=-0.1), "eta must be a number in [0, 1]"),
    (dict(eta=1.5), "[0, 1]"),
    (dict(eta=float("nan")), "[0, 1]"),
    (dict(eta=0.5, sampler="ddpm"), "eta=0.5 does not apply to the ddpm sampler; it applies to ddim"),
    (dict(karras_sigmas=True), "does not apply to the ddim sampler; it applies to dpmpp_2m, euler, heun, unipc"),
    (dict(karras_sigmas=1, sampler="euler"), "karras_sigmas must be True or False"),
    (dict(guidance_scale=-1.0), "guidance_scale must be a number in [0, 100]"),
    (dict(guidance_scale=101), "[0, 100]"),
    (dict(guidance_scale=float("inf")), "[0, 100]"),
    (dict(guidance_scale=float("nan")), "[0, 100]"),
    (dict(guidance_scale="7"), "[0, 100]"),
    (dict(cache_interval=0), "cache_interval must be an int in [1, 10000]"),
    (dict(cache_interval=10_001), "[1, 10000]"),
    (dict(cache_interval=1.5), "[1, 10000]"),
    (dict(cache_branch=-1), "cache_branch must be an int in [0, 3]"),
    (dict(cache_branch=4), "[0, 3]"),
    (dict(cache_branch="0"), "[0, 3]"),
    (dict(cache_schedule="bogus"), "unknown cache schedule 'bogus'"),
    (dict(cache_schedule=[0, 25]), "full steps must lie in [0, 3]"),
    (dict(cache_schedule="nonuniform", cache_interval=2, cache_center=100), "center must lie in (0, 4)"),
    (dict(cache_schedule="nonuniform", cache_interval=2, cache_power=1.0), "power"),
    (dict(cache_schedule="nonuniform", cache_interval=2, cache_power=float("inf")), "power"),
    (dict(cache_schedule="calibrated"), "no calibrated cache schedule"),
    (dict(batch_size=0), "batch_size must be an int in [1, 4096]"),
    (dict(batch_size=4097), "[1, 4096]"),
    (dict(batch_size=2.5), "[1, 4096]"),
    (dict(seed=-1), "seed must be None or an int in [0, 2**64 - 1]"),
    (dict(seed=2 ** 64), "[0, 2**64 - 1]"),
    (dict(seed=1.5), "[0, 2**64 - 1]"),
    (dict(height=1), "height must be an int between 2 and 16384"),  # below one pixel per U-Net halving
    (dict(height=-8), "between 2 and 16384"),
    (dict(height=16386), "between 2 and 16384"),
    (dict(width="8"), "width must be an int between 2 and 16384"),
    (dict(width=8.0), "width"),
    (dict(class_labels=3), "class labels must lie in [0, 2]"),
    (dict(class_labels=-1), "[0, 2]"),
    (dict(class_labels=None), "pass class_labels (ints in [0, 1])"),
    (dict(class_labels=[0, 1, 1], batch_size=2), "got 3 class labels for batch_size 2"),
    (dict(prompt="a cat"), "does not take a prompt"),
    (dict(output="png"), "output must be 'image' or 'latent'"),
    (dict(noise=torch.randn(1, 3, 8, 8)), "noise must have shape (B, 1, H, W)"),
]


@pytest.mark.parametrize("kwargs,fragment", BAD_ARGUMENTS, ids=[repr(k)[:60] for k, _ in BAD_ARGUMENTS])
def test_every_generate_argument_is_range_checked_with_the_range_in_the_message(class_pipe, kwargs, fragment):
    kwargs = {"class_labels": 0, "steps": 4, **kwargs}
    clear_error(lambda: class_pipe.generate(progress=False, **kwargs), fragment)


def test_class_labels_for_an_unconditional_model_are_an_error(plain_pipe):
    clear_error(lambda: plain_pipe.generate(steps=2, class_labels=1, progress=False), "not class-conditional")


def test_guidance_without_an_unconditional_class_is_an_error():
    pipe = Pipeline(randomize(UNet(UNetConfig(**CLASS_CONFIG))), SchedulerConfig(num_train_timesteps=20))
    clear_error(lambda: pipe.generate(steps=2, class_labels=0, guidance_scale=3.0, progress=False),
                "cannot use classifier-free guidance")


BAD_ARGUMENTS = [  # each once silently accepted or a crash deep inside generate; now a ValueError
    dict(class_labels=1.5),
    dict(class_labels=9.3e18),
    dict(height=0),
    dict(guidance_scale=5.0, plain=True),
    dict(noise=[[0.5]]),
    dict(noise=torch.randn(0, 1, 8, 8)),
]


@pytest.mark.parametrize("kwargs", BAD_ARGUMENTS, ids=[repr(k)[:50] for k in BAD_ARGUMENTS])
def test_more_bad_generate_arguments_are_value_errors(class_pipe, plain_pipe, kwargs):
    kwargs = dict(kwargs)
    pipe = plain_pipe if kwargs.pop("plain", False) else class_pipe
    if pipe is class_pipe:
        kwargs.setdefault("class_labels", 0)
    with pytest.raises(ValueError):
        pipe.generate(steps=2, progress=False, **kwargs)


# -- property-based -----------------------------------------------------------------------------------

JUNK = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 12, 10 ** 12), st.integers(-3, 40), st.text(max_size=4),
                 st.floats(allow_nan=True, allow_infinity=True), st.lists(st.integers(-3, 5), max_size=3))


@st.composite
def mostly_valid(draw, valid: dict):
    """A valid value for every field, then junk in up to two of them."""
    args = draw(st.fixed_dictionaries(valid))
    for name in draw(st.lists(st.sampled_from(sorted(valid)), max_size=2, unique=True)):
        args[name] = draw(JUNK)
    return args


UNET_FIELDS = {
    "in_channels": st.integers(1, 3),
    "out_channels": st.integers(1, 3),
    "model_channels": st.sampled_from([4, 8, 12, 16]),
    "channel_mult": st.lists(st.integers(1, 3), min_size=1, max_size=3),
    "num_res_blocks": st.integers(1, 2),
    "attention_levels": st.lists(st.integers(0, 2), max_size=2),
    "mid_attention": st.booleans(),
    "attention_type": st.sampled_from(["self", "self", "transformer"]),
    "num_heads": st.sampled_from([None, 1, 2, 4]),
    "head_channels": st.sampled_from([None, 2, 4]),
    "transformer_depth": st.integers(1, 2),
    "context_dim": st.sampled_from([None, None, 4, 8]),
    "num_classes": st.sampled_from([None, 1, 3]),
    "class_cond": st.sampled_from(["add", "context"]),
    "dropout": st.sampled_from([0.0, 0.1]),
    "norm_groups": st.sampled_from([1, 2, 4]),
    "norm_eps": st.sampled_from([1e-6, 1e-5]),
    "downsample_padding": st.sampled_from([0, 1]),
    "flip_sin_to_cos": st.booleans(),
    "freq_shift": st.sampled_from([0.0, 1.0]),
    "sample_size": st.sampled_from([None, 8]),
}


def _small_enough(cfg: UNetConfig) -> bool:
    """Build and run only what a CPU test can afford (validate() passes some very large models)."""
    return (max(cfg.level_channels) <= 64 and cfg.num_res_blocks <= 2 and cfg.transformer_depth <= 2
            and len(cfg.channel_mult) <= 3 and (cfg.context_dim or 0) <= 64 and (cfg.num_classes or 0) <= 16
            and cfg.in_channels <= 8 and cfg.out_channels <= 8)


@settings(max_examples=120, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(mostly_valid(UNET_FIELDS))
def test_any_unet_config_builds_and_runs_or_is_a_clear_error(fields):
    try:
        with time_limit(20):
            cfg = UNetConfig(**fields)
    except CLEAR_ERRORS as e:
        assert_clear(e)
        EXAMPLES["unet config: clear error"] += 1
        return
    if not _small_enough(cfg):
        EXAMPLES["unet config: valid, too big to build here"] += 1
        return
    with time_limit(20), torch.no_grad():
        unet = UNet(cfg).eval()
        size = 2 * cfg.downsample_factor
        x = torch.randn(2, cfg.in_channels, size, size)
        cond = None
        if cfg.num_classes is not None:
            cond = torch.tensor([0, cfg.num_classes - 1])
        elif cfg.context_dim is not None:
            cond = torch.randn(2, 3, cfg.context_dim)
        out = unet(x, torch.tensor([0, 999]), cond)
        _, cache = unet.forward_full(x, 5, cond, branch=unet.num_branches - 1)
        shallow = unet.forward_shallow(x, 5, cond, cache=cache)
    assert out.shape == shallow.shape == (2, cfg.out_channels, size, size)
    EXAMPLES["unet config: built and ran"] += 1


def test_class_add_with_cross_attention_is_rejected():
    fields = dict(TINY, attention_type="transformer", attention_levels=(0,), context_dim=4, num_classes=2,
                  class_cond="add")
    with pytest.raises(ValueError, match="class_cond 'add' with context_dim"):
        UNetConfig(**fields)


GENERATE_ARGS = {
    "steps": st.integers(1, 5),
    "sampler": st.sampled_from(["ddim", "ddpm", "plms"]),
    "eta": st.sampled_from([0.0, 0.0, 0.0, 0.5, 1.0]),  # non-zero is an error for ddpm and plms
    "cache_interval": st.integers(1, 4),
    "cache_branch": st.integers(0, 3),
    "cache_schedule": st.one_of(st.sampled_from(["uniform", "nonuniform"]), st.lists(st.integers(0, 4), max_size=3)),
    "cache_center": st.sampled_from([None, 1, 2]),
    "cache_power": st.sampled_from([1.4, 2.0, 1.01]),
    "seed": st.one_of(st.none(), st.integers(0, 2 ** 64 - 1)),
    "batch_size": st.integers(1, 3),
    "class_labels": st.one_of(st.integers(0, 2), st.lists(st.integers(0, 2), min_size=1, max_size=3)),
    "guidance_scale": st.sampled_from([None, 1.0, 3.0, 100.0]),
    "height": st.sampled_from([None, 4, 8, 12]),
    "width": st.sampled_from([None, 2, 8, 16]),
    "output": st.sampled_from(["image", "latent"]),
}
TOO_COSTLY = {"height": 64, "width": 64, "batch_size": 16}  # valid, but not what this test is about


def _costly(args: dict) -> bool:
    return any(type(args.get(k)) is int and limit < args[k] <= 16384 for k, limit in TOO_COSTLY.items())


@settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(args=mostly_valid(GENERATE_ARGS))
def test_any_generate_arguments_sample_or_raise_a_clear_error(class_pipe, args):
    if _costly(args):
        EXAMPLES["generate: skipped, valid but costly"] += 1
        return
    try:
        with time_limit(20):
            images = class_pipe.generate(progress=False, **args)
    except CLEAR_ERRORS as e:
        assert_clear(e)
        EXAMPLES["generate: clear error"] += 1
        return
    assert images.ndim == 4 and images.shape[1] == 1 and torch.isfinite(images).all()
    if args.get("output", "image") == "image":
        assert 0 <= images.min() and images.max() <= 1
    EXAMPLES["generate: sampled"] += 1


# -- the source itself --------------------------------------------------------------------------------

SOURCE_RULES = [  # (call, what it is, text that makes the call safe when inside its parentheses)
    (re.compile(r"\btorch\.load\("), "torch.load without weights_only=True", "weights_only=True"),
    (re.compile(r"\bpickle\.(load|loads|Unpickler)\b"), "pickle.load/loads/Unpickler", None),
    (re.compile(r"(?<![\w.])(eval|exec)\("), "eval/exec", None),
    (re.compile(r"\b(yaml\.load|yaml\.unsafe_load|marshal\.loads?|shelve\.open|dill\.loads?)\("),
     "an unsafe deserializer", None),
]


def _call_text(text: str, start: int) -> str:
    """From `start` to the parenthesis closing the first one opened (the whole call, nested calls included)."""
    depth, i = 0, text.find("(", start)
    while 0 <= i < len(text):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start: i + 1]
        i += 1
    return text[start:]


def _offences(text: str) -> list:
    found = []
    for pattern, what, safe_if in SOURCE_RULES:
        for match in pattern.finditer(text):
            call = _call_text(text, match.start())
            if safe_if is None or safe_if not in call:
                found.append((text.count("\n", 0, match.start()) + 1, what, call[:80]))
    return found


def test_source_rules_catch_what_they_should():
    offending = ["torch.load(path)", "torch.load(f, map_location='cpu')", "pickle.loads(data)", "eval(text)",
                 "exec(code)", "yaml.load(stream)", "pickle.Unpickler(f)"]
    harmless = ["torch.load(str(path), map_location='cpu', weights_only=True, mmap=True)", "unet.eval()",
                "pickle.UnpicklingError", "model.eval().to(device)"]
    assert all(_offences(s) for s in offending)
    assert not any(_offences(s) for s in harmless)


def test_package_source_never_unpickles_or_evaluates_file_content():
    files = sorted((REPO / "minidiff").rglob("*.py")) + sorted((REPO / "convert").rglob("*.py"))
    assert len(files) > 5
    offences = [f"{path.relative_to(REPO)}:{line}: {what}: {call}"
                for path in files for line, what, call in _offences(path.read_text())]
    assert offences == []
