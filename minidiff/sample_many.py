"""Evaluation-size sampling, one PNG per sample, shared across processes and resumable.

    minidiff sample-many --model DIR -n 50000 --out DIR [sample options]
    torchrun --nproc_per_node=K -m minidiff.sample --model DIR -n 50000 --out DIR ...

Samples are cut into fixed batches (batch j holds samples j*B .. j*B+B-1) and the batches are
dealt round-robin to the ranks, so what goes into a batch never depends on the number of
processes. Sample i starts from noise drawn by a generator seeded with seed + i; the first sample's
generator then drives the sampler's own noise for its batch, so with --batch-size 1 sample i is
exactly `minidiff sample --seed <seed + i>`. Each PNG is written atomically, so an existing file is
a finished sample: a restart skips every batch whose files all exist.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm


RUN_FILE = "run.json"  # the settings the folder's samples were made with


def sample_path(out_dir, index: int) -> Path:
    return Path(out_dir) / f"{index:06d}.png"


def batches(num: int, batch_size: int) -> list:
    """Sample indices of every batch; fixed by `num` and `batch_size` alone."""
    return [list(range(start, min(start + batch_size, num))) for start in range(0, num, batch_size)]


def rank_batches(num: int, batch_size: int, rank: int, world: int) -> list:
    """The batches rank `rank` of `world` runs: every world-th, starting at its own rank."""
    return batches(num, batch_size)[rank::world]


def conditioning_for(indices: list, class_labels: Optional[list], prompts: Optional[list], num_classes) -> dict:
    """Per-sample labels or prompts: sample i takes entry i mod their count (default: every class in turn)."""
    if prompts:
        return {"prompt": [prompts[i % len(prompts)] for i in indices]}
    if class_labels:
        return {"class_labels": [class_labels[i % len(class_labels)] for i in indices]}
    if num_classes:
        return {"class_labels": [i % num_classes for i in indices]}
    return {}


def initial_noise(pipe, seeds: list, height, width) -> tuple:
    """(noise batch, generator of the first sample): each sample's noise comes from its own seed alone,
    drawn as `generate(seed=s, batch_size=1)` draws it."""
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    noise = torch.cat([pipe.initial_noise(1, height=height, width=width, generator=g) for g in generators])
    return noise, generators[0]


def distributed(device: Optional[str]) -> tuple:
    """(rank, world, device, group made here): gloo on CPU, nccl on CUDA; no group for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    made = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        made = True
    return rank, world, device, made


def finish(world: int, made_group: bool):
    """Wait for every rank's files, then take down the group `distributed` made."""
    if world > 1:
        dist.barrier()
    if made_group:
        dist.destroy_process_group()


def _plain(settings: dict) -> dict:
    """Settings without unset options (None, False), so options added later match older run.json files."""
    return {k: v for k, v in settings.items() if v is not None and v is not False}


def holds_samples(out_dir: Path) -> bool:
    return out_dir.is_dir() and any(SAMPLE_NAME.fullmatch(entry.name) for entry in out_dir.iterdir())


SAMPLE_NAME = re.compile(r"\d{6,}\.png")


def claim_folder(out_dir: Path, settings: dict, rank: int, world: int = 1):
    """Refuse to mix samples made with different settings in one folder; rank 0 records the settings
    in run.json. A run.json beside no samples (a run refused or stopped before its first) is replaced."""
    path = out_dir / RUN_FILE
    if path.exists():
        try:
            earlier = json.loads(path.read_text())
        except ValueError:
            earlier = {}
        earlier, now = _plain(earlier if isinstance(earlier, dict) else {}), _plain(settings)
        changed = sorted(k for k in set(now) | set(earlier) if now.get(k) != earlier.get(k))
        if changed and holds_samples(out_dir):
            raise ValueError(f"{out_dir} holds samples made with other settings ({', '.join(changed)} differ); "
                             "use another --out folder or delete it")
        write = bool(changed)
    else:
        write = True
    if write and rank == 0:
        from .writing import save_json

        save_json(settings, path)
    if world > 1:
        dist.barrier()  # rank 0 has written run.json


def sample_many(pipe, out_dir, num: int, *, seed: int = 0, batch_size: int = 1, class_labels=None, prompts=None,
                height=None, width=None, rank: int = 0, world: int = 1, progress: bool = True,
                **generate_kwargs) -> list:
    """Write samples 0..num-1 of `pipe` as PNGs under `out_dir`, this rank's share; returns the indices
    it computed. `generate_kwargs` go to `Pipeline.generate` (steps, sampler, cache_interval, ...)."""
    from .data import save_png

    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be an int >= 1, got {num!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= 4096:
        raise ValueError(f"batch_size must be an int in [1, 4096], got {batch_size!r}")
    out_dir = Path(out_dir)
    num_classes = pipe.num_real_classes() if pipe.denoiser.config.num_classes is not None else None
    mine = rank_batches(num, batch_size, rank, world)
    slots = -(-len(batches(num, batch_size)) // world)  # every rank takes part in as many progress updates
    done_before = sum(len(b) for b in mine if all(sample_path(out_dir, i).exists() for i in b))
    counts = _sum_over_ranks([done_before], pipe.device, world)
    bar = tqdm(total=num, initial=counts[0], disable=not (progress and rank == 0), unit="img")
    computed = []
    for slot in range(slots):
        finished = 0
        indices = mine[slot] if slot < len(mine) else []
        todo = [i for i in indices if not sample_path(out_dir, i).exists()]
        if todo:
            noise, generator = initial_noise(pipe, [seed + i for i in indices], height, width)
            images = pipe.generate(noise=noise, generator=generator, batch_size=len(indices), progress=False,
                                   **conditioning_for(indices, class_labels, prompts, num_classes), **generate_kwargs)
            for i, image in zip(indices, images):
                if i in todo:
                    save_png(image, sample_path(out_dir, i))
            computed += todo
            finished = len(indices)
        bar.update(_sum_over_ranks([finished], pipe.device, world)[0])
    bar.close()
    return computed


def _sum_over_ranks(values: list, device, world: int) -> list:
    if world == 1:
        return values
    counts = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(counts)
    return counts.tolist()
