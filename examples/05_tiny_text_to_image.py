"""Stable Diffusion in miniature, one stage at a time: prompt -> tokens -> text features ->
cross-attention -> latents -> decoded image, on the scenes model trained here (weights/scenes).

    python examples/05_tiny_text_to_image.py [--prompt "a red circle on the left"] [--out out/05]

It prints each stage and saves, under --out:
    steps.png      the latents decoded at several steps: the noisy latent, and the clean one the U-Net guesses
    attention.png  where the 16 x 16 latent looks at each word of the prompt (cross-attention, mid-sampling)
    cached.png     the same prompt uncached and with DeepCache at interval 3, side by side
"""
import argparse
import time
from pathlib import Path

import torch

import minidiff
from minidiff.data import save_grid
from minidiff.schedules import NoiseSchedule
from minidiff.unet import CrossAttention

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "weights" / "scenes"))
parser.add_argument("--prompt", default="a red circle on the left")
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--guidance", type=float, default=3.0)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="out/05")
args = parser.parse_args()
torch.set_num_threads(1)  # a small model on a CPU: one thread is fastest, and polite on a shared machine
out = Path(args.out)
if not Path(args.model).is_dir():
    parser.exit(1, f"{args.model} does not exist: the scenes model is not shipped yet. Train one with the two "
                   "commands in weights/README.md (section scenes) and pass --model RUN/checkpoint/model\n")
pipe = minidiff.load(args.model, pack=False)

# 1. Tokens: CLIP's byte-level BPE, padded with the end token to the encoder's 77 positions.
words = {i: w for w, i in pipe.tokenizer.vocab.items()}
ids = pipe.tokenizer([args.prompt])[0]
length = len(pipe.tokenizer.encode(args.prompt)) + 2
print(f"1. tokens ({length} of {len(ids)}):", " ".join(words[int(i)].replace("</w>", "_") for i in ids[:length]))

# 2. Text features: one vector per token; causal attention lets each see the words before it.
with torch.inference_mode():
    features = pipe.text_encoder(ids[None])
    empty = pipe.text_encoder(pipe.tokenizer([""]))
print(f"2. text features {tuple(features.shape)}: token norms",
      " ".join(f"{float(v):.1f}" for v in features[0, :length].norm(dim=-1)),
      f"| distance from the empty prompt {float((features - empty).norm()):.1f}")

# 3. Cross-attention: each latent pixel's query against every token's key. A hook records the
#    attention weights of the deepest-but-one cross-attention layer half-way through sampling.
layers = [m for m in pipe.denoiser.modules() if isinstance(m, CrossAttention) and m.kv_index is not None]
layer = layers[len(layers) // 2]
recorded = {}


def record(module, inputs, output):
    x, context = inputs[0], inputs[1]
    k = context.keys_values[module.kv_index][0] if hasattr(context, "keys_values") else module.to_k(context)
    q = module.to_q(x)
    heads, d = module.heads, q.shape[-1] // module.heads
    q, k = (z.unflatten(-1, (heads, d)).transpose(1, 2) for z in (q, k))
    recorded["weights"] = ((q @ k.transpose(-1, -2)) / d ** 0.5).softmax(-1).mean(1)  # (B, pixels, tokens)


# 4. Latents: sample, keeping the latent at several steps and decoding each.
kept, shown_steps = {}, {0, args.steps // 5, args.steps // 2, 4 * args.steps // 5, args.steps - 1}
alphas = NoiseSchedule.from_config(pipe.scheduler).alphas_cumprod


def keep(i, t, x):
    if i in shown_steps:
        kept[i] = (int(t), x.clone())
    if i == args.steps // 2:
        recorded["at"] = int(t)


handle = layer.register_forward_hook(lambda m, i, o: record(m, i, o) if "at" not in recorded else None)
start = time.perf_counter()
image = pipe.generate(prompt=args.prompt, steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                      callback=keep, progress=False)
seconds = time.perf_counter() - start
handle.remove()
print(f"3. cross-attention: {len(layers)} layers attend from latent pixels to the {len(ids)} tokens")
print(f"4. {args.steps} DDIM steps in {seconds:.2f}s; latents {tuple(pipe.initial_noise(1).shape)} decoded to "
      f"{tuple(image.shape)}")

# Top row: the noisy latent x_t after each kept step, decoded. Bottom row: the clean latent the U-Net
# guesses from it, x_0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t): the picture is settled long before the noise is gone.
stride = pipe.scheduler.num_train_timesteps // args.steps
noisy, guessed = [], []
with torch.inference_mode():
    for i, (t, x) in sorted(kept.items()):
        now = t - stride  # the timestep the updated sample sits at
        noisy.append(pipe.decode(x))
        if now < 0:
            guessed.append(pipe.decode(x))
            continue
        eps = pipe.denoiser(x, torch.tensor([now]), features)
        a = alphas[now]
        guessed.append(pipe.decode((x - (1 - a).sqrt() * eps) / a.sqrt()))
save_grid(torch.cat(noisy + guessed), out / "steps.png", nrow=len(noisy), scale=3,
          captions=[f"x_t, step {i + 1}" for i in sorted(kept)] + [f"x_0 guess, step {i + 1}" for i in sorted(kept)])

# Attention maps: the conditional half of the guided batch, one map per word.
weights = recorded["weights"]
side = int(weights.shape[1] ** 0.5)
maps = weights[-1, :, 1:length - 1].T.reshape(-1, 1, side, side)  # the prompt's words, no start/end token
maps = maps / maps.flatten(1).max(1).values[:, None, None, None]
word_list = [words[int(i)].replace("</w>", "") for i in ids[1:length - 1]]
save_grid(torch.nn.functional.interpolate(maps, size=64, mode="nearest").expand(-1, 3, -1, -1),
          out / "attention.png", nrow=len(word_list), scale=2, captions=word_list)

# 5. What a cached step skips: at interval 3, two steps in three run only the U-Net's skip branch
#    (its first input block and last output block), reusing the deep features of the last full step.
cached = pipe.generate(prompt=args.prompt, steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                       cache_interval=3, progress=False)
run = pipe.last_run
print(f"5. cached (interval 3): {run.full_calls} full and {run.shallow_calls} shallow U-Net calls; a shallow call "
      f"costs {run.shallow_ratio:.2f} of a full one, so the run spends {run.mac_fraction:.2f} of the MACs; "
      f"max pixel difference from uncached {float((cached - image).abs().max()):.3f}")
save_grid(torch.cat([image, cached]), out / "cached.png", nrow=2, scale=4, captions=["uncached", "cached, N=3"])
print(f"saved {out / 'steps.png'}, {out / 'attention.png'} and {out / 'cached.png'}")
