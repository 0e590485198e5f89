"""Convert a ControlNet to a minidiff ControlNet folder (minidiff.controlnet).

    python convert/controlnet.py SRC DST [--base MODEL] [--overwrite]

SRC is a diffusers `ControlNetModel` folder (config.json + diffusion_pytorch_model.safetensors) or
an original single file (`control_v11*_sd15_*.pth` / `.safetensors`; .pth is read without running
any pickled code). A single file has no config: its U-Net is SD1.5's unless `--base` names a
minidiff model folder whose U-Net it was trained for.

The encoder part has the U-Net's layout and goes through the U-Net's key tables
(minidiff.formats.unet_keys); only the hint encoder and the zero convolutions are renamed here.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ..checkpoint import CheckpointError, build_loaded, read_state_dict
from ..controlnet import ControlNet, ControlNetConfig, save
from ..formats import unet_keys
from ..writing import check_conversion_paths

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# diffusers ControlNetModel config keys that are not the U-Net's, with the value minidiff implements
# (None: any value, read below).
_CONTROLNET_KEYS = {"conditioning_channels": None, "conditioning_embedding_out_channels": None,
                    "controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False}
_UP_BLOCK = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D", "AttnDownBlock2D": "AttnUpBlock2D"}


# -- keys ---------------------------------------------------------------------------------------------

def _hint_key_original(index: int, n_blocks: int) -> str:
    """input_hint_block.{index} (a Sequential of convs with SiLU between: conv_in at 0, the
    `n_blocks` block convs at 2, 4, ..., then conv_out) -> hint_embed.*"""
    if index == 0:
        return "conv_in"
    if index == 2 * n_blocks + 2:
        return "conv_out"
    return f"blocks.{index // 2 - 1}"


def _split(state: dict, own: list) -> tuple:
    """(the ControlNet-specific keys renamed by `own`'s (pattern, function) pairs, the encoder's keys)."""
    native, encoder = {}, {}
    for key, value in state.items():
        for pattern, rename in own:
            m = re.fullmatch(pattern, key)
            if m:
                native[rename(m)] = value
                break
        else:
            encoder[key] = value
    return native, encoder


def diffusers_to_native(state: dict, cfg: ControlNetConfig) -> dict:
    own = [(r"controlnet_cond_embedding\.(.*)", lambda m: "hint_embed." + m[1]),
           (r"controlnet_down_blocks\.(\d+)\.(weight|bias)", lambda m: f"zero_convs.{m[1]}.{m[2]}"),
           (r"controlnet_mid_block\.(weight|bias)", lambda m: f"middle_out.{m[1]}")]
    native, encoder = _split(state, own)
    native.update({"encoder." + k: v for k, v in unet_keys.diffusers_to_native(encoder, cfg.unet).items()})
    return native


def original_to_native(state: dict, cfg: ControlNetConfig) -> dict:
    n = 2 * (len(cfg.hint_block_channels) - 1)  # two convs per width after the first
    own = [(r"input_hint_block\.(\d+)\.(weight|bias)", lambda m: f"hint_embed.{_hint_key_original(int(m[1]), n)}.{m[2]}"),
           (r"zero_convs\.(\d+)\.0\.(weight|bias)", lambda m: f"zero_convs.{m[1]}.{m[2]}"),
           (r"middle_block_out\.0\.(weight|bias)", lambda m: f"middle_out.{m[1]}")]
    state = {k[len("control_model."):] if k.startswith("control_model.") else k: v for k, v in state.items()}
    native, encoder = _split(state, own)
    native.update({"encoder." + k: v for k, v in unet_keys.openaimodel_to_native(encoder, cfg.unet).items()})
    return native


# -- configs ------------------------------------------------------------------------------------------

def config_from_diffusers(d: dict) -> ControlNetConfig:
    """ControlNetConfig of a diffusers ControlNetModel config.json: the U-Net part through the U-Net's reader."""
    if d.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise ValueError(f"expected a ControlNetModel config, got _class_name {d.get('_class_name')!r}")
    for key, want in _CONTROLNET_KEYS.items():
        if want is not None and key in d and d[key] != want:
            raise ValueError(f"ControlNet config {key}={d[key]!r} is not supported (minidiff implements {want!r})")
    unet = {k: v for k, v in d.items() if k not in _CONTROLNET_KEYS}
    down = unet.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))
    if any(name not in _UP_BLOCK for name in down):
        raise ValueError(f"unsupported ControlNet block types {list(down)}")
    unet.update(_class_name="UNet2DConditionModel", up_block_types=[_UP_BLOCK[n] for n in reversed(down)],
                out_channels=unet.get("in_channels", 4))
    return ControlNetConfig(unet_keys.config_from_diffusers(unet), d.get("conditioning_channels", 3),
                            tuple(d.get("conditioning_embedding_out_channels", (16, 32, 96, 256))))


def _hint_widths(state: dict) -> tuple:
    """(control image channels, hint block widths) read from an original file's hint encoder."""
    convs = sorted((int(m[1]), v) for k, v in state.items()
                   if (m := re.fullmatch(r"(?:control_model\.)?input_hint_block\.(\d+)\.weight", k)))
    if len(convs) < 2:
        raise CheckpointError("no input_hint_block.* weights: this is not an original ControlNet file")
    widths = [convs[0][1].shape[0]] + [w.shape[0] for _, w in convs[2:-1:2]]
    return convs[0][1].shape[1], tuple(widths)


def _base_config(base) -> "unet_keys.UNetConfig":
    if base is None:
        from .architectures import architecture

        return architecture("sd15")
    from ..unet import UNetConfig

    path = Path(base) / "config.json"
    try:
        return UNetConfig.from_dict(json.loads(path.read_text())["unet"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"--base {base} is not a minidiff U-Net model folder ({e})") from None


# -- reading ------------------------------------------------------------------------------------------

def read(src, *, base=None, allow_nan: bool = False) -> ControlNet:
    """A ControlNet from either layout, checked whole (keys, shapes) before it is built."""
    src = Path(src)
    if src.is_dir():
        if base is not None:
            raise ValueError("--base is for single files; a diffusers folder has its config.json")
        if not (src / "config.json").is_file():
            raise CheckpointError(f"{src} has no config.json; a diffusers ControlNetModel folder has config.json "
                                  "and diffusion_pytorch_model.safetensors")
        try:
            cfg = config_from_diffusers(json.loads((src / "config.json").read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{src / 'config.json'} is not valid JSON: {e}") from None
        weights = next((src / name for name in WEIGHT_FILES if (src / name).is_file()), None)
        if weights is None:
            raise CheckpointError(f"no weights in {src}: expected one of {', '.join(WEIGHT_FILES)}")
        native = diffusers_to_native(read_state_dict(weights, allow_nan=True), cfg)
        layout = "diffusers"
    else:
        weights = src
        state = read_state_dict(src, allow_nan=True)
        channels, widths = _hint_widths(state)
        cfg = ControlNetConfig(_base_config(base), channels, widths)
        native = original_to_native(state, cfg)
        layout = "original"
    net = build_loaded(lambda: ControlNet(cfg), native, f"ControlNet ({layout} layout, {weights})",
                       allow_nan=allow_nan).eval()
    net.meta = {"source": str(src), "layout": layout}
    return net


def convert(src, dst, *, base=None, overwrite: bool = False, allow_nan: bool = False) -> ControlNet:
    src, dst = check_conversion_paths(src, dst, overwrite)
    net = read(src, base=base, allow_nan=allow_nan)
    save(net, dst, overwrite=overwrite, meta=net.meta)
    return net


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="diffusers ControlNetModel folder, or an original .pth/.safetensors file")
    parser.add_argument("dst", help="minidiff ControlNet folder to write")
    parser.add_argument("--base", metavar="MODEL", help="minidiff model folder whose U-Net a single file belongs to "
                        "(default: SD1.5)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--allow-nan", action="store_true", help="convert weights that contain NaN/Inf")
    args = parser.parse_args(argv)
    try:
        net = convert(args.src, args.dst, base=args.base, overwrite=args.overwrite, allow_nan=args.allow_nan)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}: ControlNet ({net.meta['layout']}), {sum(p.numel() for p in net.parameters()):,} "
          f"parameters, {net.num_blocks} residuals + middle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
