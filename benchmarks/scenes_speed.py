"""Sampling speed of the scenes model's architecture: 8 images, DDIM 50, on CPU threads.

    python benchmarks/scenes_speed.py [--model weights/scenes] [--threads 1 2]

Without weights/scenes it times the same architecture with random weights (the text2image stage's
default config and a fresh autoencoder of the autoencoder stage's shape): speed does not depend on
what the weights hold. Prints seconds per run, uncached and DeepCache N=3, without guidance and with
the model's default guidance (3 where it names none).
"""
import argparse
import time
from pathlib import Path

import torch

from minidiff import load
from minidiff.autoencoder import Autoencoder
from minidiff.convert.sd15 import sd_scheduler
from minidiff.latent_trainer import LatentTrainConfig, TextToImage, autoencoder_config, ema_pipeline, text_config, \
    unet_config
from minidiff.text import CLIPTextEncoder, CLIPTokenizer
from minidiff.unet import UNet

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "weights" / "scenes"))
parser.add_argument("--threads", type=int, nargs="+", default=[1])
parser.add_argument("--repeats", type=int, default=2)
args = parser.parse_args()

if (Path(args.model) / "config.json").exists():
    pipe, source = load(args.model), args.model
else:
    cfg = LatentTrainConfig(stage="text2image", autoencoder="-", model_channels=32, ae_channels=32, ae_mult=(1, 2, 2))
    tokenizer = CLIPTokenizer.default()
    nets = TextToImage(UNet(unet_config(cfg, 16)), CLIPTextEncoder(text_config(cfg, len(tokenizer.vocab))))
    pipe = ema_pipeline(nets.eval(), Autoencoder(autoencoder_config(cfg)).eval(), tokenizer, sd_scheduler())
    pipe.to(pack=True)
    source = "random weights, the shipped architecture"
prompts = ["a red circle on the left", "a big blue square", "a yellow triangle at the top", "a green circle",
           "a red square above a blue triangle", "a small yellow circle on the right", "a blue square at the bottom",
           "a green square left of a red circle"]
print(f"model: {source}; 8 images, DDIM 50")
for threads in args.threads:
    torch.set_num_threads(threads)
    for guidance in (1.0, pipe.default_guidance or 3.0):
        for interval in (1, 3):
            pipe.generate(prompt=prompts, steps=2, guidance_scale=guidance, progress=False)  # warm-up
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                pipe.generate(prompt=prompts, steps=50, guidance_scale=guidance, cache_interval=interval, seed=0,
                              progress=False)
                times.append(time.perf_counter() - start)
            print(f"threads {threads}  guidance {'off' if guidance == 1 else guidance:>4}  cache N={interval}: {min(times):.2f} s "
                  f"(best of {args.repeats})", flush=True)
