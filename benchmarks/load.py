"""Loading a full-size Stable Diffusion 1.5 model: minidiff.load vs diffusers' from_pretrained.

    python benchmarks/load.py [--work DIR] [--repeats 3] [--latent 32] [--batch 2] [--threads 2]

Builds once (cached under --work, default a folder in the system temp dir) a facsimile of SD1.5
with random weights in every key and shape: a diffusers folder (UNet2DConditionModel, AutoencoderKL
and CLIPTextModel built from the public configs, saved with save_pretrained as safetensors) and the
same weights converted to minidiff's native folder. Then, in fresh subprocesses, alternating which
goes first, each side loads U-Net, autoencoder, text encoder, tokenizer and noise schedule (what
`minidiff.load` reads; no safety checker) and runs one U-Net forward. Printed:
load + first forward time (after imports), the child's whole wall time, and its peak RSS
(ru_maxrss), with minidiff / diffusers ratios. Goal: time <= 1, peak RSS <= 1.1.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SD15 = REPO.parent / "shared" / "reference-configs" / "runwayml--stable-diffusion-v1-5"


def _configs_folder() -> Path:
    for candidate in (SD15, REPO / "tests" / "data" / "reference-configs" / "runwayml--stable-diffusion-v1-5"):
        if (candidate / "unet" / "config.json").is_file():
            return candidate
    sys.exit(f"SD1.5 reference configs not found (looked in {SD15}); they give the facsimile's shapes")


def build_diffusers(dst: Path):
    """Random-weight SD1.5 components from the public configs, saved as diffusers would ship them."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = _configs_folder()
    torch.manual_seed(0)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for folder in ("tokenizer", "scheduler"):
        shutil.copytree(configs / folder, tmp / folder)
    shutil.copy(configs / "model_index.json", tmp / "model_index.json")
    for name, build in (("unet", lambda c: UNet2DConditionModel.from_config(c)),
                        ("vae", lambda c: AutoencoderKL.from_config(c))):
        model = build(json.loads((configs / name / "config.json").read_text()))
        model.save_pretrained(tmp / name, safe_serialization=True)
        del model
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))
    text.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    tmp.rename(dst)


def build_minidiff(src: Path, dst: Path):
    from minidiff.convert import sd15

    sd15.convert(src, dst)


def child(side: str, work: Path, latent: int, batch: int, threads: int):
    """One cold load + first U-Net forward; prints a JSON line."""
    start = time.perf_counter()
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g)
    context = torch.randn(batch, 77, 768, generator=g)
    t = torch.full((batch,), 981)
    if side.startswith("minidiff"):
        import minidiff

        imported = time.perf_counter()
        # "minidiff-unchecked" skips the NaN/Inf check each layer makes before it first runs: its cost
        pipe = minidiff.load(work / "minidiff", allow_nan=side == "minidiff-unchecked")
        loaded = time.perf_counter()
        with torch.inference_mode():
            out = pipe.denoiser(x, t, context)
    else:
        from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        imported = time.perf_counter()
        folder = work / "diffusers"  # the components minidiff.load reads too
        unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        AutoencoderKL.from_pretrained(folder / "vae")
        CLIPTextModel.from_pretrained(folder / "text_encoder")
        CLIPTokenizer.from_pretrained(folder / "tokenizer")
        PNDMScheduler.from_pretrained(folder / "scheduler")
        loaded = time.perf_counter()
        with torch.inference_mode():
            out = unet(x, t, encoder_hidden_states=context).sample
    done = time.perf_counter()
    assert torch.isfinite(out).all()
    print(json.dumps({"side": side, "import_s": imported - start, "load_s": loaded - imported,
                      "forward_s": done - loaded, "load_forward_s": done - imported,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_child(side: str, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))
    command = [sys.executable, __file__, "--child", side, "--work", str(args.work), "--latent", str(args.latent),
               "--batch", str(args.batch), "--threads", str(args.threads)]
    start = time.perf_counter()
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "minidiff-load-benchmark")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latent", type=int, default=32, help="latent side of the first forward (32 = 256 px)")
    parser.add_argument("--batch", type=int, default=2, help="batch of the first forward (2 = with guidance)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--unchecked", action="store_true",
                        help="also time minidiff.load(allow_nan=True), which skips the NaN/Inf check of the weights")
    parser.add_argument("--child", choices=["minidiff", "minidiff-unchecked", "diffusers"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.work, args.latent, args.batch, args.threads)

    args.work.mkdir(parents=True, exist_ok=True)
    python = [sys.executable, "-c"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if not (args.work / "diffusers").is_dir():
        print("building the random-weight SD1.5 diffusers folder (once) ...", flush=True)
        subprocess.run(python + ["from benchmarks.load import "
                                 f"build_diffusers; from pathlib import Path; build_diffusers(Path({str(args.work / 'diffusers')!r}))"],
                       env=env, check=True)
    if not (args.work / "minidiff").is_dir():
        print("converting it to minidiff's native folder (once) ...", flush=True)
        subprocess.run(python + ["from benchmarks.load import "
                                 f"build_minidiff; from pathlib import Path; build_minidiff(Path({str(args.work / 'diffusers')!r}), "
                                 f"Path({str(args.work / 'minidiff')!r}))"], env=env, check=True)
    sizes = {side: sum(f.stat().st_size for f in (args.work / side).rglob("*.safetensors"))
             for side in ("minidiff", "diffusers")}
    print(f"weights: minidiff {sizes['minidiff'] / 2**30:.2f} GiB, diffusers {sizes['diffusers'] / 2**30:.2f} GiB; "
          f"first forward: batch {args.batch}, {args.latent}x{args.latent} latents; {args.threads} threads")

    sides = ["minidiff", "diffusers"] + (["minidiff-unchecked"] if args.unchecked else [])
    results = {side: [] for side in sides}
    for repeat in range(args.repeats):
        order = sides[repeat % len(sides):] + sides[:repeat % len(sides)]  # each side goes first in turn
        if repeat % 2:
            order.reverse()
        for side in order:
            r = run_child(side, args)
            results[side].append(r)
            print(f"  run {repeat + 1} {side:18s}: load {r['load_s']:6.2f} s + forward {r['forward_s']:6.2f} s = "
                  f"{r['load_forward_s']:6.2f} s (imports {r['import_s']:.2f} s, process {r['process_s']:.2f} s), "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)

    print(f"\nmedians of {args.repeats} (ratio = minidiff / diffusers)")
    ours = [side for side in sides if side != "diffusers"]
    print("| measure | " + " | ".join(sides) + " | " + " | ".join(f"ratio {side}" for side in ours) + " |")
    print("|---" * (len(sides) + len(ours) + 1) + "|")
    for key, unit in (("load_s", "s"), ("forward_s", "s"), ("load_forward_s", "s"), ("import_s", "s"),
                      ("process_s", "s"), ("peak_rss_mib", "MiB")):
        median = {side: statistics.median(r[key] for r in results[side]) for side in sides}
        print(f"| {key} | " + " | ".join(f"{median[side]:.2f} {unit}" for side in sides) + " | "
              + " | ".join(f"{median[side] / median['diffusers']:.2f}" for side in ours) + " |")


if __name__ == "__main__":
    main()
