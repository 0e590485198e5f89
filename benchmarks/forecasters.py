"""Forecasters from the literature next to the cache's Lagrange forecast, teacher-forced on a real run.

    python benchmarks/forecasters.py [--model weights/digits-cond] [--seeds 1 2] [--batch 8] \
        [--intervals 3 5 8] [--branch 0] [--threads 1]

One uncached DDIM run per seed records, at every step, the deep feature a shallow step at
`--branch` reuses and the cut feature every step computes (DiCache's probe). For each uniform 1:N
schedule, every forecaster sees the true features of the full steps only and forecasts the deep
feature at each skipped step; nothing it forecasts feeds back into sampling (teacher forcing), except
FoCa's recursion over its own forecasts, which is part of its rule. The table gives the relative L2
error against the true feature (per sample, mean over samples and skipped steps) and its ratio to
plain reuse's error: below 1 beats reuse.
"""
import argparse
import math
import time

import torch

from minidiff.analysis import cached_layer, record_features
from minidiff.cache import uniform_schedule
from minidiff.forecast import lagrange_weights
from minidiff.forecasters import chebyshev, combine, dicache, foca, hermite
from minidiff.pipeline import load


def lagrange(times, values, t, order):
    """forecast.History's forecast: the polynomial through the last order + 1 full steps (fewer if short)."""
    k = min(order, len(values) - 1)
    return values[-1] if k == 0 else combine(values[-k - 1:], lagrange_weights(times[-k - 1:], t))


def forecasters(timesteps):
    """name -> forecast(times, values, probes, t, probe_now, recent) for one run's timesteps."""
    span, step = (timesteps[0], timesteps[-1]), abs(timesteps[1] - timesteps[0])
    return {
        "reuse (lagrange k=0)": lambda T, V, P, t, p, r: lagrange(T, V, t, 0),
        "lagrange k=1": lambda T, V, P, t, p, r: lagrange(T, V, t, 1),
        "lagrange k=2": lambda T, V, P, t, p, r: lagrange(T, V, t, 2),
        "foca": lambda T, V, P, t, p, r: foca(T, V, t, r["foca"]),
        "foca, horizon 3 calls": lambda T, V, P, t, p, r: foca(T, V, t, r["foca, horizon 3 calls"], 3 * step),
        "hermite k=1 s=0.5 (HiCache)": lambda T, V, P, t, p, r: hermite(T, V, t, 1, 0.5, step),
        "hermite k=2 s=0.5": lambda T, V, P, t, p, r: hermite(T, V, t, 2, 0.5, step),
        "hermite k=2 s=0.707": lambda T, V, P, t, p, r: hermite(T, V, t, 2, 2 ** -0.5, step),
        "chebyshev w=1 (Spectrum)": lambda T, V, P, t, p, r: chebyshev(T, V, t, span),
        "chebyshev w=0.5": lambda T, V, P, t, p, r: chebyshev(T, V, t, span, mix=0.5),
        "dicache": lambda T, V, P, t, p, r: dicache(V, P, p),
    }


def relative_error(forecast, truth):
    """(B,) ||forecast - truth|| / ||truth|| per sample."""
    return (forecast - truth).norm(dim=-1) / truth.norm(dim=-1)


def measure(timesteps, deep, probe, full_steps):
    """name -> (skipped steps, B) relative errors of each forecaster on one schedule."""
    methods = forecasters(timesteps)
    errors = {name: [] for name in methods}
    times, values, probes = [], [], []
    recent = {name: [] for name in methods if name.startswith("foca")}  # FoCa's last two (timestep, value)
    for s, t in enumerate(timesteps):
        if s in full_steps:
            times.append(t)
            values.append(deep[s])
            probes.append(probe[s])
            for window in recent.values():
                window[:] = (window + [(t, deep[s])])[-2:]
            continue
        for name, forecast in methods.items():
            predicted = forecast(times, values, probes, t, probe[s], recent)
            errors[name].append(relative_error(predicted, deep[s]))
            if name in recent:
                recent[name][:] = (recent[name] + [(t, predicted)])[-2:]
    return {name: torch.stack(e) for name, e in errors.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="weights/digits-cond")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--intervals", type=int, nargs="+", default=[3, 5, 8])
    parser.add_argument("--branch", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = load(args.model)
    deep_name, probe_name = cached_layer(pipe.denoiser, args.branch), f"enc.{args.branch}"
    runs = []
    for seed in args.seeds:
        labels = [i % pipe.num_real_classes() for i in range(args.batch)]
        record = record_features(pipe, steps=args.steps, sampler="ddim", layers=[probe_name, deep_name], seed=seed,
                                 class_labels=labels, batch_size=args.batch)
        runs.append((record.timesteps, record.features[deep_name].double(), record.features[probe_name].double()))
    print(f"{args.model}, DDIM {args.steps} steps, branch {args.branch} (deep feature {deep_name}, probe "
          f"{probe_name}), seeds {args.seeds} x {args.batch} samples; relative L2 error of the forecast deep "
          f"feature on skipped steps (mean), and its ratio to reuse's")
    table = {}
    for interval in args.intervals:
        full = set(uniform_schedule(args.steps, interval))
        per_run = [measure(timesteps, deep, probe, full) for timesteps, deep, probe in runs]
        for name in per_run[0]:
            table.setdefault(name, {})[interval] = torch.cat([r[name].flatten() for r in per_run]).mean().item()
    header = f"{'forecaster':<28}" + "".join(f"{f'1:{n} error':>12}{'/reuse':>8}" for n in args.intervals)
    print(header)
    reuse = table["reuse (lagrange k=0)"]
    for name, row in table.items():
        cells = "".join(f"{row[n]:>12.4f}{row[n] / reuse[n]:>8.2f}" if math.isfinite(row[n]) else f"{'nan':>20}"
                        for n in args.intervals)
        print(f"{name:<28}{cells}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
