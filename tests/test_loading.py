"""Lean loading (models built on the meta device take the mapped file's tensors), half-precision
folders, and the CLIP vocabulary shipped as package data."""
import warnings

import pytest
import torch
from conftest import randomize, shared_path

import minidiff
from minidiff.autoencoder import Autoencoder, AutoencoderConfig
from minidiff.checkpoint import CheckpointError, build_loaded, read_state_dict
from minidiff.writing import save_safetensors
from minidiff.pipeline import Pipeline
from minidiff.schedules import SchedulerConfig
from minidiff.text import DEFAULT_BPE, CLIPTextConfig, CLIPTextEncoder, CLIPTokenizer
from minidiff.unet import UNet, UNetConfig

UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_levels=(1,), attention_type="transformer", num_heads=2, context_dim=32,
                  downsample_padding=1, flip_sin_to_cos=True, freq_shift=0.0, sample_size=8)
VAE = AutoencoderConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1)
TEXT = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2)


@pytest.fixture(scope="module")
def sd_like():
    """A tiny text-to-image pipeline with every component, random weights, the shipped tokenizer."""
    return Pipeline(randomize(UNet(UNET), seed=1), SchedulerConfig(), autoencoder=randomize(Autoencoder(VAE), seed=2),
                    text_encoder=randomize(CLIPTextEncoder(TEXT), seed=3), tokenizer=CLIPTokenizer.default())


def _same_weights(a: torch.nn.Module, b: torch.nn.Module, rounded_to=None) -> bool:
    """a's weights equal b's (b's first rounded to `rounded_to` when given)."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    return all(torch.equal(sa[k], (sb[k] if rounded_to is None else sb[k].to(rounded_to)).to(sa[k].dtype))
               for k in sa)


# -- meta-device loading --------------------------------------------------------------------------

def test_loaded_parameters_are_the_mapped_file_tensors_not_copies(tmp_path):
    unet = randomize(UNet(UNET), seed=4)
    save_safetensors(unet.state_dict(), tmp_path / "w.safetensors")
    sd = read_state_dict(tmp_path / "w.safetensors")
    loaded = build_loaded(lambda: UNet(UNET), sd, "U-Net")
    params = dict(loaded.named_parameters())
    assert all(params[k].data_ptr() == v.data_ptr() for k, v in sd.items())  # no second copy
    assert not any(p.is_meta for p in loaded.parameters())
    assert _same_weights(loaded, unet)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, ctx), unet(x, t, ctx))


def test_nothing_is_initialised_at_random_when_loading(tmp_path, sd_like, monkeypatch):
    sd_like.save(tmp_path / "model")
    calls = []
    real = torch.nn.init.kaiming_uniform_

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.device.type)
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", counting)
    UNet(UNET)
    assert set(calls) == {"cpu"}  # the control: building for training initialises
    calls.clear()
    pipe = minidiff.load(tmp_path / "model")
    assert calls == []  # loading never ran an initialiser, not even on shape-only tensors
    assert torch.nn.init.kaiming_uniform_ is counting  # and put them all back
    assert _same_weights(pipe.unet, sd_like.unet)


def test_converted_tensors_keep_the_modules_memory_format(tmp_path):
    unet = randomize(UNet(UNET), seed=4)
    half = {k: v.half() for k, v in unet.state_dict().items()}
    loaded = build_loaded(lambda: UNet(UNET), half, "U-Net")
    assert loaded.out_conv.weight.dtype == torch.float32
    assert loaded.out_conv.weight.is_contiguous(memory_format=torch.channels_last)
    kept = build_loaded(lambda: UNet(UNET), half, "U-Net", dtype=None)
    assert kept.out_conv.weight.dtype == torch.float16


def test_strict_key_checks_still_name_the_problem_and_build_nothing_half():
    sd = randomize(UNet(UNET)).state_dict()
    missing = {k: v for k, v in sd.items() if k != "out_conv.bias"}
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): out_conv.bias"):
        build_loaded(lambda: UNet(UNET), missing, "U-Net")
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): extra"):
        build_loaded(lambda: UNet(UNET), {**sd, "extra": torch.ones(1)}, "U-Net")
    bad = dict(sd, **{"out_conv.bias": torch.ones(7)})
    with pytest.raises(CheckpointError, match="mis-shaped"):
        build_loaded(lambda: UNet(UNET), bad, "U-Net")
    nan = dict(sd, **{"out_conv.bias": torch.full_like(sd["out_conv.bias"], float("nan"))})
    with pytest.raises(CheckpointError, match=r"U-Net.*out_conv.bias"):
        build_loaded(lambda: UNet(UNET), nan, "U-Net")
    assert build_loaded(lambda: UNet(UNET), nan, "U-Net", allow_nan=True).out_conv.bias.isnan().all()


def test_a_module_with_a_buffer_the_file_lacks_is_a_clear_error():
    class WithBuffer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))
            self.register_buffer("table", torch.arange(3.0), persistent=False)

    with pytest.raises(CheckpointError, match="table"):
        build_loaded(WithBuffer, {"w": torch.ones(2)}, "toy")


def test_full_pipeline_round_trip_is_exact(tmp_path, sd_like):
    sd_like.save(tmp_path / "model")
    pipe = minidiff.load(tmp_path / "model")
    for name in ("unet", "autoencoder", "text_encoder"):
        assert _same_weights(getattr(pipe, name), getattr(sd_like, name)), name
    ids = sd_like.tokenizer(["a red fox"])
    with torch.no_grad():
        assert torch.equal(pipe.text_encoder(ids), sd_like.text_encoder(ids))


# -- half-precision files -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_save_is_half_the_size_and_loads_in_float32_or_its_own_dtype(tmp_path, sd_like, dtype):
    sd_like.save(tmp_path / "full")
    sd_like.save(tmp_path / "half", dtype=dtype)
    full, half = ((tmp_path / name / "model.safetensors").stat().st_size for name in ("full", "half"))
    assert 0.49 < half / full < 0.51, (half, full)
    assert {v.dtype for v in read_state_dict(tmp_path / "half" / "model.safetensors").values()} == {dtype}

    as_float = minidiff.load(tmp_path / "half", dtype=torch.float32)
    assert as_float.dtype == torch.float32 and as_float.text_encoder.final_layer_norm.weight.dtype == torch.float32
    for name in ("unet", "autoencoder", "text_encoder"):  # exactly the rounded weights, widened again
        assert _same_weights(getattr(as_float, name), getattr(sd_like, name), rounded_to=dtype), name
    assert minidiff.load(tmp_path / "half").dtype == torch.float32  # the default stays float32

    native = minidiff.load(tmp_path / "half", dtype=dtype)
    assert native.dtype == dtype and native.text_encoder.final_layer_norm.weight.dtype == dtype
    assert native.autoencoder.decoder.conv_out.weight.dtype == torch.float32  # decoding stays float32
    ids = native.tokenizer(["a red fox"])
    with torch.no_grad():  # same weights, only the arithmetic's precision differs
        error = (native.text_encoder(ids).float() - as_float.text_encoder(ids)).abs().max()
    assert error < 0.05, error


def test_save_dtype_must_be_a_float_dtype(tmp_path, sd_like):
    with pytest.raises(ValueError, match="floating-point"):
        sd_like.save(tmp_path / "x", dtype=torch.int8)
    with pytest.raises(ValueError, match="floating-point"):
        sd_like.save(tmp_path / "x", dtype="float16")
    assert not (tmp_path / "x").exists()


# -- the shipped CLIP vocabulary ------------------------------------------------------------------

def test_vocabulary_ships_with_its_licence_notice():
    notice = (DEFAULT_BPE.parent / "LICENSE-clip-bpe.txt").read_text()
    assert DEFAULT_BPE.is_file() and DEFAULT_BPE.stat().st_size > 1_000_000
    assert "MIT" in notice and "OpenAI" in notice and "Permission is hereby granted" in notice


def test_default_tokenizer_equals_the_sd15_tokenizer():
    folder = shared_path("runwayml--stable-diffusion-v1-5", "tokenizer")
    transformers = pytest.importorskip("transformers")
    from test_text import HAND_WRITTEN, character_sweep, generated_prompts

    ours, from_folder = CLIPTokenizer.default(), CLIPTokenizer.from_folder(folder)
    assert ours.vocab == from_folder.vocab and ours.merges == from_folder.merges
    reference = transformers.CLIPTokenizer.from_pretrained(str(folder))
    prompts = HAND_WRITTEN + generated_prompts(ours, count=300, seed=7) + character_sweep(step=53)
    expected = reference(prompts, padding="max_length", truncation=True, max_length=77).input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # long prompts are cut, as they should be
        got = ours(prompts).tolist()
    assert len(prompts) > 300
    assert [i for i, (g, e) in enumerate(zip(got, expected)) if g != e] == []


# -- finiteness checked by each layer before it first runs ----------------------------------------

def _status_mib(field: str) -> float:
    for line in open("/proc/self/status").read().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    pytest.skip(f"/proc/self/status has no {field} on this system")


def test_loading_reads_no_weight_pages_until_they_are_used(tmp_path):
    config = UNetConfig(model_channels=96, channel_mult=(1, 2, 2), num_res_blocks=2)  # ~55 MiB of weights
    Pipeline(randomize(UNet(config)), SchedulerConfig()).save(tmp_path / "model")
    size = (tmp_path / "model" / "model.safetensors").stat().st_size / 2**20
    assert size > 40
    before = _status_mib("RssFile") + _status_mib("RssAnon")
    pipe = minidiff.load(tmp_path / "model")
    after_load = _status_mib("RssFile") + _status_mib("RssAnon")
    from minidiff.checkpoint import finish_finite_checks

    finish_finite_checks(pipe.unet)  # the control: checking reads every page
    after_check = _status_mib("RssFile") + _status_mib("RssAnon")
    assert after_load - before < 0.25 * size, (after_load - before, size)
    assert after_check - after_load > 0.75 * size, (after_check - after_load, size)


def test_damaged_layers_are_refused_when_first_used_and_unused_ones_never_read(tmp_path, sd_like):
    from minidiff.checkpoint import finish_finite_checks

    damaged = Pipeline(sd_like.unet, sd_like.scheduler, autoencoder=randomize(Autoencoder(VAE), seed=9),
                       text_encoder=sd_like.text_encoder, tokenizer=sd_like.tokenizer)
    with torch.no_grad():
        damaged.autoencoder.decoder.conv_out.bias[0] = float("inf")
    damaged.save(tmp_path / "model")
    pipe = minidiff.load(tmp_path / "model")
    latents = pipe.generate(prompt="a red fox", steps=2, seed=0, progress=False, output="latent")
    assert torch.isfinite(latents).all()  # the decoder was never needed, so never read
    with pytest.raises(CheckpointError, match=r"autoencoder.*decoder\.conv_out\.bias.*allow_nan"):
        pipe.generate(prompt="a red fox", steps=2, seed=0, progress=False)
    with pytest.raises(CheckpointError, match=r"decoder\.conv_out\.bias"):
        minidiff.load(tmp_path / "model", check="now")
    with pytest.raises(CheckpointError, match=r"decoder\.conv_out\.bias"):
        finish_finite_checks(minidiff.load(tmp_path / "model").autoencoder)
    assert minidiff.load(tmp_path / "model", allow_nan=True).generate(
        prompt="a red fox", steps=2, seed=0, progress=False).shape == (1, 3, 16, 16)


def test_checks_run_once_and_leave_no_hooks_behind(tmp_path, sd_like):
    sd_like.save(tmp_path / "model")
    pipe = minidiff.load(tmp_path / "model")
    hooked = lambda m: sum(len(layer._forward_pre_hooks) for layer in m.modules())  # noqa: E731
    assert hooked(pipe.unet) > 10
    pipe.generate(prompt="a red fox", steps=2, seed=0, progress=False)
    assert hooked(pipe.unet) == hooked(pipe.text_encoder) == 0
    assert hooked(pipe.autoencoder) > 0  # the encoder, unused by text-to-image, was never read
    with pytest.raises(ValueError, match="first-use"):
        minidiff.load(tmp_path / "model", check="later")


def test_compiling_runs_the_pending_checks_first(tmp_path, sd_like, monkeypatch):
    sd_like.save(tmp_path / "model")
    pipe = minidiff.load(tmp_path / "model")
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # only the bookkeeping is under test
    pipe.unet.compile_paths()
    assert sum(len(layer._forward_pre_hooks) for layer in pipe.unet.modules()) == 0
