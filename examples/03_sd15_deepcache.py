"""Stable Diffusion 1.5 with DeepCache: one prompt rendered in full and at cache intervals 2, 3 and 5.

    python examples/03_sd15_deepcache.py SRC [--tokenizer DIR | --bpe FILE] [--prompt "..."] [--steps 50]
    python examples/03_sd15_deepcache.py --tiny      # a tiny random model: runs in seconds, draws noise;
                                                     # needs nothing from outside the repository

SRC is an SD1.5 single file (`v1-5-pruned-emaonly.safetensors`, converted on the fly by
convert/sd15.py; it needs --tokenizer or --bpe), a diffusers folder, or a minidiff folder that
convert/sd15.py wrote. Every run uses the same seed, so the images differ only by caching: at
interval N one step in N runs the whole U-Net and the others run only its skip branch
(cache branch 0: the first encoder and the last decoder entry), reusing the deep feature of the
last full step. The script prints the time and how far each image is from the uncached one, and
saves them side by side (default out/sd15_deepcache.png).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import minidiff
from minidiff.convert import sd15
from minidiff.autoencoder import Autoencoder, AutoencoderConfig
from minidiff.pipeline import Pipeline
from minidiff.text import BOS_TOKEN, END_OF_WORD, EOS_TOKEN, CLIPTextConfig, CLIPTextEncoder, CLIPTokenizer, \
    bytes_to_unicode
from minidiff.unet import UNet, UNetConfig

INTERVALS = (1, 2, 3, 5)


def byte_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with no merges: every byte is a token. A random tiny model has learnt no
    words, so it needs no real vocabulary, only ids (514 of them)."""
    chars = list(bytes_to_unicode().values())
    tokens = [BOS_TOKEN, EOS_TOKEN, *chars, *(c + END_OF_WORD for c in chars)]
    return CLIPTokenizer({token: i for i, token in enumerate(tokens)}, merges=[])


def tiny_pipeline(tokenizer=None) -> Pipeline:
    """SD1.5's architecture shrunk to ~2M parameters with random weights: it shows the mechanics, not pictures."""
    tokenizer = tokenizer or byte_tokenizer()
    torch.manual_seed(0)
    unet = UNet(UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 2),
                           attention_levels=(0, 1), attention_type="transformer", num_heads=2, context_dim=32,
                           norm_eps=1e-5, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, sample_size=16))
    autoencoder = Autoencoder(AutoencoderConfig(base_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1))
    text_encoder = CLIPTextEncoder(CLIPTextConfig(vocab_size=len(tokenizer.vocab), hidden_size=32,
                                                  intermediate_size=64, num_hidden_layers=2, num_attention_heads=2))
    return Pipeline(unet, sd15.sd_scheduler(), autoencoder=autoencoder, text_encoder=text_encoder,
                    tokenizer=tokenizer, meta={"family": "sd1", "layout": "tiny"})


def load(args) -> Pipeline:
    src = Path(args.src)
    if (src / "config.json").is_file() and json.loads((src / "config.json").read_text()).get("format") == "minidiff":
        return minidiff.load(src)
    if src.is_dir():
        return sd15.from_diffusers_folder(src)
    return sd15.from_single_file(src, tokenizer=sd15.load_tokenizer(args.tokenizer, args.bpe))


def side_by_side(images: dict, path: Path):
    """One row of images, each labelled with its interval and time."""
    from PIL import Image, ImageDraw

    tiles = []
    for label, image in images.items():
        array = (image.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
        tile = Image.fromarray(array).resize((max(256, array.shape[1]),) * 2, Image.NEAREST)
        canvas = Image.new("RGB", (tile.width, tile.height + 20), "white")
        canvas.paste(tile, (0, 20))
        ImageDraw.Draw(canvas).text((4, 4), label, fill="black")
        tiles.append(canvas)
    row = Image.new("RGB", (sum(t.width for t in tiles), tiles[0].height), "white")
    for i, tile in enumerate(tiles):
        row.paste(tile, (i * tiles[0].width, 0))
    row.save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", nargs="?", help="SD1.5 single file, diffusers folder or minidiff folder")
    parser.add_argument("--tiny", action="store_true", help="build a tiny random SD1.5-shaped model instead")
    parser.add_argument("--tokenizer", help="vocab.json + merges.txt folder (single files; optional with --tiny)")
    parser.add_argument("--bpe", help="bpe_simple_vocab_16e6.txt.gz (single files; optional with --tiny)")
    parser.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, help="image size (default: the model's, 512 for SD1.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/sd15_deepcache.png", help="PNG path (default out/sd15_deepcache.png)")
    args = parser.parse_args(argv)
    if args.tiny == (args.src is not None):
        parser.error("give SRC or --tiny (not both)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)  # before any work, so a bad --out fails at once

    if args.tiny:
        pipe = tiny_pipeline(sd15.load_tokenizer(args.tokenizer, args.bpe))  # None: the byte tokenizer
    else:
        pipe = load(args)
    size = args.size or pipe.default_size
    print(f"{args.steps}-step PLMS, guidance 7.5, {size}x{size}, prompt {args.prompt!r}")

    images, reference = {}, None
    for interval in INTERVALS:
        start = time.perf_counter()
        image = pipe.generate(prompt=args.prompt, guidance_scale=7.5, sampler="plms", steps=args.steps,
                              height=size, width=size, seed=args.seed, cache_interval=interval, cache_branch=0,
                              progress=False)[0]
        seconds = time.perf_counter() - start
        run = pipe.last_run
        if reference is None:
            reference, base = image, seconds
        difference = (image - reference).abs().mean().item()
        print(f"N={interval}: {seconds:6.1f} s ({base / seconds:.2f}x)  {run.full_calls} full + "
              f"{run.shallow_calls} shallow U-Net calls  mean |difference| from N=1: {difference:.4f}")
        images[f"N={interval} {seconds:.1f}s"] = image
    side_by_side(images, out)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
