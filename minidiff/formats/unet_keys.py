"""U-Net configs and state-dict keys of the public layouts, translated to minidiff's.

Three layouts reach the same native U-Net:
- diffusers (`UNet2DModel`, `UNet2DConditionModel`): nested `down_blocks.i.resnets.j` ...
- openaimodel (CompVis LDM / SD single files): flat `input_blocks.k.0.in_layers.0` ...
- pesser's TF port of DDPM: `down.i.block.j`, `mid.block_1`, `up.i` indexed by resolution level.

Each is a table of key prefixes computed from the config (which block index a nested name lands
on), followed by an ordered table of inner renames. Both are plain data a reader can check.
"""
from __future__ import annotations

import re

from ..unet import UNetConfig

# Inner names of blocks, after the block prefix has been mapped.
_INNER_RENAMES = [
    # ResBlock: diffusers / pesser / openaimodel spellings
    (r"\.time_emb_proj\.", ".emb_proj."),
    (r"\.temb_proj\.", ".emb_proj."),
    (r"\.conv_shortcut\.", ".shortcut."),
    (r"\.nin_shortcut\.", ".shortcut."),
    (r"\.in_layers\.0\.", ".norm1."),
    (r"\.in_layers\.2\.", ".conv1."),
    (r"\.emb_layers\.1\.", ".emb_proj."),
    (r"\.out_layers\.0\.", ".norm2."),
    (r"\.out_layers\.3\.", ".conv2."),
    (r"\.skip_connection\.", ".shortcut."),
    # DDPM attention block: current and deprecated diffusers names, pesser's names
    (r"\.group_norm\.", ".norm."),
    (r"\.(query|q)\.", ".to_q."),
    (r"\.(key|k)\.", ".to_k."),
    (r"\.(value|v)\.", ".to_v."),
    (r"\.(proj_attn|to_out\.0)\.", ".to_out."),
    # spatial transformer
    (r"\.transformer_blocks\.", ".blocks."),
    (r"\.ff\.net\.0\.proj\.", ".ff.proj."),
    (r"\.ff\.net\.2\.", ".ff.out."),
    # openaimodel downsampler
    (r"\.op\.", ".conv."),
]

_DIFFUSERS_TOP = [("conv_in.", "input_blocks.0.0."), ("time_embedding.", "time_embed."),
                  ("class_embedding.", "class_embed."), ("conv_norm_out.", "out_norm."), ("conv_out.", "out_conv.")]
_OPENAI_TOP = [("time_embed.0.", "time_embed.linear_1."), ("time_embed.2.", "time_embed.linear_2."),
               ("label_emb.", "class_embed."), ("out.0.", "out_norm."), ("out.2.", "out_conv.")]
_PESSER_TOP = [("conv_in.", "input_blocks.0.0."), ("temb.dense.0.", "time_embed.linear_1."),
               ("temb.dense.1.", "time_embed.linear_2."), ("norm_out.", "out_norm."), ("conv_out.", "out_conv."),
               ("mid.block_1.", "middle_block.0."), ("mid.attn_1.", "middle_block.1."), ("mid.block_2.", "middle_block.2.")]


def _block_prefixes(cfg: UNetConfig, style: str) -> list:
    """(source prefix, native prefix) of every encoder, middle and decoder block, for `style`."""
    levels, reps = len(cfg.channel_mult), cfg.num_res_blocks
    table = []
    if style == "diffusers":
        mid = ["mid_block.resnets.0.", "mid_block.attentions.0.", "mid_block.resnets.1."]
        table += list(zip(mid if cfg.mid_attention else mid[::2], [f"middle_block.{i}." for i in range(3)]))
    k = 1
    for level in range(levels):
        for j in range(reps):
            if style == "diffusers":
                table += [(f"down_blocks.{level}.resnets.{j}.", f"input_blocks.{k}.0."),
                          (f"down_blocks.{level}.attentions.{j}.", f"input_blocks.{k}.1.")]
            else:
                table += [(f"down.{level}.block.{j}.", f"input_blocks.{k}.0."),
                          (f"down.{level}.attn.{j}.", f"input_blocks.{k}.1.")]
            k += 1
        if level != levels - 1:
            src = f"down_blocks.{level}.downsamplers.0." if style == "diffusers" else f"down.{level}.downsample."
            table.append((src, f"input_blocks.{k}.0."))
            k += 1
    k = 0
    for order, level in enumerate(reversed(range(levels))):
        name = f"up_blocks.{order}" if style == "diffusers" else f"up.{level}"
        up_slot = 2 if level in cfg.attention_levels else 1
        for j in range(reps + 1):
            if style == "diffusers":
                table += [(f"{name}.resnets.{j}.", f"output_blocks.{k}.0."),
                          (f"{name}.attentions.{j}.", f"output_blocks.{k}.1.")]
            else:
                table += [(f"{name}.block.{j}.", f"output_blocks.{k}.0."), (f"{name}.attn.{j}.", f"output_blocks.{k}.1.")]
            if j == reps and level != 0:
                src = f"{name}.upsamplers.0." if style == "diffusers" else f"{name}.upsample."
                table.append((src, f"output_blocks.{k}.{up_slot}."))
            k += 1
    return table


def _rename(state_dict: dict, prefixes: list, inner=_INNER_RENAMES) -> dict:
    out = {}
    for key, value in state_dict.items():
        new = None
        for src, dst in prefixes:
            if key.startswith(src):
                new = dst + key[len(src):]
                break
        new = "." + (key if new is None else new)
        for pattern, repl in inner:
            new = re.sub(pattern, repl, new)
        new = new[1:]
        if new in out:
            raise ValueError(f"two checkpoint keys map to the same minidiff key {new!r} (second: {key!r})")
        out[new] = value
    return out


def _squeeze_attention(state_dict: dict) -> dict:
    """1x1-conv attention weights (pesser, old VAE files) become the Linear weights minidiff uses."""
    for key, value in state_dict.items():
        if re.search(r"\.to_[qkv]\.weight$|\.to_out\.weight$", key) and value.ndim == 4 and value.shape[2:] == (1, 1):
            if ".blocks." not in key:  # transformer attention is never a conv
                state_dict[key] = value[:, :, 0, 0]
    return state_dict


def _squeeze_projection(state_dict: dict, cfg: UNetConfig) -> dict:
    """SD2-style linear projections stored as 1x1 convs, or the reverse, fitted to the config."""
    for key, value in list(state_dict.items()):
        if re.search(r"\.proj_(in|out)\.weight$", key):
            if cfg.use_linear_projection and value.ndim == 4:
                state_dict[key] = value[:, :, 0, 0]
            elif not cfg.use_linear_projection and value.ndim == 2:
                state_dict[key] = value[:, :, None, None]
    return state_dict


def diffusers_to_native(state_dict: dict, cfg: UNetConfig) -> dict:
    """A diffusers UNet2DModel / UNet2DConditionModel state dict in minidiff's key layout."""
    sd = _rename(state_dict, _DIFFUSERS_TOP + _block_prefixes(cfg, "diffusers"))
    return _squeeze_projection(_squeeze_attention(sd), cfg)


def openaimodel_to_native(state_dict: dict, cfg: UNetConfig) -> dict:
    """An openaimodel state dict (prefix already stripped) in minidiff's key layout."""
    sd = _rename(state_dict, _OPENAI_TOP)
    return _squeeze_projection(sd, cfg)


def pesser_to_native(state_dict: dict, cfg: UNetConfig) -> dict:
    """A DDPM checkpoint of pesser's TF port (keys like `down.0.block.0.norm1`) in minidiff's layout."""
    # pesser's attention output is `proj_out`, a name spatial transformers keep for their projection
    sd = _rename(state_dict, _PESSER_TOP + _block_prefixes(cfg, "pesser"),
                 _INNER_RENAMES + [(r"\.proj_out\.", ".to_out.")])
    return _squeeze_attention(sd)


# -- configs --------------------------------------------------------------------------------------

_IGNORED_DIFFUSERS_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "act_fn", "center_input_sample",
                           "time_embedding_type", "mid_block_scale_factor", "resnet_time_scale_shift",
                           "upcast_attention", "only_cross_attention", "dual_cross_attention",
                           "class_embed_type", "addition_embed_type", "mid_block_type", "conv_in_kernel",
                           "conv_out_kernel", "num_train_timesteps", "downsample_type", "upsample_type",
                           "attn_norm_num_groups", "add_attention", "resnet_skip_time_act",
                           "resnet_out_scale_factor", "time_cond_proj_dim", "timestep_post_act",
                           "projection_class_embeddings_input_dim", "encoder_hid_dim", "encoder_hid_dim_type",
                           "addition_time_embed_dim", "class_embeddings_concat", "cross_attention_norm",
                           "addition_embed_type_num_heads", "time_embedding_dim", "time_embedding_act_fn",
                           "reverse_transformer_layers_per_block", "attention_type", "num_class_embeds",
                           "mid_block_only_cross_attention", "encoder_hid_dim_type",
                           "sample_size", "in_channels", "out_channels", "block_out_channels",
                           "down_block_types", "up_block_types", "layers_per_block", "attention_head_dim",
                           "num_attention_heads", "norm_num_groups", "norm_eps", "downsample_padding",
                           "flip_sin_to_cos", "freq_shift", "cross_attention_dim", "transformer_layers_per_block",
                           "use_linear_projection", "dropout", "attention_legacy_order"}

# Settings minidiff's U-Net does not implement; the value each must have for a model to load.
_REQUIRED_DIFFUSERS_VALUES = {
    "act_fn": "silu", "center_input_sample": False, "time_embedding_type": "positional",
    "mid_block_scale_factor": 1, "resnet_time_scale_shift": "default", "only_cross_attention": False,
    "dual_cross_attention": False, "class_embed_type": None, "addition_embed_type": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "downsample_type": "conv", "upsample_type": "conv",
    "attn_norm_num_groups": None, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_cond_proj_dim": None, "timestep_post_act": None, "encoder_hid_dim": None,
    "class_embeddings_concat": False, "time_embedding_dim": None, "time_embedding_act_fn": None,
    "reverse_transformer_layers_per_block": None, "attention_type": "default", "cross_attention_norm": None,
    "mid_block_type": None, "mid_block_only_cross_attention": None, "encoder_hid_dim_type": None,
}
# diffusers' constructor defaults, which apply to keys a config.json leaves out.
_DIFFUSERS_DEFAULTS = {
    "UNet2DModel": dict(in_channels=3, out_channels=3, flip_sin_to_cos=True, freq_shift=0,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                        block_out_channels=(224, 448, 672, 896), layers_per_block=2, downsample_padding=1,
                        attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, add_attention=True, dropout=0.0),
    "UNet2DConditionModel": dict(in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
                                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                 downsample_padding=1, norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1280,
                                 transformer_layers_per_block=1, attention_head_dim=8, num_attention_heads=None,
                                 use_linear_projection=False, dropout=0.0),
}
_OK_MID_BLOCKS = {None, "UNetMidBlock2D", "UNetMidBlock2DCrossAttn"}


def _channel_mult(block_out_channels) -> tuple:
    base = block_out_channels[0]
    if any(c % base for c in block_out_channels):
        raise ValueError(f"block_out_channels {list(block_out_channels)} are not multiples of the first; "
                         "minidiff's U-Net needs channel multipliers")
    return tuple(c // base for c in block_out_channels)


def config_from_diffusers(d: dict) -> UNetConfig:
    """UNetConfig equal to a diffusers UNet2DModel / UNet2DConditionModel config.json."""
    cls = d.get("_class_name") or ("UNet2DConditionModel" if "cross_attention_dim" in d else "UNet2DModel")
    if cls not in ("UNet2DModel", "UNet2DConditionModel"):
        raise ValueError(f"expected a UNet2DModel or UNet2DConditionModel config, got _class_name {cls!r}")
    d = {**_DIFFUSERS_DEFAULTS[cls], **d}
    unknown = sorted(k for k in set(d) - _IGNORED_DIFFUSERS_KEYS if not k.startswith("_"))
    if unknown:
        raise ValueError(f"unsupported U-Net config key(s) {unknown}: minidiff cannot reproduce them")
    for key, want in _REQUIRED_DIFFUSERS_VALUES.items():
        if key in d and d[key] not in (want, False if want is None else want) \
                and not (key == "mid_block_type" and d[key] in _OK_MID_BLOCKS):
            raise ValueError(f"U-Net config {key}={d[key]!r} is not supported (minidiff implements {want!r})")
    down, up = list(d["down_block_types"]), list(d["up_block_types"])
    if len(down) != len(up):
        raise ValueError(f"{len(down)} down blocks but {len(up)} up blocks")
    attn_down = [i for i, name in enumerate(down) if name.startswith(("Attn", "CrossAttn"))]
    attn_up = [len(up) - 1 - i for i, name in enumerate(up) if name.startswith(("Attn", "CrossAttn"))]
    if sorted(attn_down) != sorted(attn_up):
        raise ValueError(f"attention at down levels {attn_down} but up levels {sorted(attn_up)}; minidiff needs "
                         "them mirrored")
    for name in down + up:
        if name not in ("DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D",
                        "CrossAttnUpBlock2D"):
            raise ValueError(f"unsupported block type {name!r}")
    depth = d.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int):
        raise ValueError(f"per-level transformer_layers_per_block {depth} is not supported")
    conditional = cls == "UNet2DConditionModel"
    num_heads, head_channels = _diffusers_heads(d, conditional, len(down))
    return UNetConfig(
        in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
        model_channels=d["block_out_channels"][0], channel_mult=_channel_mult(d["block_out_channels"]),
        num_res_blocks=d.get("layers_per_block", 2), attention_levels=tuple(attn_down),
        mid_attention=d.get("add_attention", True),
        attention_type="transformer" if conditional else "self",
        num_heads=num_heads, head_channels=head_channels,
        transformer_depth=depth, context_dim=d.get("cross_attention_dim", 1280) if conditional else None,
        use_linear_projection=d.get("use_linear_projection", False),
        num_classes=d.get("num_class_embeds"), class_cond="add", dropout=d.get("dropout", 0.0),
        norm_groups=d.get("norm_num_groups", 32), norm_eps=d.get("norm_eps", 1e-5),
        downsample_padding=d.get("downsample_padding", 1), flip_sin_to_cos=d.get("flip_sin_to_cos", True),
        freq_shift=d.get("freq_shift", 0), sample_size=d.get("sample_size"),
    )


def _diffusers_heads(d: dict, conditional: bool, levels: int) -> tuple:
    """(num_heads, head_channels) of a diffusers U-Net config, each an int or one value per level.

    UNet2DConditionModel reads `num_attention_heads or attention_head_dim` as the number of heads
    (SD's configs say attention_head_dim: 8 and mean 8 heads: the naming slip of diffusers #2011),
    one per down block; up blocks take the list reversed, so level i has entry i either way, and the
    middle block the last. UNet2DModel reads attention_head_dim as the width of a head (None: one head
    as wide as the block).
    """
    if conditional:
        heads = d.get("num_attention_heads") or d.get("attention_head_dim")
        if isinstance(heads, (list, tuple)):
            if len(heads) != levels:
                raise ValueError(f"per-level head counts {list(heads)} give {len(heads)} values for {levels} "
                                 "down blocks; diffusers needs one per block")
            heads = heads[0] if len(set(heads)) == 1 else tuple(heads)
        return heads, None
    width = d.get("attention_head_dim")
    if isinstance(width, (list, tuple)):
        raise ValueError(f"UNet2DModel attention_head_dim {list(width)} is a list; diffusers' UNet2DModel takes "
                         "one head width for every block (an int or null)")
    return None, width


def config_from_openaimodel(p: dict, num_classes: int | None = None) -> UNetConfig:
    """UNetConfig equal to the `unet_config.params` of a CompVis (LDM / SD1.x) yaml.

    `num_classes` is set for class-conditional LDMs whose ClassEmbedder feeds cross-attention.
    """
    supported = {"image_size", "in_channels", "out_channels", "model_channels", "attention_resolutions",
                 "num_res_blocks", "channel_mult", "num_heads", "num_head_channels", "use_spatial_transformer",
                 "transformer_depth", "context_dim", "use_checkpoint", "legacy", "use_fp16", "dropout",
                 "conv_resample", "dims", "use_scale_shift_norm", "resblock_updown", "num_classes",
                 "use_linear_in_transformer", "num_heads_upsample", "use_new_attention_order"}
    unknown = sorted(set(p) - supported)
    if unknown:
        raise ValueError(f"unsupported unet_config params {unknown}")
    for key, want in (("dims", 2), ("use_scale_shift_norm", False), ("resblock_updown", False),
                      ("conv_resample", True), ("use_new_attention_order", False)):
        if p.get(key, want) != want:
            raise ValueError(f"unet_config {key}={p[key]!r} is not supported (minidiff implements {want!r})")
    if not p.get("use_spatial_transformer", False):
        raise ValueError("only openaimodel U-Nets with use_spatial_transformer: true are supported")
    mult = tuple(p.get("channel_mult", (1, 2, 4, 8)))
    ds = [2 ** i for i in range(len(mult))]
    levels = tuple(i for i, f in enumerate(ds) if f in set(p["attention_resolutions"]))
    num_heads, head_channels = _openaimodel_heads(p, mult, levels)
    if p.get("num_classes") is not None:
        raise ValueError("openaimodel label_emb class conditioning is not supported; cin256-v2-style models pass "
                         "the class through cross-attention")
    return UNetConfig(
        in_channels=p["in_channels"], out_channels=p["out_channels"], model_channels=p["model_channels"],
        channel_mult=mult, num_res_blocks=p["num_res_blocks"], attention_levels=levels, mid_attention=True,
        attention_type="transformer", num_heads=num_heads, head_channels=head_channels,
        transformer_depth=p.get("transformer_depth", 1), context_dim=p.get("context_dim"),
        use_linear_projection=p.get("use_linear_in_transformer", False),
        num_classes=num_classes, class_cond="context", dropout=p.get("dropout", 0.0), norm_groups=32,
        norm_eps=1e-5, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
        sample_size=p.get("image_size"),
    )


def _openaimodel_heads(p: dict, mult: tuple, levels: tuple) -> tuple:
    """(num_heads, head_channels) of openaimodel's `num_heads` / `num_head_channels` (-1: unset).

    num_head_channels, when set, wins: every attention layer gets channels // num_head_channels heads
    of that width, `legacy` or not (legacy recomputes the width as channels // heads, the same
    number when it divides). Otherwise each layer has num_heads heads of channels // num_heads.
    num_heads_upsample only reaches the old AttentionBlock, never a spatial transformer.
    """
    heads, width = p.get("num_heads", -1), p.get("num_head_channels", -1)
    if heads in (-1, None) and width in (-1, None):
        raise ValueError("unet_config needs num_heads or num_head_channels (openaimodel refuses both unset)")
    split = ("num_head_channels", width) if width not in (-1, None) else ("num_heads", heads)
    for level in sorted(set(levels) | {len(mult) - 1}):  # attention levels and the middle block
        channels = p["model_channels"] * mult[level]
        if channels % split[1]:
            raise ValueError(f"unet_config {split[0]}={split[1]} does not divide the {channels} channels at level "
                             f"{level}; openaimodel would build attention narrower than its block, which minidiff "
                             "does not implement")
    return (None, width) if split[0] == "num_head_channels" else (heads, None)


def config_from_pesser(ch: int, ch_mult, num_res_blocks: int, attn_resolutions, resolution: int,
                       in_channels: int = 3, out_ch: int = 3, dropout: float = 0.0) -> UNetConfig:
    """UNetConfig of a DDPM model in pesser's / ermongroup's config terms (ch, ch_mult, attn_resolutions)."""
    levels = tuple(i for i in range(len(ch_mult)) if resolution // 2 ** i in set(attn_resolutions))
    return UNetConfig(in_channels=in_channels, out_channels=out_ch, model_channels=ch, channel_mult=tuple(ch_mult),
                      num_res_blocks=num_res_blocks, attention_levels=levels, attention_type="self",
                      dropout=dropout, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                      sample_size=resolution)
