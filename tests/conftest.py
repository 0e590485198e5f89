import json
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "reference-configs"

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
torch.set_num_threads(1)  # tiny test models run fastest single-threaded


def shared_path(*parts) -> Path:
    """A file of ../shared/reference-configs; the test is skipped (with the reason) when absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference file {path} is not available (expected ../shared beside the repo)")
    return path


def manifest(name: str) -> dict:
    return json.loads(shared_path("_generated-key-manifests", name).read_text())


def meta_state_dict(keys: dict, prefix: str = "") -> dict:
    """Shape-only tensors for the manifest keys under `prefix` (prefix stripped)."""
    return {k[len(prefix):]: torch.empty(v["shape"], device="meta") for k, v in keys.items()
            if k.startswith(prefix) and "position_ids" not in k}


def randomize(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Non-trivial random weights (zero-initialised output layers would hide mapping errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Every available device: CPU always (CI), CUDA as well when one is present."""
    return torch.device(request.param)
