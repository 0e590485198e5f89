"""The precision a converter writes its weights in (`--dtype`), shared by the three converters."""
from __future__ import annotations

import argparse
from typing import Optional

import torch

# Names a user types -> the dtype stored; float32 keeps the converted weights as they are.
STORAGE_DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


def storage_dtype(name) -> Optional[torch.dtype]:
    """None (float32, as converted) or the half-precision dtype named by `name` (a str or a dtype)."""
    if name is None or isinstance(name, torch.dtype) and name.is_floating_point:
        return None if name == torch.float32 else name
    if name not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {name!r}")
    return STORAGE_DTYPES[name]


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=list(STORAGE_DTYPES), default="float32",
                        help="precision of the written weights: float16/bfloat16 give a file half the size "
                             "(minidiff.load reads it back in float32 or that dtype)")
