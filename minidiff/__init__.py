"""minidiff: a from-scratch U-Net diffusion framework with native DeepCache-style partial execution."""
from .allocator import retain_freed_memory
from .pipeline import Pipeline, load
from .unet import UNet, UNetConfig

__version__ = "0.1.0"
__all__ = ["Pipeline", "UNet", "UNetConfig", "load", "retain_freed_memory"]
