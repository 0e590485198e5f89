"""PyTorch Lightning `.ckpt` files as CompVis LDM and Stable Diffusion 1.x publish them: besides the
state dict they pickle Lightning's ModelCheckpoint class (as a callbacks key), numpy scalars, optimizer
and scheduler states and version strings. They must read without Lightning and without running code;
the same places holding a code-executing global must still be refused."""
import os
import pickle
import sys
import types
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import torch

from minidiff.checkpoint import CheckpointError, read_state_dict

LIGHTNING_MODULE = "pytorch_lightning.callbacks.model_checkpoint"


@contextmanager
def stand_in_lightning():
    """A fake `pytorch_lightning` on sys.modules, so torch.save pickles its class by that name."""
    modules = {name: types.ModuleType(name) for name in
               ("pytorch_lightning", "pytorch_lightning.callbacks", LIGHTNING_MODULE)}

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = LIGHTNING_MODULE, "ModelCheckpoint"
    modules[LIGHTNING_MODULE].ModelCheckpoint = ModelCheckpoint
    with mock.patch.dict(sys.modules, modules):
        yield ModelCheckpoint


def lightning_layout(state_dict, callback_key=None, callback_state=None) -> dict:
    """What Lightning 1.x's `trainer.save_checkpoint` writes (as in sd-v1-4.ckpt and LDM's model.ckpt)."""
    callback_state = callback_state if callback_state is not None else {
        "monitor": "val/rec_loss", "best_model_score": torch.tensor(0.25), "best_model_path": "logs/last.ckpt",
        "current_score": np.float64(0.25), "dirpath": "logs/checkpoints", "save_top_k": np.int32(3),
        "kth_value": np.float32(0.5), "best_k_models": {"a.ckpt": torch.tensor(0.25)}}
    return {
        "epoch": 6, "global_step": np.int64(470000), "pytorch-lightning_version": "1.4.2",
        "state_dict": state_dict,
        "callbacks": {callback_key: callback_state},
        "optimizer_states": [{"state": {0: {"step": 10, "exp_avg": torch.zeros(3), "exp_avg_sq": torch.ones(3)}},
                              "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8,
                                                "weight_decay": 0.0, "amsgrad": False, "params": [0]}]}],
        "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 10, "_step_count": 11, "verbose": False,
                           "_last_lr": [1e-4], "lr_lambdas": [{"lr_start": 1e-6, "warm_up_steps": [10000]}]}],
        "dtype_seen": np.dtype("float64"), "bool_flag": np.bool_(True), "uint": np.uint8(3),
        "big_endian": np.dtype(">f4").type(1.5),
    }


def save_lightning(path, state_dict, **kwargs):
    with stand_in_lightning() as model_checkpoint:
        torch.save(lightning_layout(state_dict, callback_key=kwargs.pop("key", model_checkpoint), **kwargs), path)
    return path


def test_the_layout_really_names_lightning_and_numpy(tmp_path):
    """Without this the tests below could pass on a file plain weights_only loading reads anyway."""
    path = save_lightning(tmp_path / "model.ckpt", {"w": torch.ones(2)})
    with pytest.raises(pickle.UnpicklingError, match="pytorch_lightning|numpy"):
        torch.load(path, weights_only=True)
    with mock.patch.dict(sys.modules, {"pytorch_lightning": None, "lightning": None}):  # importing them fails
        assert set(read_state_dict(path)) == {"w"}


@pytest.mark.parametrize("legacy", [False, True])
def test_lightning_checkpoint_reads_its_state_dict_only(tmp_path, legacy):
    weights = {"model.diffusion_model.w": torch.randn(3, 4), "first_stage_model.b": torch.randn(5)}
    path = tmp_path / "model.ckpt"
    with stand_in_lightning() as model_checkpoint:
        torch.save(lightning_layout(weights, model_checkpoint), path, _use_new_zipfile_serialization=not legacy)
    sd = read_state_dict(path)
    assert set(sd) == set(weights)
    assert all(torch.equal(sd[k], v) for k, v in weights.items())


def test_numpy_scalars_come_back_as_plain_numbers(tmp_path):
    """The stand-ins decode the numbers (global_step etc.) rather than passing bytes through."""
    from minidiff.checkpoint import _LIGHTNING_GLOBALS

    path = tmp_path / "scalars.pt"
    torch.save({"step": np.int64(470000), "score": np.float64(0.25), "half": np.float16(2.5),
                "flag": np.bool_(True), "big": np.dtype(">i4").type(-7)}, path)
    with torch.serialization.safe_globals(_LIGHTNING_GLOBALS):
        obj = torch.load(path, weights_only=True)
    assert obj == {"step": 470000, "score": 0.25, "half": 2.5, "flag": True, "big": -7}
    assert type(obj["step"]) is int and type(obj["score"]) is float


class RunsShell:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Execs:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


class PosingAsLightning:
    """A payload whose class claims Lightning's name but reduces to os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


PosingAsLightning.__module__ = LIGHTNING_MODULE
PosingAsLightning.__qualname__ = "ModelCheckpoint"


@pytest.mark.parametrize("where", ["key-system", "key-exec", "value-system", "value-exec", "posing",
                                   "numpy-position"])
def test_code_executing_globals_in_the_lightning_places_are_refused(tmp_path, where):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.ckpt"
    weights = {"w": torch.ones(2)}
    if where == "key-system":
        save_lightning(path, weights, key=os.system)
    elif where == "key-exec":
        save_lightning(path, weights, key=exec)
    elif where == "value-system":
        save_lightning(path, weights, callback_state={"monitor": RunsShell(marker)})
    elif where == "value-exec":
        save_lightning(path, weights, callback_state={"monitor": Execs(marker)})
    elif where == "posing":
        save_lightning(path, weights, callback_state={"best": PosingAsLightning(marker)})
    else:  # a payload where global_step's numpy scalar would be
        with stand_in_lightning() as model_checkpoint:
            layout = lightning_layout(weights, model_checkpoint)
            layout["global_step"] = RunsShell(marker)
            torch.save(layout, path)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "refused" in message and ("system" in message or "exec" in message), message
    assert not marker.exists()


def test_control_payloads_do_run_when_unpickled_unsafely(tmp_path):
    marker = tmp_path / "MARKER"
    pickle.loads(pickle.dumps(PosingAsLightning(marker)))  # our own bytes: safe to run here
    assert marker.exists()


def test_allow_list_is_scoped_to_the_reader(tmp_path):
    """The stand-ins are registered only while reading, never left in torch's global allow-list."""
    path = save_lightning(tmp_path / "model.ckpt", {"w": torch.ones(2)})
    read_state_dict(path)
    names = [g[1] if isinstance(g, tuple) else g for g in torch.serialization.get_safe_globals()]
    assert not any("lightning" in str(n) or "numpy" in str(n) for n in names)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


# -- converting tiny published-layout checkpoints ----------------------------------------------------

def test_tiny_compvis_ldm_in_lightning_layout_converts_and_matches(tmp_path):
    pytest.importorskip("yaml")
    pytest.importorskip("ldm")
    from test_convert_ldm import TINY, _checkpoint, _original, _original_decode, _yaml_config, max_err

    from minidiff.convert.ldm import main
    from minidiff import load

    spec = TINY["cin-like-1head"]
    orig = _original(spec, seed=3)
    src, config = save_lightning(tmp_path / "model.ckpt", _checkpoint(orig)), tmp_path / "model.yaml"
    config.write_text(_yaml_config(spec))
    assert main([str(src), str(tmp_path / "native"), "--config", str(config)]) == 0
    pipe = load(tmp_path / "native")
    g = torch.Generator().manual_seed(1)
    x, t, labels = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([1, 981]), torch.tensor([0, 1000])
    z = torch.randn(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        expected = orig.apply_model(x, t, orig.embedder(labels)[:, None])
        assert expected.abs().mean() > 0.05
        assert max_err(pipe.unet(x, t, labels), expected) <= 1e-5
        assert max_err(pipe.autoencoder.decode(z), _original_decode(orig.first_stage, z)) <= 1e-5


def test_tiny_sd_single_file_in_lightning_layout_converts_and_matches(tmp_path):
    pytest.importorskip("yaml")
    pytest.importorskip("ldm")
    import json

    import test_convert_sd15 as sdt
    from minidiff.convert import sd15
    from conftest import randomize_with_norms
    from minidiff import load

    if not sdt.TOKENIZER_DIR.is_dir():
        pytest.skip("shared tokenizer files not found")
    parts = {"unet": randomize_with_norms(__import__("ldm.modules.diffusionmodules.openaimodel", fromlist=["UNetModel"])
                                   .UNetModel(**sdt.LDM_UNET), 5),
             "vae": randomize_with_norms(sdt.LdmFirstStage(), 7), "clip": sdt.tiny_clip(8)}
    src = save_lightning(tmp_path / "sd-v1-4.ckpt", sdt.single_file_state(parts))
    text_config = tmp_path / "text-config.json"
    text_config.write_text(json.dumps(parts["clip"].config.to_dict()))
    assert sd15.main([str(src), str(tmp_path / "native"), "--config", str(sdt.tiny_yaml(tmp_path)),
                      "--tokenizer", str(sdt.TOKENIZER_DIR), "--text-config", str(text_config)]) == 0
    errors = sdt._check_against_ldm(load(tmp_path / "native"), parts, parts["unet"])
    assert max(errors.values()) <= sdt.TOLERANCE, errors
