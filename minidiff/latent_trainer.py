"""Train Stable Diffusion's three parts on the procedural `scenes`, in two stages:

    "autoencoder": the KL first stage (64 px <-> 16 x 16 x 4), L1 + L2 + an edge term + a small KL;
                   its scale factor (SD's convention: 1 / std of the latents) is measured at every save;
    "text2image":  a CLIP-style text encoder and a cross-attention U-Net, trained jointly on the frozen
                   autoencoder's latents, the prompt dropped to "" with probability label_dropout
                   (the empty prompt is guidance's unconditional one).

    minidiff train --stage autoencoder --out-dir runs/scenes-ae --threads 1
    minidiff train --stage text2image --autoencoder runs/scenes-ae --out-dir runs/scenes-t2i
    minidiff train --resume runs/scenes-t2i --steps 12000
    minidiff train --stage text2image --init-from weights/scenes --seed 1 ...  # go on from shipped weights

Batch k, with its noise, timesteps, posterior samples and prompt dropout, is a pure function of
(seed, k) (`scenes.scene_batch`), and the models have no dropout, so a run's whole state is its
weights, EMA, optimizer and step: k steps + resume + k steps equals 2k steps exactly. The run folder
works as the pixel trainer's (minidiff.trainer): checkpoint/ replaced in one rename, loss.csv,
loss.png, samples/, SIGINT/SIGTERM save and stop. A run folder does not outlive its machine, but the
shipped weights do: `--init-from` starts a new run from them (a fresh optimizer and, with another
--seed, fresh batches), so training can go on across sessions.
"""
from __future__ import annotations

import copy
import functools
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .autoencoder import Autoencoder, AutoencoderConfig, DiagonalGaussian
from .checkpoint import CheckpointError, load_weights, read_state_dict
from .writing import TRAINING_KIND, atomic_folder, save_json, save_safetensors
from .config import config_from_dict, config_to_dict
from .convert.sd15 import sd_scheduler
from .data import save_grid
from .metrics import psnr
from .pipeline import Pipeline
from .plots import plot_loss
from .scenes import MAX_BACKGROUND_SATURATION, scene_batch
from .schedules import NoiseSchedule
from .text import CLIPTextConfig, CLIPTextEncoder, CLIPTokenizer
from .trainer import TrainingInterrupted, _StopRequest, _claim_run_folder, _loss_csv, _resume_folder, \
    _update_ema, check_same_config, checkpoint_dir, optimizer_tensors, read_losses, restore_optimizer
from .unet import UNet, UNetConfig

STAGES = ("autoencoder", "text2image")
OBJECT_SATURATION = 4 * MAX_BACKGROUND_SATURATION  # max - min of RGB in [0, 1] above which a pixel is an object's
AE_FORMAT = "minidiff-autoencoder"
SAMPLE_PROMPTS = ("a red circle", "a green square on the left", "a blue triangle at the top",
                  "a yellow circle on the right", "a big red square at the bottom", "a small yellow triangle",
                  "a red circle left of a blue square", "a yellow square above a green circle")


@dataclass
class LatentTrainConfig:
    stage: str = "autoencoder"       # "autoencoder" or "text2image"
    dataset: str = "scenes"
    seed: int = 0
    batch_size: int = 32
    lr: float = 4e-4
    weight_decay: float = 0.0
    warmup_steps: int = 200
    steps: int = 3000
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    # autoencoder
    ae_channels: int = 32
    ae_mult: tuple = (1, 2, 2)       # 3 levels: downsampling factor 4
    ae_res_blocks: int = 1
    ae_norm_groups: int = 8
    kl_weight: float = 1e-5          # per latent element, against per-pixel reconstruction terms
    edge_weight: float = 0.5         # L1 between the images' finite differences: sharper edges
    ae_crop: int = 0                 # > 0: train on random crops this size (the network is convolutional)
    object_weight: float = 0.0       # extra reconstruction weight on object pixels (saturated: no background is),
    #                                  so the few object pixels are not drowned by the background's many
    # text2image
    autoencoder: str = ""            # the autoencoder run folder (or its model folder)
    model_channels: int = 48
    channel_mult: tuple = (1, 2, 2)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)
    head_channels: int = 32
    norm_groups: int = 16
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    label_dropout: float = 0.1       # prompt -> "" with this probability
    init_from: str = ""              # a text-to-image model folder (e.g. weights/scenes) whose U-Net and text
    #                                  encoder start this run, model and EMA (a fresh optimizer: not a resume)
    train_token_embedding: bool = False  # False: the 49,408 x width token table stays at its random init
    #                                      (distinct random vectors name tokens as well; no 6 M-parameter update per step)
    # output
    out_dir: str = "runs/scenes"
    log_every: int = 25
    sample_every: int = 500
    ckpt_every: int = 100
    sample_steps: int = 25
    progress: bool = True

    def __post_init__(self):
        for name in ("ae_mult", "channel_mult", "attention_levels"):
            setattr(self, name, tuple(getattr(self, name)))
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.dataset != "scenes":
            raise ValueError(f"the latent stages train on the procedural 'scenes' only, got dataset {self.dataset!r}")
        if self.init_from and self.stage != "text2image":
            raise ValueError("--init-from starts a text2image run from a trained model; it does not apply to "
                             f"stage {self.stage!r}")
        if self.init_from and not self.autoencoder:
            self.autoencoder = self.init_from  # the U-Net was trained on that model's latents
        if self.stage == "text2image" and not self.autoencoder:
            raise ValueError("stage text2image needs the trained autoencoder: pass --autoencoder RUN_DIR")
        for name in ("batch_size", "steps", "log_every", "ckpt_every", "sample_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LatentTrainConfig: {name} must be a positive int, got {value!r}")
        if not 0.0 <= self.label_dropout < 1.0 or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("label_dropout and ema_decay must lie in [0, 1)")

    def to_dict(self) -> dict:
        return config_to_dict(self)


# -- models -------------------------------------------------------------------------------------------

def autoencoder_config(cfg: LatentTrainConfig) -> AutoencoderConfig:
    return AutoencoderConfig(base_channels=cfg.ae_channels, channel_mult=cfg.ae_mult, num_res_blocks=cfg.ae_res_blocks,
                             z_channels=4, embed_dim=4, resolution=64, norm_groups=cfg.ae_norm_groups,
                             scale_factor=1.0)


def text_config(cfg: LatentTrainConfig, vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
                          num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads)


def unet_config(cfg: LatentTrainConfig, latent_size: int) -> UNetConfig:
    """SD1.x's U-Net layout (spatial transformers with cross-attention, SD's conventions), narrowed."""
    return UNetConfig(in_channels=4, out_channels=4, model_channels=cfg.model_channels, channel_mult=cfg.channel_mult,
                      num_res_blocks=cfg.num_res_blocks, attention_levels=cfg.attention_levels, mid_attention=True,
                      attention_type="transformer", head_channels=cfg.head_channels, context_dim=cfg.text_width,
                      norm_groups=cfg.norm_groups, norm_eps=1e-5, downsample_padding=1, flip_sin_to_cos=True,
                      freq_shift=0, sample_size=latent_size)


def save_autoencoder(autoencoder: Autoencoder, folder: Path, meta: dict):
    save_json({"format": AE_FORMAT, "autoencoder": autoencoder.config.to_dict(), **meta}, folder / "config.json")
    save_safetensors(autoencoder.state_dict(), folder / "model.safetensors")


def load_autoencoder(path) -> Autoencoder:
    """The autoencoder of a run folder (its checkpoint/model/), of an autoencoder folder or of a pipeline folder."""
    path = Path(path)
    for folder in (path, path / "model", path / "checkpoint" / "model"):
        if (folder / "config.json").exists():
            config = json.loads((folder / "config.json").read_text())
            if config.get("format") == AE_FORMAT:
                weights = read_state_dict(folder / "model.safetensors")
            elif isinstance(config.get("autoencoder"), dict):  # a pipeline folder: its autoencoder.* weights
                weights = {k[len("autoencoder."):]: v for k, v in read_state_dict(folder / "model.safetensors").items()
                           if k.startswith("autoencoder.")}
            else:
                continue
            model = Autoencoder(AutoencoderConfig.from_dict(config["autoencoder"]))
            load_weights(model, weights, "autoencoder")
            return model.eval().requires_grad_(False)
    raise CheckpointError(f"{path} holds no trained autoencoder (looked for config.json with format {AE_FORMAT!r} "
                          "in it, model/ and checkpoint/model/); train one with --stage autoencoder")


class TextToImage(nn.Module):
    """The two networks trained together: the text encoder feeds the U-Net's cross-attention."""

    def __init__(self, unet: UNet, text_encoder: CLIPTextEncoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, xt, t, ids):
        return self.unet(xt, t, self.text_encoder(ids))


def _start_from(model: TextToImage, folder):
    """Copy a saved text-to-image model's U-Net and text encoder into `model` (their shapes must match
    the run's flags), so training can go on in a session that has only the shipped weights."""
    from .pipeline import load

    pipe = load(folder, pack=False)
    if pipe.text_encoder is None or pipe.autoencoder is None:
        raise ValueError(f"--init-from {folder}: not a text-to-image model (it has no text encoder or autoencoder)")
    for name, part, saved in (("U-Net", model.unet, pipe.denoiser), ("text encoder", model.text_encoder,
                                                                      pipe.text_encoder)):
        state = {k: v.float() for k, v in saved.state_dict().items()}
        mine = part.state_dict()
        wrong = sorted(set(mine) ^ set(state)) or [k for k in mine if mine[k].shape != state[k].shape]
        if wrong:
            raise ValueError(f"--init-from {folder}: its {name} does not match this run's flags (first difference: "
                             f"{wrong[0]}); pass the flags it was trained with (its config.json's training.config)")
        part.load_state_dict(state)


# -- one step of each stage ----------------------------------------------------------------------------

def _step_generator(cfg: LatentTrainConfig, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + (1 << 40))


def autoencoder_loss(cfg: LatentTrainConfig, model: Autoencoder, images: torch.Tensor, g: torch.Generator):
    """Reconstruction (L1 + L2 + edges) plus kl_weight * KL to N(0, 1), per element."""
    posterior = DiagonalGaussian(model.quant_conv(model.encoder(images)))
    recon = model.decoder(model.post_quant_conv(posterior.sample(g)))
    diff = recon - images
    weight = 1.0
    if cfg.object_weight:
        saturation = images.amax(dim=1, keepdim=True) - images.amin(dim=1, keepdim=True)  # in [-1, 1] units
        weight = 1.0 + cfg.object_weight * (saturation > 2 * OBJECT_SATURATION).float()
    loss = (weight * (diff.abs() + diff.square())).mean()
    if cfg.edge_weight:
        for dim in (2, 3):
            loss = loss + cfg.edge_weight * (recon.diff(dim=dim) - images.diff(dim=dim)).abs().mean()
    kl = 0.5 * (posterior.mean.square() + posterior.std.square() - 1 - posterior.logvar).mean()
    return loss + cfg.kl_weight * kl


def random_crops(images: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """A `size` x `size` crop of each image at a position drawn from `g` (size 0: the images whole).
    Crops start on even pixels, so the autoencoder's downsampling grid stays aligned with the full picture's."""
    if not size or size >= images.shape[-1]:
        return images
    corners = torch.randint(0, (images.shape[-1] - size) // 2 + 1, (len(images), 2), generator=g) * 2
    return torch.stack([im[:, y: y + size, x: x + size] for im, (y, x) in zip(images, corners.tolist())])


class _Batches:
    """Batch `step` of the scenes stream, as the stage trains on it."""

    def __init__(self, cfg: LatentTrainConfig, autoencoder=None, tokenizer=None, alphas_cumprod=None):
        self.cfg, self.autoencoder, self.tokenizer, self.alphas_cumprod = cfg, autoencoder, tokenizer, alphas_cumprod
        self.ids: dict = {}

    def images(self, step: int) -> tuple:
        images, scenes = scene_batch(self.cfg.seed, step, self.cfg.batch_size)
        return images.float() / 127.5 - 1.0, scenes

    def token_ids(self, captions) -> torch.Tensor:
        missing = [c for c in set(captions) if c not in self.ids]
        if missing:
            self.ids.update(zip(missing, self.tokenizer(missing)))
        return torch.stack([self.ids[c] for c in captions])

    @torch.no_grad()
    def text2image(self, step: int) -> tuple:
        """(x_t, t, token ids, noise) of step `step`."""
        images, scenes = self.images(step)
        g = _step_generator(self.cfg, step)
        latents = self.autoencoder.encode(images, sample=True, generator=g)
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, len(self.alphas_cumprod), (len(images),), generator=g)
        drop = torch.rand(len(images), generator=g) < self.cfg.label_dropout
        captions = ["" if d else s.caption for d, s in zip(drop.tolist(), scenes)]
        a = self.alphas_cumprod[t][:, None, None, None]
        return a.sqrt() * latents + (1 - a).sqrt() * noise, t, self.token_ids(captions), noise


# -- the loop ------------------------------------------------------------------------------------------

def train_latent(config: LatentTrainConfig, resume=None, *, overwrite: bool = False) -> dict:
    """Train (or continue the run in folder `resume`); returns {"model", "ema", "step", "losses"}."""
    cfg = config
    if resume is not None:
        if overwrite:
            raise ValueError("resume continues a run and overwrite starts a new one; pass one of them")
        cfg = replace(cfg, out_dir=str(_resume_folder(resume, cfg)))
    out_dir = Path(cfg.out_dir)
    if resume is None:
        _claim_run_folder(out_dir, overwrite, clear=True)
    print(f"writing to {out_dir}" + (" (resuming the run there)" if resume is not None else " (a new run)"),
          flush=True)
    torch.manual_seed(cfg.seed)
    scheduler = sd_scheduler()
    if cfg.stage == "autoencoder":
        model, batches, tokenizer, frozen = Autoencoder(autoencoder_config(cfg)), _Batches(cfg), None, None
    else:
        # a resumed run keeps the autoencoder it started with (saved in its checkpoint), whatever the
        # autoencoder's own run folder holds now
        frozen = load_autoencoder(cfg.autoencoder if resume is None else checkpoint_dir(resume) / "model")
        tokenizer = CLIPTokenizer.default()
        latent = 64 // frozen.downsample_factor
        model = TextToImage(UNet(unet_config(cfg, latent)), CLIPTextEncoder(text_config(cfg, len(tokenizer.vocab))))
        batches = _Batches(cfg, frozen, tokenizer, NoiseSchedule.from_config(scheduler).alphas_cumprod)
        model.text_encoder.embeddings.token_embedding.weight.requires_grad_(cfg.train_token_embedding)
        if cfg.init_from and resume is None:
            _start_from(model, cfg.init_from)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, seconds, losses, loss_sum = 0, 0.0, [], [0.0, 0]
    if resume is not None:
        step, seconds, losses, loss_sum = _restore(resume, cfg, model, ema, optimizer)
    result = {"model": model, "ema": ema, "step": step, "losses": losses, "autoencoder": frozen, "tokenizer": tokenizer}
    if step >= cfg.steps:
        return result
    n_params = sum(p.numel() for p in trained)
    print(f"training the {cfg.stage} stage: {n_params / 1e6:.2f}M trained parameters on procedural scenes, "
          f"step {step} -> {cfg.steps}", flush=True)
    stop = _StopRequest()
    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress, dynamic_ncols=True)
    clock = rate_clock = time.perf_counter()
    rate_step = step
    model.train()
    stop.install()
    try:
        while step < cfg.steps:
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
            if cfg.stage == "autoencoder":
                g = _step_generator(cfg, step)
                loss = autoencoder_loss(cfg, model, random_crops(batches.images(step)[0], cfg.ae_crop, g), g)
            else:
                xt, t, ids, noise = batches.text2image(step)
                loss = F.mse_loss(model(xt, t, ids), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
            optimizer.step()
            _update_ema(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
            step += 1
            loss_sum[0] += loss.item()
            loss_sum[1] += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                rate = (step - rate_step) * cfg.batch_size / (now - rate_clock)
                seconds, clock = seconds + now - clock, now
                rate_clock, rate_step = now, step
                losses.append((step, loss_sum[0] / loss_sum[1], rate, seconds))
                loss_sum = [0.0, 0]
                bar.set_postfix(loss=f"{losses[-1][1]:.4f}", img_s=f"{rate:.1f}")
            bar.update(1)
            if cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps):
                _samples(cfg, ema, frozen, tokenizer, scheduler, out_dir / "samples" / f"step_{step:06d}.png")
                plot_loss(losses, out_dir / "loss.png", missing_ok=True)
                model.train()
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stop.requested(1, None):
                now = time.perf_counter()
                seconds, clock = seconds + now - clock, now
                _write_checkpoint(out_dir, cfg, model, ema, frozen, tokenizer, scheduler, optimizer, step, seconds,
                                  losses, loss_sum)
            if stop.requested(1, None):
                bar.close()
                message = (f"stopped at step {step} of {cfg.steps}; the checkpoint in {out_dir / 'checkpoint'} "
                           f"holds it. Continue with: minidiff train --resume {out_dir}")
                print(message, flush=True)
                raise TrainingInterrupted(message, stop.signum)
        bar.close()
        result.update(step=step, losses=losses)
        return result
    finally:
        stop.restore()


def ema_pipeline(ema: TextToImage, autoencoder: Autoencoder, tokenizer, scheduler, meta=None) -> Pipeline:
    """The EMA networks as a Stable Diffusion pipeline (never packed: the EMA changes in place)."""
    return Pipeline(ema.unet, scheduler, autoencoder=autoencoder, text_encoder=ema.text_encoder, tokenizer=tokenizer,
                    meta={"family": "sd1", "layout": "scenes", **(meta or {})}, pack=False)


@functools.lru_cache(maxsize=4)
def _fresh_scenes(seed: int, count: int, holdout: bool) -> torch.Tensor:
    """Scenes no training step draws (another seed), drawn once per process: every save measures on them."""
    return scene_batch(seed, 0, count, holdout=holdout)[0]


@torch.no_grad()
def measure_scale_factor(autoencoder: Autoencoder, count: int = 128, seed: int = 12345) -> float:
    """SD's convention: 1 / std of the (unscaled) posterior samples on fresh scenes."""
    images = _fresh_scenes(seed, count, True)
    moments = autoencoder.quant_conv(autoencoder.encoder(images.float() / 127.5 - 1.0))
    z = DiagonalGaussian(moments).sample(torch.Generator().manual_seed(seed))
    return float(1.0 / z.std())


@torch.no_grad()
def reconstruction_psnr(autoencoder: Autoencoder, count: int = 256, seed: int = 999) -> float:
    """PSNR (dB, images in [0, 1]) of mean-latent reconstructions of fresh scenes, held-out pairs included."""
    x = _fresh_scenes(seed, count, False).float() / 127.5 - 1.0
    recon = torch.cat([autoencoder(x[i: i + 64]) for i in range(0, count, 64)])
    return psnr((recon.clamp(-1, 1) + 1) / 2, (x + 1) / 2)


@torch.no_grad()
def _samples(cfg, ema, autoencoder, tokenizer, scheduler, path: Path):
    if cfg.stage == "autoencoder":
        images, _ = scene_batch(4321, 0, 8, holdout=False)
        x = images.float() / 127.5 - 1.0
        recon = ema(x).clamp(-1, 1)
        save_grid((torch.cat([x, recon]) + 1) / 2, path, nrow=8, scale=2)
        return
    pipe = ema_pipeline(ema, autoencoder, tokenizer, scheduler)
    images = pipe.generate(prompt=list(SAMPLE_PROMPTS), batch_size=len(SAMPLE_PROMPTS), steps=cfg.sample_steps,
                           seed=1234, progress=False)
    save_grid(images, path, nrow=4, scale=2, captions=list(SAMPLE_PROMPTS))


def _write_checkpoint(out_dir, cfg, model, ema, frozen, tokenizer, scheduler, optimizer, step, seconds, losses,
                      loss_sum):
    """Replace out_dir/checkpoint in one rename: model/ (the EMA, loadable), train_state.*, loss.csv."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    tensors.update(optimizer_tensors(optimizer.state_dict()))
    meta = {"step": step, "seconds": seconds, "config": cfg.to_dict(), "loss_sum": loss_sum,
            "param_groups": optimizer.state_dict()["param_groups"]}
    training = {"training": {"step": step, "seconds": round(seconds, 1), "config": cfg.to_dict()}}
    csv_text = _loss_csv(losses)
    with atomic_folder(out_dir / "checkpoint", overwrite=True, kind=TRAINING_KIND, marker=True) as tmp:
        if cfg.stage == "autoencoder":
            shipped = copy.deepcopy(ema)
            shipped.config = replace(shipped.config, scale_factor=measure_scale_factor(ema))
            (tmp / "model").mkdir()
            save_autoencoder(shipped, tmp / "model", training)
        else:
            ema_pipeline(ema, frozen, tokenizer, scheduler, training).save(tmp / "model")
        save_safetensors(tensors, tmp / "train_state.safetensors")
        save_json(meta, tmp / "train_state.json")
        (tmp / "loss.csv").write_text(csv_text)
    (out_dir / "loss.csv").write_text(csv_text)


def _restore(resume, cfg: LatentTrainConfig, model, ema, optimizer) -> tuple:
    path = checkpoint_dir(resume)
    meta = json.loads((path / "train_state.json").read_text())
    # fields added since the checkpoint was written held their defaults
    check_same_config(path, {**LatentTrainConfig(autoencoder="x").to_dict(), **meta["config"]}, cfg.to_dict())
    tensors = read_state_dict(path / "train_state.safetensors")
    load_weights(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, "model in train_state")
    load_weights(ema, {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, "EMA in train_state")
    restore_optimizer(optimizer, tensors, meta["param_groups"])
    return meta["step"], meta["seconds"], read_losses(path / "loss.csv"), list(meta["loss_sum"])


def latent_config_from(settings: dict) -> LatentTrainConfig:
    return config_from_dict(LatentTrainConfig, settings)
