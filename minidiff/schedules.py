"""Noise schedules: the betas, the cumulative alphas and the timesteps a sampler visits.

The numbers follow diffusers' DDPM/DDIM/PNDM schedulers (float32 betas, float32 cumulative
product, the same timestep spacings), so a checkpoint's scheduler_config.json gives the same
schedule here as there.
"""

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "fixed_small_log")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")

# Keys in diffusers' scheduler_config.json that carry no schedule information for us:
# bookkeeping, legacy names from early diffusers, and options of other sampler variants.
IGNORED_KEYS = frozenset({
    "_class_name", "_diffusers_version", "_use_default_values", "tensor_format",
    "timesteps", "timestep_values", "skip_prk_steps",
    "dynamic_thresholding_ratio", "sample_max_value",
})
# Keys we accept only at the value that leaves the numbers unchanged.
UNSUPPORTED_UNLESS = {"thresholding": False, "rescale_betas_zero_snr": False}


@dataclass
class SchedulerConfig:
    """Training noise schedule and sampling conventions, named as in diffusers' scheduler config."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: list | None = None
    prediction_type: str = "epsilon"
    variance_type: str = "fixed_small"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    # None: each sampler's diffusers default, "leading" for ddpm/ddim/plms and "linspace" for the
    # sigma-space samplers, as diffusers' from_config gives when switching schedulers on a config that
    # does not set it (SD1.5's, for one).
    timestep_spacing: str | None = None

    def __post_init__(self):
        if self.trained_betas is not None:
            self.trained_betas = [float(b) for b in self.trained_betas]
        self.validate()

    def validate(self):
        """Raise ValueError naming the first field outside its valid range."""
        def need(ok, message):
            if not ok:
                raise ValueError(f"SchedulerConfig: {message}")

        T = self.num_train_timesteps
        need(isinstance(T, int) and not isinstance(T, bool) and 1 <= T <= 100_000,
             f"num_train_timesteps must be an integer in [1, 100000], got {T!r}")
        need(self.beta_schedule in BETA_SCHEDULES,
             f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        need(0 < self.beta_start < self.beta_end < 1,
             f"betas must satisfy 0 < beta_start < beta_end < 1, got beta_start={self.beta_start!r}, "
             f"beta_end={self.beta_end!r}")
        if self.trained_betas is not None:
            need(len(self.trained_betas) == T,
                 f"trained_betas has {len(self.trained_betas)} values but num_train_timesteps is {T}; "
                 "give one beta per training timestep")
            need(all(0 < b < 1 for b in self.trained_betas), "every value in trained_betas must lie in (0, 1)")
        need(self.prediction_type in PREDICTION_TYPES,
             f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        need(self.variance_type in VARIANCE_TYPES,
             f"variance_type must be one of {VARIANCE_TYPES}, got {self.variance_type!r} "
             "(learned variances are not supported)")
        need(isinstance(self.clip_sample, bool), f"clip_sample must be true or false, got {self.clip_sample!r}")
        need(self.clip_sample_range > 0, f"clip_sample_range must be > 0, got {self.clip_sample_range!r}")
        need(isinstance(self.set_alpha_to_one, bool),
             f"set_alpha_to_one must be true or false, got {self.set_alpha_to_one!r}")
        need(isinstance(self.steps_offset, int) and 0 <= self.steps_offset < T,
             f"steps_offset must be an integer in [0, {T - 1}], got {self.steps_offset!r}")
        need(self.timestep_spacing is None or self.timestep_spacing in TIMESTEP_SPACINGS,
             f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {self.timestep_spacing!r}")

    @classmethod
    def from_dict(cls, d):
        """Build from a diffusers scheduler_config.json dict, skipping keys that do not change the numbers."""
        known = {f.name for f in fields(cls)}
        # diffusers lists in _use_default_values the keys it filled with its class's defaults; like its
        # from_config, treat them as unset (an unset timestep_spacing means each sampler's own default)
        defaulted = d.get("_use_default_values") or ()
        kwargs = {}
        for key, value in d.items():
            if key in defaulted:
                continue
            if key in known:
                kwargs[key] = value
            elif key in UNSUPPORTED_UNLESS:
                if value != UNSUPPORTED_UNLESS[key]:
                    raise ValueError(f"Scheduler config sets {key}={value!r}, which minidiff does not implement; "
                                     f"only {key}={UNSUPPORTED_UNLESS[key]!r} is supported.")
            elif key not in IGNORED_KEYS:
                raise ValueError(f"Unknown scheduler config key {key!r}. Known keys: {sorted(known)}; "
                                 "remove it if it does not change the noise schedule.")
        return cls(**kwargs)

    def to_dict(self):
        """Plain dict with diffusers' key names, ready for json.dump; an unset timestep_spacing is left out
        so that diffusers' schedulers, like ours, fall back to their own default."""
        d = asdict(self)
        if d["timestep_spacing"] is None:
            del d["timestep_spacing"]
        return d


def _cosine_betas(T, max_beta=0.999):
    """Betas of the squared-cosine alpha_bar (Nichol & Dhariwal 2021), capped so none reaches 1."""
    def alpha_bar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]


@dataclass
class NoiseSchedule:
    """Per-timestep constants, float32 like diffusers' so sampled numbers agree with it."""
    betas: torch.Tensor                # (T,)
    alphas_cumprod: torch.Tensor       # (T,) alpha_bar_t = prod(1 - beta_s, s <= t)
    final_alpha_cumprod: torch.Tensor  # () alpha_bar "before" t=0, used by DDIM/PLMS's last step

    @classmethod
    def from_config(cls, config, device=None):
        """Compute the schedule described by `config`, on `device`."""
        T = config.num_train_timesteps
        if config.trained_betas is not None:
            betas = torch.tensor(config.trained_betas, dtype=torch.float32)
        elif config.beta_schedule == "linear":
            betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
        elif config.beta_schedule == "scaled_linear":
            # Latent diffusion's schedule: linear in sqrt(beta).
            betas = torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, T, dtype=torch.float32) ** 2
        else:
            betas = torch.tensor(_cosine_betas(T), dtype=torch.float32)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        final = torch.tensor(1.0) if config.set_alpha_to_one else alphas_cumprod[0].clone()
        return cls(betas.to(device), alphas_cumprod.to(device), final.to(device))


def make_timesteps(config, steps):
    """Descending LongTensor of the `steps` training timesteps a sampler visits, spaced as diffusers does."""
    T = config.num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer between 1 and num_train_timesteps={T}, got {steps!r}")
    spacing = config.timestep_spacing or "leading"
    if spacing == "linspace":
        timesteps = np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        timesteps = (np.arange(steps) * (T // steps))[::-1] + config.steps_offset
    else:
        # Float arange can overshoot by one element (a timestep of -1 in diffusers); keep exactly `steps`.
        timesteps = (np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1)[:steps]
    if timesteps[0] >= T:
        raise ValueError(f"steps_offset={config.steps_offset} with {steps} steps starts at timestep "
                         f"{timesteps[0]}, past the last trained timestep {T - 1}; use fewer steps.")
    return torch.from_numpy(timesteps.copy()).long()
