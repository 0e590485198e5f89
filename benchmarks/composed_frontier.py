"""The composed frontier from a model's plan, its figure, and the planner checked on held-out seeds.

    python -m minidiff plan --model weights/digits-cond --threads 1          # measures (calibration seeds)
    python benchmarks/composed_frontier.py --model weights/digits-cond \
        [--guidance-scale 1] [--check-budgets 0.2 0.3] [--seeds 21 22] [--plot docs/figures/composed_frontier_digits.png]

Prints, from plan.json (measured on calibration seeds 11-13), the best PSNR of each family at each
budget (fewer steps alone, 50-step caching with a fixed or adaptive schedule, and their composition:
fewer steps *and* caching), whether the composition beats both of its parts, and the envelope with
its quality columns. Then, on seeds the plan never saw, it runs the planned configuration at each
--check-budgets and every grid configuration that fits that budget, and reports the planned run's
cost and its PSNR against the best of them.
"""
import argparse
import math
import time

import torch

from minidiff import planner
from minidiff.metrics import load_metric
from minidiff.pipeline import load
from minidiff.planner import Config

TABLE_BUDGETS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8)
GROUPS = ("fewer steps", "50-step fixed cache", "50-step adaptive", "composed fixed", "composed adaptive")


def group(row, reference_steps) -> str:
    if row["kind"] == "none":
        return "reference" if row["steps"] == reference_steps else "fewer steps"
    where = "50-step" if row["steps"] == reference_steps else "composed"
    what = "adaptive" if row["kind"] == "adaptive" else "fixed cache" if where == "50-step" else "fixed"
    return f"{where} {what}"


def short(row) -> str:
    if row["kind"] == "none":
        return f"{row['steps']} st"
    how = f"1:{row['interval']}" if row["kind"] == "uniform" else f"ad {row['budget']:g}"
    return f"{row['steps']} st {how} b{row['branch']} f{row['forecast']}"


def family_table(entry) -> str:
    steps, rows = entry["steps"], entry["rows"]
    lines = ["| budget | " + " | ".join(GROUPS) + " | winner | composition beats both parts? |",
             "|---" * (len(GROUPS) + 3) + "|"]
    verdicts = []
    for b in TABLE_BUDGETS:
        best = {g: planner.best_within([r for r in rows if group(r, steps) == g], b) for g in GROUPS}
        top = max((r for r in best.values() if r), key=lambda r: r["psnr"])
        cells = ["-" if r is None else (f"**{r['psnr']:.2f}** ({short(r)})" if r is top else
                                        f"{r['psnr']:.2f} ({short(r)})") for r in best.values()]
        composed = max((best[g]["psnr"] for g in GROUPS[3:] if best[g]), default=None)
        parts = [best[g]["psnr"] for g in GROUPS[:3] if best[g]]
        if composed is None:
            verdict = "no composed point fits"
        elif composed > max(parts, default=-math.inf):
            verdict = f"yes, by {composed - max(parts):.2f} dB"
        else:
            verdict = f"**no**: {max(parts) - composed:.2f} dB short"
        verdicts.append(verdict)
        lines.append(f"| {b:.2f} | " + " | ".join(cells) + f" | {group(top, steps)} | {verdict} |")
    return "\n".join(lines)


def envelope_table(entry) -> str:
    lines = ["| cost | configuration | family | PSNR (dB) | class acc | toy FID |", "|---|---|---|---|---|---|"]
    for r in planner.envelope(entry["rows"]):
        acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.3f}"
        fid = "-" if r.get("toy_fid") is None else f"{r['toy_fid']:.2f}"
        lines.append(f"| {r['cost']:.3f} | {Config.from_dict(r).label()} | {group(r, entry['steps'])} | "
                     f"{min(r['psnr'], 99.99):.2f} | {acc} | {fid} |")
    return "\n".join(lines)


def plot(entries, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(entries), figsize=(6.5 * len(entries), 4.8), squeeze=False)
    colors = dict(zip(GROUPS, ("black", "tab:blue", "tab:green", "tab:orange", "tab:red")))
    for ax, entry in zip(axes[0], entries):
        steps = entry["steps"]
        rows = [r for r in entry["rows"] if r["cost"] < 1]
        for g in GROUPS:
            mine = [r for r in rows if group(r, steps) == g]
            if not mine:
                continue
            ax.scatter([r["cost"] for r in mine], [r["psnr"] for r in mine], s=14, alpha=0.45, color=colors[g])
            env = planner.envelope(mine)
            ax.plot([r["cost"] for r in env], [r["psnr"] for r in env], "-", color=colors[g], label=g, lw=1.4,
                    drawstyle="steps-post")
        env = planner.envelope(rows)
        ax.plot([r["cost"] for r in env], [r["psnr"] for r in env], "--", color="purple", lw=2.2, alpha=0.6,
                drawstyle="steps-post",
                label="envelope (what the plan picks)")
        ax.set_xlabel(f"U-Net MACs / those of {steps} uncached steps")
        ax.set_ylabel(f"PSNR vs {steps} uncached steps (dB)")
        ax.set_title(f"{entry['sampler']}, guidance {entry['guidance_scale']:g}, seeds {entry['seeds']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def check(pipe, entry, budgets, seeds, metric):
    """On held-out seeds: the planned run at each budget against every grid configuration that fits."""
    sampler, steps, guidance = entry["sampler"], entry["steps"], entry["guidance_scale"]
    guidance = None if guidance == 1.0 else guidance
    candidates = [Config.from_dict(r) for r in entry["rows"] if r["cost"] <= max(budgets) + 1e-9]
    start = time.perf_counter()
    rows = planner.measure(pipe, candidates, sampler=sampler, reference_steps=steps, guidance_scale=guidance,
                           seeds=seeds, metric=metric)
    print(f"\nheld-out seeds {list(seeds)}: {len(rows)} configurations in {time.perf_counter() - start:.0f}s")
    for b in budgets:
        chosen = planner.plan_for({"plans": [entry]}, b, steps=steps, sampler=sampler, guidance=guidance)
        planned = next(r for r in rows if Config.from_dict(r).kwargs(sampler) == chosen)
        fits = [r for r in rows if r["cost"] <= b + 1e-9]
        print(f"\nbudget {b:.2f}: planned {Config.from_dict(planned).label()}: spent {planned['measured_cost']:.3f} "
              f"(cap {planned['cost']:.3f}), PSNR {planned['psnr']:.2f}, acc {planned.get('accuracy')}")
        print("| family | best configuration within budget | cost | PSNR | class acc | toy FID |")
        print("|---|---|---|---|---|---|")
        for g in GROUPS:
            best = planner.best_within([r for r in fits if group(r, steps) == g], b)
            if best:
                print(f"| {g} | {Config.from_dict(best).label()} | {best['cost']:.3f} | {best['psnr']:.2f} | "
                      f"{best.get('accuracy', '-')} | {best.get('toy_fid', float('nan')):.2f} |")
        top = max(fits, key=lambda r: r["psnr"])
        print(f"planned - best alternative: {planned['psnr'] - top['psnr']:+.2f} dB "
              f"(best: {Config.from_dict(top).label()}, {top['psnr']:.2f})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="weights/digits-cond")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--guidance-scale", type=float, nargs="+", default=[1.0],
                   help="which of the plan's guidance scales to print (and plot side by side)")
    p.add_argument("--check-budgets", type=float, nargs="*", default=[0.2, 0.3])
    p.add_argument("--seeds", type=int, nargs="+", default=[21, 22], help="held-out seeds (never used to plan)")
    p.add_argument("--plot", help="write the envelope figure here")
    p.add_argument("--classifier", default="weights/digits-classifier")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    plans = planner.read_plan(planner.plan_path(args.model))["plans"]
    entries = []
    for g in args.guidance_scale:
        entry = next((e for e in plans if (e["sampler"], e["guidance_scale"], e["steps"]) == (args.sampler, g, 50)),
                     None)
        if entry is None:
            raise SystemExit(f"{args.model} has no plan for {args.sampler} at guidance {g:g}")
        entries.append(entry)
        print(f"\n## {args.model}: {args.sampler}, guidance {g:g}, {len(entry['rows'])} configurations, "
              f"seeds {entry['seeds']} ({entry['seconds']:.0f}s)\n")
        print(family_table(entry))
        print()
        print(envelope_table(entry))
    if args.plot:
        plot(entries, args.plot, f"{args.model}: the composed frontier (calibration seeds)")
    if args.check_budgets:
        pipe = load(args.model)
        metric = load_metric(args.classifier) if args.classifier else None
        for entry in entries:
            check(pipe, entry, args.check_budgets, args.seeds, metric)


if __name__ == "__main__":
    main()
