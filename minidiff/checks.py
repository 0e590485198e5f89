"""Range and type checks at the public edge: every config field and input a user gives, with the
sentence that names what is wrong. The networks call these once; inner code trusts its input."""
from __future__ import annotations

import math

import torch


def check_labels(labels, batch: int, num_classes: int, device, network: str) -> torch.Tensor:
    """Class labels as a (batch,) LongTensor on `device`, or a sentence saying what is wrong with them."""
    if labels is None:
        raise ValueError(f"this {network} is class-conditional: pass class labels in [0, {num_classes - 1}] as cond")
    labels = torch.as_tensor(labels, device=device)
    if labels.ndim == 0:
        labels = labels.expand(batch)
    if labels.dtype not in (torch.int64, torch.int32) or labels.shape != (batch,):
        raise ValueError(f"class labels must be {batch} integers, got dtype {labels.dtype} shape "
                         f"{tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"class labels must lie in [0, {num_classes - 1}], got {labels.tolist()}")
    return labels.long()



def check_steps(steps, num_train_timesteps: int):
    """The one limit on sampling steps a user gives: at most the model's noise levels."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be an int in [1, {num_train_timesteps}] (this model's noise levels), "
                         f"got {steps!r}")


def batch_timesteps(t, x: torch.Tensor) -> torch.Tensor:
    """t (a number or one per sample) as a (B,) tensor on x's device, B = x.shape[0]."""
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t

def check_config(self) -> None:
    """Every field of a UNetConfig in range, with the field named in the error."""
    def need(ok, msg):
        if not ok:
            raise ValueError(f"UNetConfig: {msg}")

    limits = {"in_channels": 1024, "out_channels": 1024, "model_channels": 65_536, "num_res_blocks": 64,
              "norm_groups": 1024, "transformer_depth": 64}
    for name, top in limits.items():
        value = getattr(self, name)
        need(isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= top,
             f"{name} must be an int in [1, {top}], got {value!r}")
    need(len(self.channel_mult) >= 1 and all(isinstance(m, int) and 1 <= m <= 1024 for m in self.channel_mult),
         f"channel_mult must be a non-empty list of positive ints, got {list(self.channel_mult)}")
    need(len(self.channel_mult) <= 12, f"channel_mult has {len(self.channel_mult)} levels; at most 12 are supported")
    need(all(isinstance(lv, int) and 0 <= lv < len(self.channel_mult) for lv in self.attention_levels),
         f"attention_levels must name levels 0..{len(self.channel_mult) - 1}, got {list(self.attention_levels)}")
    need(self.attention_type in ("self", "transformer"),
         f"attention_type must be 'self' or 'transformer', got {self.attention_type!r}")
    need(self.class_cond in ("add", "context"), f"class_cond must be 'add' or 'context', got {self.class_cond!r}")
    need(self.num_classes is None or (isinstance(self.num_classes, int) and 1 <= self.num_classes <= 10_000_000),
         f"num_classes must be None or a positive int, got {self.num_classes!r}")
    for name in ("num_heads", "head_channels"):
        value = getattr(self, name)
        counts = value if isinstance(value, tuple) else (value,)
        need(value is None or (all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65_536
                                   for v in counts)
                               and (not isinstance(value, tuple) or len(value) == len(self.channel_mult))),
             f"{name} must be None, a positive int or one positive int per level "
             f"({len(self.channel_mult)}), got {value!r}")
    need(self.context_dim is None or (isinstance(self.context_dim, int) and self.context_dim >= 1),
         f"context_dim must be None or a positive int, got {self.context_dim!r}")
    need(self.context_dim is None or self.attention_type == "transformer",
         "context_dim needs attention_type 'transformer' (cross-attention lives in spatial transformers)")
    need(not (self.class_cond == "context" and self.num_classes and self.context_dim is None),
         "class_cond 'context' needs context_dim (the width of the class token)")
    number = (int, float)
    need(isinstance(self.dropout, number) and 0.0 <= self.dropout < 1.0,
         f"dropout must be a number in [0, 1), got {self.dropout!r}")
    need(isinstance(self.norm_eps, number) and 0.0 < self.norm_eps < 1.0,
         f"norm_eps must be a number in (0, 1), got {self.norm_eps!r}")
    need(not isinstance(self.downsample_padding, bool) and self.downsample_padding in (0, 1),
         f"downsample_padding must be 0 or 1, got {self.downsample_padding!r}")
    for name in ("mid_attention", "flip_sin_to_cos", "use_linear_projection"):
        need(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
    need(isinstance(self.freq_shift, (int, float)) and not isinstance(self.freq_shift, bool)
         and math.isfinite(self.freq_shift) and 0 <= self.freq_shift < self.model_channels // 2,
         f"freq_shift must be a number in [0, {self.model_channels // 2}), got {self.freq_shift!r}")
    need(self.sample_size is None or (isinstance(self.sample_size, int) and not isinstance(self.sample_size, bool)
                                      and 1 <= self.sample_size <= 16384),
         f"sample_size must be None or an int in [1, 16384], got {self.sample_size!r}")
    need(not (self.num_classes and self.class_cond == "add" and self.context_dim is not None),
         "class_cond 'add' with context_dim would need a text context besides the labels, which minidiff does "
         "not support; use class_cond 'context' (the class token is the context) or drop context_dim")
    widest = self.model_channels * max(self.channel_mult)
    need(widest <= 65_536, f"the widest level has {widest} channels (model_channels x max(channel_mult)); at "
                           "most 65536 are supported")
    for level, ch in enumerate(self.level_channels):
        need(ch % self.norm_groups == 0, f"channels {ch} are not divisible by norm_groups {self.norm_groups}")
        heads = self.heads_for(ch, level)
        need(ch % heads == 0, f"{ch} channels cannot be split into {heads} heads")
