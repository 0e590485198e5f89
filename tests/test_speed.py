"""Speed features that must not change the numbers: prepared cross-attention keys/values, and
torch.compile of the full and shallow paths compiling each path once per sampling run."""
import pytest
import torch
from conftest import randomize

from minidiff.cache import CachedUNet, uniform_schedule
from minidiff.samplers import sample_ddim
from minidiff.schedules import SchedulerConfig
from minidiff.unet import PreparedContext, UNet, UNetConfig

TEXT_UNET = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                 attention_levels=(0, 1), attention_type="transformer", head_channels=8, context_dim=16,
                 norm_groups=8)


def text_unet(**overrides) -> UNet:
    return randomize(UNet(UNetConfig(**{**TEXT_UNET, **overrides})), std=0.1)


def test_prepared_context_gives_the_same_numbers_in_every_path():
    unet = text_unet()
    x, context = torch.randn(3, 4, 8, 8), torch.randn(3, 5, 16)
    prepared = unet.prepare_context(context)
    assert isinstance(prepared, PreparedContext) and len(prepared.keys_values) == 7  # encoder 2, middle 1, decoder 4
    with torch.no_grad():
        assert torch.allclose(unet(x, 10, prepared), unet(x, 10, context), atol=1e-6, rtol=0)
        out, cache = unet.forward_full(x, 10, context, branch=1)
        out_p, cache_p = unet.forward_full(x, 10, prepared, branch=1)
        assert torch.allclose(out, out_p, atol=1e-6, rtol=0)
        assert torch.allclose(cache.hidden, cache_p.hidden, atol=1e-6, rtol=0)
        shallow = unet.forward_shallow(x, 20, context, cache=cache)
        assert torch.allclose(unet.forward_shallow(x, 20, prepared, cache=cache), shallow, atol=1e-6, rtol=0)


def test_prepared_context_is_checked_like_a_context():
    unet = text_unet()
    with pytest.raises(ValueError, match=r"context of shape \(B, L, 16\)"):
        unet.prepare_context(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"context of shape \(3, L, 16\)"):
        unet(torch.randn(3, 4, 8, 8), 10, unet.prepare_context(torch.randn(2, 5, 16)))
    classes = UNet(UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1,), norm_groups=8, attention_levels=(),
                              num_classes=3))
    with pytest.raises(ValueError, match="class-conditional"):
        classes.prepare_context(torch.randn(2, 5, 16))


def test_pipeline_projects_the_text_context_once_per_run(monkeypatch):
    """generate() prepares the context once; the U-Net then never projects it again."""
    from minidiff.pipeline import Pipeline

    unet = text_unet()
    pipe = Pipeline(unet, SchedulerConfig())
    context = torch.randn(1, 5, 16)
    monkeypatch.setattr(pipe, "encode_prompt", lambda prompts: context.expand(len(prompts), -1, -1))
    pipe.tokenizer = pipe.text_encoder = object()
    calls = []
    original = UNet.prepare_context
    monkeypatch.setattr(UNet, "prepare_context", lambda self, c: calls.append(c.shape) or original(self, c))
    key_projections = []
    handle = unet.input_blocks[1][1].blocks[0].attn2.to_k.register_forward_hook(
        lambda *args: key_projections.append(1))
    noise = torch.randn(1, 4, 8, 8)
    got = pipe.generate(steps=4, noise=noise, prompt="x", guidance_scale=3.0, cache_interval=2, output="latent",
                        progress=False)
    handle.remove()
    assert calls == [(2, 5, 16)] and key_projections == [1]
    monkeypatch.setattr(UNet, "prepare_context", lambda self, c: c)  # the same run on the raw context
    expected = pipe.generate(steps=4, noise=noise, prompt="x", guidance_scale=3.0, cache_interval=2,
                             output="latent", progress=False)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def _sample(unet, batch, context, interval=3, steps=10):
    cached = CachedUNet(unet, steps, uniform_schedule(steps, interval), 1)
    prepared = unet.prepare_context(context[:1].expand(batch, -1, -1))
    with torch.inference_mode():  # as in generate: x is an inference tensor at every step
        noise = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(batch))
        return sample_ddim(lambda z, t: cached(z, t, prepared), noise, SchedulerConfig(), steps, progress=False)


def test_compiled_sampling_compiles_each_path_once_across_steps_and_batch_sizes():
    """10 steps with cache N=3 trace the three primitives (cut, rest, from-cache) once each; batch 4
    (a guided run of batch 2) and 3 reuse the graphs. Dynamo's guards, not the backend, decide recompiles, so
    the 'eager' backend keeps this fast; the inductor test below checks the generated code."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    unet, context = text_unet(attention_levels=(1,)), torch.randn(1, 5, 16)
    expected = {b: _sample(unet, b, context) for b in (2, 4, 3)}
    unet.compile_paths(backend="eager")
    for b in (2, 4, 3):
        # compiled paths call oneDNN-packed linear layers: last-bit differences, scaled by outputs ~100
        assert (_sample(unet, b, context) - expected[b]).abs().max() <= 1e-6 * expected[b].abs().max()
        assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
    assert not counters["graph_break"] and not counters["recompiles"]


def test_inductor_compiled_paths_match_eager(device):
    """The default backend (C++/Triton code generation) on each available device: same numbers."""
    torch._dynamo.reset()
    unet = text_unet(channel_mult=(1,), attention_levels=(0,), mid_attention=False).to(device)
    x, context = torch.randn(2, 4, 8, 8, device=device), torch.randn(2, 5, 16, device=device)
    prepared = unet.prepare_context(context)
    with torch.inference_mode():
        ref_out, ref_cache = unet.forward_full(x, 10, prepared, branch=0)
        ref_shallow = unet.forward_shallow(x, 20, prepared, cache=ref_cache)
        unet.compile_paths()
        out, cache = unet.forward_full(x, 10, prepared, branch=0)
        shallow = unet.forward_shallow(x, 20, prepared, cache=cache)
    assert torch.allclose(out, ref_out, atol=1e-4, rtol=0) and torch.allclose(shallow, ref_shallow, atol=1e-4, rtol=0)


def test_gpu_check_dry_run_exercises_its_code_paths():
    """benchmarks/gpu_check.py --dry: the GPU script's parity and speed code on CPU at tiny sizes."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("diffusers")
    pytest.importorskip("DeepCache")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(repo / "benchmarks" / "gpu_check.py"), "--dry"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    error = float(re.search(r"forward float32\s+(\S+)", out).group(1))
    assert error < 1e-4, out
    for n in (1, 3):  # every implementation timed in every row
        row = re.search(rf"^plms\s+4\s+{n}\s+(.*)$", out, re.M).group(1).split()
        assert len(row) == 8 and "-" not in row, out
