"""How faithful is the scenes autoencoder, and how well does the shipped classifier read real scenes?

    python benchmarks/scenes_autoencoder.py [--autoencoder weights/scenes | runs/scenes-ae3] \
        [--classifier weights/scenes-classifier] [--count 256]

Fresh scenes (a seed no training step draws, held-out pairs included): the PSNR of mean-latent
reconstructions, and the share of each attribute the classifier reads correctly on the real scenes
and on their reconstructions (the reconstruction's reading caps what a sample can score).
"""
import argparse
from pathlib import Path

import torch

from minidiff.latent_trainer import load_autoencoder, reconstruction_psnr
from minidiff.scenes import scene_attributes, scene_batch
from minidiff.scenes_metric import load_scene_metric

ROOT = Path(__file__).resolve().parents[1]
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--autoencoder", default=str(ROOT / "weights" / "scenes"),
                    help="an autoencoder run or model folder, or a text-to-image model folder (its vae/)")
parser.add_argument("--classifier", default=str(ROOT / "weights" / "scenes-classifier"))
parser.add_argument("--count", type=int, default=256)
parser.add_argument("--seed", type=int, default=999)
parser.add_argument("--threads", type=int, default=1)
args = parser.parse_args()
torch.set_num_threads(args.threads)

source = Path(args.autoencoder)
if (source / "model_index.json").exists() or (source / "unet").is_dir():
    from minidiff import load

    autoencoder = load(source).autoencoder
else:
    autoencoder = load_autoencoder(source)
autoencoder = autoencoder.float().eval()
metric = load_scene_metric(args.classifier)
images, scenes = scene_batch(args.seed, 0, args.count, holdout=False)
prompts = [s.caption for s in scenes]
with torch.inference_mode():
    x = images.float() / 127.5 - 1
    recon = torch.cat([autoencoder(x[i: i + 64]) for i in range(0, len(x), 64)]).clamp(-1, 1)
print(f"reconstruction PSNR on {args.count} fresh scenes: {reconstruction_psnr(autoencoder, args.count, args.seed):.2f} dB")
print(f"{'images':32} {'n':>4} {'colour':>6} {'shape':>6} {'place':>6} {'relat.':>6} {'all':>6}")
singles = torch.tensor([s.relation is None for s in scenes])
for name, pictures in (("real scenes", images.float() / 255), ("reconstructions", (recon + 1) / 2)):
    follows = metric.follows(pictures, prompts)
    for kind, rows in (("single objects", singles), ("pairs", ~singles)):
        share = {k: f"{v[rows].float().mean():6.3f}" for k, v in follows.items()}
        place, relation = (share["place"], "     -") if kind == "single objects" else ("     -", share["relation"])
        print(f"{name + ', ' + kind:32} {int(rows.sum()):4d} {share['colour']} {share['shape']} {place} {relation} "
              f"{share['all']}")
