"""Memory layout of a tensor, so copies keep it: the U-Net runs channels-last (see `UNet.__init__`)."""
import torch


def memory_format(tensor: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-d tensor stored that way (and not also plainly contiguous), else the default."""
    if tensor.ndim == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
