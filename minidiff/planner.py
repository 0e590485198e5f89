"""The composed frontier and the planner: fewer steps, caching, and both at once, at equal MACs.

DeepCache cuts the cost of a step and a fast sampler cuts the number of steps, so the two can be
composed: k < 50 steps, some of them shallow. `measure` runs a grid of such configurations (plain
fewer steps and 50-step caching are its special cases) on calibration noise and scores each against
the uncached reference run. A plan (plan.json in the model folder) keeps those measurements, and
`plan_for` answers "what gives the reference run's images best at this fraction of its MACs" from
them, never choosing a configuration that costs more than the budget.

Cost is always U-Net MACs over those of the uncached reference run:
model_calls(k) / model_calls(reference) x the run's own mac_fraction (RunStats). An adaptive
configuration's cost is its cap, model_calls(k) / model_calls(reference) x cache_budget, since a
sample may spend up to its allowance on other noise.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional, Sequence

import torch

from .writing import save_json
from .cache import FORECASTS
from .metrics import load_metric, psnr
from .samplers import SAMPLERS, num_model_calls
from .scenes_metric import demo_prompts, following_shares, load_scene_metric

PLAN_FORMAT = "minidiff-plan"
PLAN_VERSION = 1
PLAN_FILE = "plan.json"
BUDGETS = tuple(round(0.10 + 0.05 * i, 2) for i in range(19))  # the table a plan stores: 0.10 .. 1.00
KINDS = ("none", "uniform", "adaptive")
PLANNED_FORECASTS = tuple(f for f in FORECASTS if f != "auto")  # a plan stores what ran, not "auto"  # "none": every step full (plain fewer steps)
PSNR_CAP = 100.0  # psnr(per_image=True) caps identical images here; the reference scores it


@dataclass(frozen=True)
class Config:
    """One way to spend MACs: `steps` sampler steps, caching `kind` at `branch` (1:`interval` for
    "uniform"; per-sample refreshes within `budget` of this k-step run for "adaptive") with deep
    features reused (forecast 0), extrapolated (1, 2) or forecast by a named rule from the literature
    ("foca", "hermite", "chebyshev", "dicache": minidiff.forecasters)."""

    steps: int
    kind: str = "none"
    interval: int = 1
    branch: int = 0
    forecast: object = 0
    budget: Optional[float] = None

    def kwargs(self, sampler: str) -> dict:
        """The `Pipeline.generate` keywords of this configuration."""
        out = dict(steps=self.steps, sampler=sampler)
        if self.kind == "uniform":
            out.update(cache_schedule="uniform", cache_interval=self.interval, cache_branch=self.branch,
                       cache_forecast=self.forecast)
        elif self.kind == "adaptive":
            out.update(cache_schedule="adaptive", cache_branch=self.branch, cache_forecast=self.forecast,
                       cache_budget=self.budget)
        return out

    def label(self) -> str:
        if self.kind == "none":
            return f"{self.steps} steps"
        what = f"1:{self.interval}" if self.kind == "uniform" else f"adaptive {self.budget:g}"
        return f"{self.steps} steps, {what}, branch {self.branch}, forecast {self.forecast}"

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in d.items() if k in names})
        check_config(config)
        return config


def family(config: Config, reference_steps: int) -> str:
    """"fewer steps", "caching" (all reference steps, some shallow) or "composed" (both)."""
    if config.kind == "none":
        return "reference" if config.steps == reference_steps else "fewer steps"
    return "caching" if config.steps == reference_steps else "composed"


def check_config(c: Config):
    if isinstance(c.steps, bool) or not isinstance(c.steps, int) or c.steps < 1:
        raise ValueError(f"a planned configuration needs steps >= 1, got {c.steps!r}")
    if c.kind not in KINDS:
        raise ValueError(f"unknown planned cache kind {c.kind!r}; expected one of {KINDS}")
    if c.kind == "adaptive" and not (isinstance(c.budget, (int, float)) and 0 < c.budget <= 1):
        raise ValueError(f"an adaptive configuration needs a cache budget in (0, 1], got {c.budget!r}")
    if not (isinstance(c.interval, int) and c.interval >= 1 and c.forecast in PLANNED_FORECASTS
            and not isinstance(c.forecast, bool)
            and isinstance(c.branch, int) and c.branch >= 0):
        raise ValueError(f"bad planned configuration {c}")


@dataclass
class Grid:
    """Which configurations `measure` runs. Fixed schedules run at every step count in
    `cached_steps` (the reference count is added), adaptive ones at `adaptive_steps`."""

    fewer_steps: tuple = (5, 8, 10, 12, 15, 17, 20, 25, 30, 35, 40)
    cached_steps: tuple = (15, 20, 25, 30)
    intervals: tuple = (2, 3, 5)
    forecasts: tuple = (0, 2)  # of the uniform schedules (`minidiff plan --forecasts`)
    branches: tuple = (0,)
    deep_branches: tuple = (1,)  # also measured at the reference steps only, forecast 2
    adaptive_steps: tuple = (20, 30)
    adaptive_budgets: tuple = (0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6)
    composed_adaptive_budgets: tuple = (0.3, 0.5, 0.7)


def grid_configs(grid: Grid, reference_steps: int, num_branches: int, adaptive: bool = True,
                 adaptive_forecast: int = 2) -> list:
    """Every configuration of `grid` a network with `num_branches` can run, the reference (all steps
    full) first; `adaptive=False` leaves the adaptive schedule out. The adaptive
    schedule forecasts with `adaptive_forecast` (0 for samplers that inject noise: docs/adaptive.md)."""
    out = [Config(reference_steps)]
    out += [Config(k) for k in grid.fewer_steps if k < reference_steps]
    branches = [b for b in grid.branches if b < num_branches]
    for k in (reference_steps, *(k for k in grid.cached_steps if k < reference_steps)):
        for b in branches:
            out += [Config(k, "uniform", n, b, f) for n in grid.intervals if n < k for f in grid.forecasts]
    out += [Config(reference_steps, "uniform", n, b, 2) for b in grid.deep_branches
            if b < num_branches and b not in branches for n in grid.intervals]
    if adaptive:
        f = adaptive_forecast
        out += [Config(reference_steps, "adaptive", 1, 0, f, p) for p in grid.adaptive_budgets]
        out += [Config(k, "adaptive", 1, 0, f, p) for k in grid.adaptive_steps if k < reference_steps
                for p in grid.composed_adaptive_budgets]
    return list(dict.fromkeys(out))


def is_text(pipe) -> bool:
    return pipe.text_encoder is not None


def calibration_batch(pipe, seeds: Sequence[int], prompts: Optional[Sequence[str]] = None):
    """(noise, class labels, prompts) of a measurement: per seed, one sample of each class, of each
    prompt (a text model; default `scenes_metric.demo_prompts`, every seen pair, place and relation),
    or one sample."""
    labels = None
    if is_text(pipe):
        prompts = list(demo_prompts() if prompts is None else prompts)
        per_seed = len(prompts)
    elif prompts is not None:
        raise ValueError("calibration prompts need a text model; this one takes no prompt")
    else:
        per_seed = pipe.num_real_classes() if pipe.denoiser.config.num_classes is not None else 1
        labels = None if pipe.denoiser.config.num_classes is None else pipe.default_labels(per_seed) * len(seeds)
    noise = torch.cat([pipe.initial_noise(per_seed, generator=torch.Generator().manual_seed(s)) for s in seeds])
    return noise, labels, None if prompts is None else prompts * len(seeds)


def resolved_guidance(pipe, guidance_scale) -> float:
    """The guidance a run with `guidance_scale` uses (None: the model's default), 1.0 when off: a plan's key."""
    return _guidance(pipe.guidance_for(guidance_scale))


def quality_metric(pipe, model_dir, classifier=None):
    """The metric of the quality columns: a toy classifier, or for a text model a scenes classifier,
    from `classifier` (a folder; "none": no metric) or else DATASET-classifier beside the model (None
    when there is none)."""
    if classifier == "none":
        return None
    if classifier is None:
        dataset = pipe.meta.get("training", {}).get("config", {}).get("dataset")
        candidate = Path(model_dir).resolve().parent / f"{Path(str(dataset)).name}-classifier"
        if not isinstance(dataset, str) or not (candidate / "config.json").exists():
            return None
        classifier = candidate
    return (load_scene_metric if is_text(pipe) else load_metric)(classifier)


def quality(metric, images: torch.Tensor, labels=None, prompts=None) -> dict:
    """A row's quality columns: class accuracy and toy FID (a ToyMetric and class labels), or the
    shares following their prompt in colour, shape, place, relation and all, and toy FID (a
    SceneMetric and prompts); {} when there is nothing to score against."""
    if prompts is not None:
        return {**following_shares(metric, images, prompts), "toy_fid": metric.toy_fid(images),
                "count": images.shape[0]}
    if labels is None:
        return {}
    scores = metric.score(images, labels)
    return {"accuracy": scores.accuracy, "toy_fid": scores.toy_fid, "count": images.shape[0]}


def cost_of(config: Config, run_mac_fraction: float, sampler: str, reference_steps: int) -> float:
    """MACs of a run over those of the uncached reference run (an adaptive run: its cap)."""
    calls = num_model_calls(sampler, config.steps) / num_model_calls(sampler, reference_steps)
    return calls * (config.budget if config.kind == "adaptive" else run_mac_fraction)


def measure(pipe, configs: Sequence[Config], *, sampler: str = "ddim", reference_steps: int = 50,
            guidance_scale=None, seeds: Sequence[int] = (11, 12, 13), metric=None, prompts=None, log=None) -> list:
    """One row per configuration that runs on this model: its cost (an adaptive run: its cap) and
    measured_cost (what this run spent), its PSNR against the reference run from the same noise
    (mean over images, dB), and with a `metric` the `quality` columns. A text model samples each of
    `prompts` per seed (`calibration_batch`); `guidance_scale` None is the model's default.
    Configurations the model refuses (an adaptive budget below one full step) are skipped."""
    noise, labels, prompts = calibration_batch(pipe, seeds, prompts)
    common = dict(sampler=sampler, noise=noise, class_labels=labels, prompt=prompts, guidance_scale=guidance_scale,
                  seed=seeds[0], batch_size=noise.shape[0], progress=False)
    reference = pipe.generate(steps=reference_steps, **common)
    rows = []
    for config in configs:
        start = time.perf_counter()
        try:
            images = reference if config == Config(reference_steps) else \
                pipe.generate(**{**config.kwargs(sampler), **common})
        except ValueError as e:
            if config.kind != "adaptive":
                raise
            if log:
                log(f"skipped {config.label()}: {e}")
            continue
        fraction = 1.0 if images is reference else pipe.last_run.mac_fraction
        row = {**asdict(config), "family": family(config, reference_steps),
               "cost": cost_of(config, fraction, sampler, reference_steps),
               "measured_cost": cost_of(Config(config.steps), fraction, sampler, reference_steps),
               "psnr": min(psnr(images, reference, per_image=True), PSNR_CAP),
               "seconds": round(time.perf_counter() - start, 2)}
        if metric is not None:
            row.update(quality(metric, images, labels, prompts))
        rows.append(row)
        if log:
            log(f"{config.label():<45} cost {row['cost']:.3f}  PSNR {row['psnr']:6.2f}  {quality_text(row)}"
                f"  ({row['seconds']:.1f}s)")
    return rows


def quality_text(row: dict) -> str:
    """A row's quality columns in a few words ("" without them)."""
    if "all" in row:
        return (f"colour {row['colour']:.3f}  shape {row['shape']:.3f}  place {row['place']:.3f}  "
                f"all {row['all']:.3f}  toy FID {row['toy_fid']:.2f}")
    if row.get("accuracy") is not None:
        return f"acc {row['accuracy']:.3f}  toy FID {row['toy_fid']:.2f}"
    return ""


def best_within(rows: Sequence[dict], budget: float) -> Optional[dict]:
    """The row with the best PSNR among those costing at most `budget` (ties: the cheaper)."""
    fits = [r for r in rows if r["cost"] <= budget + 1e-9]
    return max(fits, key=lambda r: (r["psnr"], -r["cost"]), default=None)


def envelope(rows: Sequence[dict]) -> list:
    """The rows no cheaper-or-equal row beats: the frontier, by cost."""
    out, best = [], -math.inf
    for r in sorted(rows, key=lambda r: (r["cost"], -r["psnr"])):
        if r["psnr"] > best:
            out.append(r)
            best = r["psnr"]
    return out


# -- plan.json ----------------------------------------------------------------------------------------

def _guidance(g) -> float:
    return 1.0 if g is None else float(g)


def plan_key(sampler: str, guidance_scale, steps: int) -> tuple:
    return sampler, _guidance(guidance_scale), int(steps)


def make_entry(rows: Sequence[dict], *, sampler: str, guidance_scale, reference_steps: int, seeds, model: str,
               seconds: float, budgets: Sequence[float] = BUDGETS) -> dict:
    """One plan: every measured row, and for each budget of `budgets` the best row that fits."""
    table = []
    for b in budgets:
        best = best_within(rows, b)
        table.append({"budget": b, "config": None if best is None else rows.index(best)})
    return {"sampler": sampler, "guidance_scale": _guidance(guidance_scale), "steps": reference_steps,
            "seeds": list(seeds), "model": model, "seconds": round(seconds, 1), "rows": [dict(r) for r in rows], "budgets": table}


def read_plan(path) -> dict:
    """plan.json as a dict, checked; a missing, unreadable or malformed file is one ValueError."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} (the model's plan) is unreadable: {e}; remake it with "
                         "`python -m minidiff plan --overwrite`") from None
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT or not isinstance(data.get("plans"), list):
        raise ValueError(f"{path} is not a minidiff plan (expected format {PLAN_FORMAT!r} with a list of plans)")
    if data.get("version") != PLAN_VERSION:
        raise ValueError(f"{path} is plan version {data.get('version')!r}; this minidiff reads version {PLAN_VERSION}")
    for entry in data["plans"]:
        try:
            plan_key(entry["sampler"], entry["guidance_scale"], entry["steps"])
            for row in entry["rows"]:
                Config.from_dict(row)
                float(row["cost"]), float(row["psnr"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} holds a damaged plan ({type(e).__name__}: {e}); remake it with "
                             "`python -m minidiff plan --overwrite`") from None
    return data


def plan_path(model_dir) -> Path:
    return Path(model_dir) / PLAN_FILE


def has_entry(path, sampler: str, guidance_scale, steps: int) -> bool:
    """Whether plan.json at `path` already holds a plan for this sampler, guidance and step count."""
    path = Path(path)
    if not path.exists():
        return False
    key = plan_key(sampler, guidance_scale, steps)
    return any(plan_key(e["sampler"], e["guidance_scale"], e["steps"]) == key for e in read_plan(path)["plans"])


def write_entry(path, entry: dict, *, overwrite: bool = False):
    """Add `entry` to plan.json (atomically; other samplers' and guidance scales' plans are kept).
    An existing plan for the same sampler, guidance and step count is replaced only with `overwrite`."""
    path = Path(path)
    key = plan_key(entry["sampler"], entry["guidance_scale"], entry["steps"])
    try:
        plans = read_plan(path)["plans"] if path.exists() else []
    except ValueError:
        if not overwrite:
            raise
        plans = []
    same = [e for e in plans if plan_key(e["sampler"], e["guidance_scale"], e["steps"]) == key]
    if same and not overwrite:
        raise FileExistsError(f"{path} already holds a plan for {key[0]} at guidance {key[1]:g} with {key[2]} "
                              "steps; pass --overwrite to replace it")
    plans = [e for e in plans if e not in same] + [entry]
    save_json({"format": PLAN_FORMAT, "version": PLAN_VERSION, "plans": plans}, path)


# -- choosing ---------------------------------------------------------------------------------------

class NoPlan(ValueError):
    """The model has no plan for this sampler, guidance and step count."""


def make_command(model_dir, sampler: str, guidance_scale, steps: int) -> str:
    return (f"python -m minidiff plan --model {model_dir or 'MODEL_DIR'} --sampler {sampler} "
            f"--guidance-scale {_guidance(guidance_scale):g} --steps {steps}")


def _plans_of(source):
    """(plans, model folder or None) from a pipeline (its `plan` attribute, else the plan.json of
    the folder it was loaded from), a plan dict, a plan.json path or a model folder."""
    if isinstance(source, dict):
        return source.get("plans", []), None
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist (expected a model folder or its plan.json)")
        folder, file = (path, plan_path(path)) if path.is_dir() else (path.parent, path)
        return (read_plan(file)["plans"] if file.exists() else []), folder
    plan, folder = getattr(source, "plan", None), getattr(source, "source", None)  # `load` sets source
    if plan is None and folder is not None and plan_path(folder).exists():
        plan = read_plan(plan_path(folder))
    return (plan or {}).get("plans", []), folder


def plan_for(source, budget: float, steps: int = 50, sampler: str = "ddim", guidance=None) -> dict:
    """The `generate` keywords of the measured configuration with the best PSNR against the uncached
    `steps`-step run whose cost is at most `budget` (a fraction of that run's MACs). `source`: a
    pipeline with a `plan` attribute, a plan dict, a plan.json or a model folder."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction of the uncached run's MACs in (0, 1], got {budget!r}")
    plans, folder = _plans_of(source)
    key = plan_key(sampler, guidance, steps)
    entry = next((e for e in plans if plan_key(e["sampler"], e["guidance_scale"], e["steps"]) == key), None)
    if entry is None:
        where = f"{folder}" if folder else "this model"
        raise NoPlan(f"{where} has no plan for {sampler} at guidance {key[1]:g} with {steps} steps; make one with "
                     f"`{make_command(folder, sampler, guidance, steps)}`")
    best = best_within(entry["rows"], budget)
    if best is None:
        least = min(r["cost"] for r in entry["rows"])
        raise ValueError(f"budget {budget:g} is below the cheapest planned run ({least:.3f} of the MACs of "
                         f"{steps} uncached steps)")
    return Config.from_dict(best).kwargs(sampler)


def generate_within(pipe, budget: float, steps: int = 50, *, sampler: str = "ddim", guidance_scale=None,
                    plan=None, **kwargs):
    """`pipe.generate` at most `budget` of the MACs of `steps` uncached steps, as the plan chooses
    (the plan of `plan`, else the pipeline's). `pipe.last_run.plan` records the choice."""
    picked = [k for k in kwargs if k.startswith("cache_")]
    if picked:
        raise ValueError(f"a budgeted run has its caching chosen by the plan; drop {', '.join(sorted(picked))}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {sorted(SAMPLERS)}")
    guidance = resolved_guidance(pipe, guidance_scale)  # a text model's plan is keyed by its default guidance
    chosen = plan_for(pipe if plan is None else plan, budget, steps=steps, sampler=sampler, guidance=guidance)
    images = pipe.generate(**chosen, guidance_scale=guidance_scale, **kwargs)
    pipe.last_run.plan = {"budget": budget, "reference_steps": steps, **chosen}
    return images


def parse_forecasts(text: str) -> tuple:
    """"0,2,foca" -> (0, 2, "foca"): the forecasts a plan measures on its uniform schedules."""
    items = [item.strip() for item in text.split(",")]
    out = tuple(int(item) if item.isdigit() else item for item in items)
    bad = [item for item in out if item not in PLANNED_FORECASTS or isinstance(item, bool)]
    if not items or bad or "" in items:
        raise ValueError(f"--forecasts must be a comma-separated list of {', '.join(map(str, PLANNED_FORECASTS))}, "
                         f"got {text!r}")
    return tuple(dict.fromkeys(out))
