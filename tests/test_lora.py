"""minidiff.lora against diffusers' `load_lora_weights` + `fuse_lora` (with peft) on a tiny SD1.x model:
kohya and diffusers/PEFT files reaching attention, feed-forward, projections, 3x3 convolutions and
the text encoder; unloading restores every weight bit for bit; bad files are refused before any
weight changes."""

import struct

import pytest
import torch

pytest.importorskip("peft", reason="diffusers' LoRA loading (the reference) needs peft")

from test_convert_sd15 import TOKENIZER_DIR, convert_diffusers, tiny_diffusers_pipeline  # noqa: E402
from minidiff import lora  # noqa: E402
from minidiff.checkpoint import CheckpointError  # noqa: E402

# A merged LoRA changes float32 weights by rounding alone; outputs are compared relative to their scale.
RELATIVE_TOLERANCE = 1e-4
PROMPTS = ["a photograph of an astronaut riding a horse", "a red fox in the snow"]
RANK = 4
# Layers of diffusers' UNet2DConditionModel a LoRA may reach: attention, feed-forward, projections,
# ResBlock convolutions (3x3), shortcuts, time projections and resamplers.
UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1",
               "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

pytestmark = pytest.mark.skipif(not TOKENIZER_DIR.is_dir(), reason=f"SD1.5 tokenizer not found at {TOKENIZER_DIR}")


def relative_err(got, expected):
    return (got.float() - expected.float()).abs().max().item() / max(1.0, expected.abs().max().item())


def lora_pairs(module, layers, seed, std=0.05):
    """{layer name: (up, down)} of random rank-4 updates for the Linear/Conv2d layers named by `layers`."""
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for name, m in module.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(layers):
            if isinstance(m, torch.nn.Conv2d):
                down = torch.randn(RANK, m.in_channels, *m.kernel_size, generator=g) * std
                up = torch.randn(m.out_channels, RANK, 1, 1, generator=g) * std
            else:
                down, up = (torch.randn(RANK, m.in_features, generator=g) * std,
                            torch.randn(m.out_features, RANK, generator=g) * std)
            pairs[name] = (up, down)
    return pairs


def peft_file(path, reference, seed):
    """A diffusers/PEFT `pytorch_lora_weights.safetensors` (lora_A / lora_B, alpha = rank)."""
    from safetensors.torch import save_file

    state = {}
    for prefix, module, layers in (("unet", reference.unet, UNET_LAYERS),
                                   ("text_encoder.text_model", reference.text_encoder, TEXT_LAYERS)):
        for name, (up, down) in lora_pairs(module, layers, seed).items():
            state[f"{prefix}.{name}.lora_A.weight"], state[f"{prefix}.{name}.lora_B.weight"] = down, up
    save_file(state, str(path))
    return path


def kohya_file(path, reference, seed, alpha=2.0):
    """A kohya / sd-scripts file (lora_unet_* / lora_te_*, lora_down / lora_up, alpha != rank)."""
    from safetensors.torch import save_file

    state = {}
    for prefix, module, layers in (("lora_unet_", reference.unet, UNET_LAYERS),
                                   ("lora_te_text_model_", reference.text_encoder, TEXT_LAYERS)):
        for name, (up, down) in lora_pairs(module, layers, seed).items():
            key = prefix + name.replace(".", "_")
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
            state[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(a diffusers pipeline factory, the same model in minidiff, a folder for LoRA files)."""
    folder = tmp_path_factory.mktemp("lora")
    reference = tiny_diffusers_pipeline(seed=21)
    ours = convert_diffusers(reference, folder)
    reference.set_progress_bar_config(disable=True)
    return reference, ours, folder


def fused_reference(reference, files):
    """A copy of the diffusers pipeline with every (file, scale) loaded as an adapter, weighted by its
    scale and fused into the weights, as diffusers does it."""
    import copy

    pipe = copy.deepcopy(reference)
    names = [f"a{i}" for i in range(len(files))]
    for name, (path, _) in zip(names, files):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in files])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()  # drops the adapter layers, keeps the fused weights
    return pipe


def compare_outputs(ours, reference):
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([981, 21])
    ids = reference.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference.unet(x, t, encoder_hidden_states=context).sample
        return {"unet": relative_err(ours.unet(x, t, context), expected),
                "text": relative_err(ours.text_encoder(ids), reference.text_encoder(ids).last_hidden_state)}


def test_kohya_and_peft_files_merged_at_their_scales_equal_diffusers_fuse_lora(setup):
    reference, ours, folder = setup
    files = [(kohya_file(folder / "kohya.safetensors", reference, seed=1), 0.8),
             (peft_file(folder / "pytorch_lora_weights.safetensors", reference, seed=2), 0.5)]
    original = {k: v.clone() for k, v in {**ours.unet.state_dict(), **ours.text_encoder.state_dict()}.items()}
    fused = fused_reference(reference, files)
    for path, scale in files:
        ours.load_lora(path, scale=scale)
    try:
        errors = compare_outputs(ours, fused)
        before = compare_outputs(ours, reference)  # the LoRA must matter, or the parity says nothing
        print("LoRA kohya@0.8 + PEFT@0.5 vs diffusers fuse_lora:", {k: f"{v:.1e}" for k, v in errors.items()},
              "change from the bare model:", {k: f"{v:.1e}" for k, v in before.items()})
        assert max(errors.values()) <= RELATIVE_TOLERANCE and min(before.values()) > 1e-2
        assert lora.loaded(ours) == [(str(p), s) for p, s in files]
        touched = len(lora._state(ours).originals)
        assert touched == len(lora_pairs(reference.unet, UNET_LAYERS, 0)) + len(
            lora_pairs(reference.text_encoder, TEXT_LAYERS, 0))
    finally:
        ours.unload_lora()
    restored = {**ours.unet.state_dict(), **ours.text_encoder.state_dict()}
    assert all(torch.equal(restored[k], v) for k, v in original.items())  # bit for bit
    assert lora.loaded(ours) == []


@pytest.mark.parametrize("sampler,scheduler", [("ddim", "DDIMScheduler"), ("dpmpp_2m", "DPMSolverMultistepScheduler")])
def test_sampling_with_a_lora_and_guidance_equals_diffusers(setup, sampler, scheduler):
    import diffusers

    reference, ours, folder = setup
    path = folder / "for-sampling.safetensors"
    if not path.exists():
        peft_file(path, reference, seed=5)
    fused = fused_reference(reference, [(path, 1.0)])
    options = dict(algorithm_type="dpmsolver++", solver_order=2) if sampler == "dpmpp_2m" else {}
    # the converted model's schedule conventions (its timestep_spacing "leading", which save_pretrained
    # wrote although `_use_default_values` marks it a default diffusers drops when switching schedulers)
    fused.scheduler = getattr(diffusers, scheduler).from_config(ours.scheduler.to_dict(), **options)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    expected = fused(PROMPTS, guidance_scale=7.5, num_inference_steps=6, latents=noise.clone(),
                     output_type="latent").images
    ours.load_lora(path)
    try:
        got = ours.generate(prompt=PROMPTS, guidance_scale=7.5, sampler=sampler, steps=6, noise=noise,
                            output="latent", progress=False)
    finally:
        ours.unload_lora()
    err = relative_err(got, expected)
    print(f"{sampler}, 6 steps, guidance 7.5, LoRA vs diffusers: {err:.1e}")
    assert err <= RELATIVE_TOLERANCE


# -- refused files ------------------------------------------------------------------------------------

def _save(path, state):
    from safetensors.torch import save_file

    save_file(state, str(path))
    return path


BAD_FILES = {
    "unmatched key": ({"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32, 1, 1),
                       "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4, 1, 1)},
                      r"'lora_unet_down_blocks_7_attentions_0_proj_in\.lora_down\.weight' matches no layer"),
    "SDXL names": ({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 640),
                    "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(640, 4)},
                   r"'lora_unet_input_blocks_4_1_proj_in\.lora_down\.weight' is a Stable Diffusion XL layer name"),
    "SDXL text encoder 2": ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280)},
                            "this LoRA is for SDXL"),
    "SDXL-wide cross-attention": (
        {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.zeros(4, 2048),
         "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.zeros(32, 4)},
        r"attn2\.to_k\.lora_B\.weight' \(32, 4\) @ .* does not fit the layer's weight \(32, 32\)"),
    "rank mismatch": ({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 64, 1, 1),
                       "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(64, 8, 1, 1)},
                      r"rank mismatch at 'lora_unet_mid_block_attentions_0_proj_in'"),
    "half a pair": ({"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 64, 1, 1)},
                    "has no lora up weight"),
    "LoHa": ({"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.zeros(64, 4)}, "LyCORIS LoHa"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_files_are_refused_naming_the_key_and_nothing_changes(setup, name, tmp_path):
    reference, ours, _ = setup
    state, message = BAD_FILES[name]
    # a valid layer first: a loader that merged as it went would have changed it before the bad key
    good = lora_pairs(reference.unet, ("mid_block.attentions.0.proj_out",), seed=9)
    (up, down), = good.values()
    state = {"lora_unet_mid_block_attentions_0_proj_out.lora_down.weight": down,
             "lora_unet_mid_block_attentions_0_proj_out.lora_up.weight": up, **state}
    path = _save(tmp_path / "bad.safetensors", state)
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        ours.load_lora(path)
    assert all(torch.equal(v, before[k]) for k, v in ours.unet.state_dict().items())
    assert lora.loaded(ours) == []


def test_truncated_and_pickled_files_are_refused(setup, tmp_path):
    reference, ours, folder = setup
    whole = peft_file(tmp_path / "whole.safetensors", reference, seed=3).read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(whole[: len(whole) - 1000])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        ours.load_lora(tmp_path / "cut.safetensors")
    header = struct.unpack("<Q", whole[:8])[0]
    (tmp_path / "header.safetensors").write_bytes(whole[: 8 + header // 2])
    with pytest.raises(CheckpointError, match="header.safetensors"):
        ours.load_lora(tmp_path / "header.safetensors")
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, tmp_path / "lora.pt")
    with pytest.raises(CheckpointError, match="not .safetensors"):
        ours.load_lora(tmp_path / "lora.pt")
    with pytest.raises(ValueError, match="finite number"):
        ours.load_lora(tmp_path / "whole.safetensors", scale=float("nan"))
    assert lora.loaded(ours) == []


def test_cli_sample_merges_each_lora_at_its_scale_and_refuses_a_bad_one(setup, tmp_path, capsys):
    from PIL import Image

    from minidiff.cli import main

    reference, ours, folder = setup
    model = folder / "sd-native"
    good = peft_file(tmp_path / "style.safetensors", reference, seed=6)
    common = ["sample", "--model", str(model), "--prompt", "a red fox", "--steps", "2", "--threads", "1"]
    outputs = {}
    for name, extra in (("bare", []), ("lora", ["--lora", f"{good}:0.7", "--lora", str(good)])):
        outputs[name] = tmp_path / f"{name}.png"
        assert main(common + ["--out", str(outputs[name])] + extra) == 0
    pixels = {k: torch.tensor(list(Image.open(v).getdata()), dtype=torch.float32) for k, v in outputs.items()}
    assert (pixels["bare"] - pixels["lora"]).abs().max() > 0
    bad = _save(tmp_path / "sdxl.safetensors", BAD_FILES["SDXL names"][0])
    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "x.png"), "--lora", f"{bad}:0.5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Stable Diffusion XL" in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("text,parsed", [("a.safetensors", ("a.safetensors", 1.0)),
                                         ("a.safetensors:0.5", ("a.safetensors", 0.5)),
                                         ("C:/x/a.safetensors:-1", ("C:/x/a.safetensors", -1.0)),
                                         ("dir:v2/a.safetensors", ("dir:v2/a.safetensors", 1.0))])
def test_lora_flag_is_file_and_optional_scale(text, parsed):
    assert lora.parse_lora_arg(text) == parsed
