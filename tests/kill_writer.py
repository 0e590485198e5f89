"""Writer processes for the kill test in test_hostile.py, forked from one warm parent.

    python tests/kill_writer.py ROOT

Importing torch takes seconds, so this process imports once and then, for every line `fork N` on
stdin, forks a child and prints its pid. The child rewrites ROOT/model (Pipeline.save) and
ROOT/weights.safetensors (an atomic_path write) in a loop, forever, until the test kills it with
SIGKILL. Version v of either holds weights all equal to v, so a reader can tell a whole version
from a mixture: version numbers of child N start at N * 100000 and only grow.
"""
import os
import signal
import sys
import traceback
from pathlib import Path

from minidiff.writing import save_safetensors
from minidiff.pipeline import Pipeline
from minidiff.schedules import SchedulerConfig
from minidiff.unet import UNet, UNetConfig

TINY = dict(in_channels=1, out_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
            attention_levels=(), mid_attention=False, norm_groups=4)
VERSION_STRIDE = 100_000


def tiny_pipeline(version: int) -> Pipeline:
    """A tiny pipeline whose weights all equal `version` (and say so in config.json)."""
    import torch

    unet = UNet(UNetConfig(**TINY))
    with torch.no_grad():
        for p in unet.parameters():
            p.fill_(float(version))
    return Pipeline(unet, SchedulerConfig(num_train_timesteps=10), meta={"version": version})


def write_forever(root: Path, writer: int):
    import ctypes

    import torch

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with this parent, never linger
    torch.set_num_threads(1)
    version = writer * VERSION_STRIDE
    pipe = tiny_pipeline(version)
    while True:
        version += 1
        with torch.no_grad():
            for p in pipe.unet.parameters():
                p.fill_(float(version))
        pipe.meta["version"] = version
        pipe.save(root / "model", overwrite=True)
        weights = torch.full((64, 64), float(version))
        save_safetensors({"a": weights, "b": weights}, root / "weights.safetensors")


def main(root: str):
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel: no zombies
    for line in sys.stdin:
        command, writer = line.split()
        assert command == "fork"
        pid = os.fork()
        if pid == 0:
            try:
                write_forever(Path(root), int(writer))
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(1)  # never return into the parent's loop
        print(pid, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
