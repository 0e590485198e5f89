"""minidiff: a from-scratch U-Net diffusion framework with native DeepCache-style partial execution."""
import importlib

__version__ = "0.1.0"
__all__ = ["Pipeline", "UNet", "UNetConfig", "load", "retain_freed_memory"]

# Imported on first use, so `minidiff --version` and the command line's usage errors need no torch.
_HOMES = {"Pipeline": "pipeline", "load": "pipeline", "UNet": "unet", "UNetConfig": "unet",
          "retain_freed_memory": "allocator"}


def __getattr__(name):
    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_HOMES))
