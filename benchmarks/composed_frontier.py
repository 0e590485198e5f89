"""The composed frontier from a model's plan, its figure, and the planner checked on held-out seeds.

    python -m minidiff plan --model weights/digits-cond --threads 1          # measures (calibration seeds)
    python benchmarks/composed_frontier.py --model weights/digits-cond \
        [--guidance-scale 1] [--check-budgets 0.2 0.3] [--seeds 21 22] [--plot docs/figures/composed_frontier_digits.png]
        [--quality-seeds 31 32 ... 50]

Prints, from plan.json (measured on calibration seeds 11-13), the best PSNR of each family at each
budget (fewer steps alone, 50-step caching with a fixed or adaptive schedule, and their composition:
fewer steps *and* caching), whether the composition beats both of its parts, and the envelope with
its quality columns. Then the quality columns of each family's best-PSNR configuration per budget
(class accuracy and toy FID on digits; on a text model the shares of samples following their
prompt in colour, shape, place and all, and toy FID), and per budget two separate verdicts: does
the composition beat both parts by PSNR, and by quality (the share, "accuracy" or "all", outside
two standard errors; within them a tie, with the toy FIDs beside it).
Then, on seeds the plan never saw, it runs the planned configuration at each
--check-budgets and every grid configuration that fits that budget, and reports the planned run's
cost and its PSNR against the best of them. --quality-seeds re-measures only each family's
chosen configuration at the --check-budgets on many more images, for quality columns worth reading.
"""
import argparse
import math
import time

import torch

from minidiff import planner
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
    for b, best in family_bests(rows, steps, TABLE_BUDGETS):
        if not any(best.values()):  # a small grid has nothing this cheap
            lines.append(f"| {b:.2f} | " + " | ".join("-" for _ in GROUPS) + " | nothing measured fits | - |")
            continue
        top = max((r for r in best.values() if r), key=lambda r: r["psnr"])
        cells = ["-" if r is None else (f"**{r['psnr']:.2f}** ({short(r)})" if r is top else
                                        f"{r['psnr']:.2f} ({short(r)})") for r in best.values()]
        lines.append(f"| {b:.2f} | " + " | ".join(cells) + f" | {group(top, steps)} | {psnr_verdict(best)} |")
    return "\n".join(lines)


def family_bests(rows, steps, budgets) -> list:
    """[(budget, {family: its best-PSNR row within the budget, or None})] for each budget."""
    return [(b, {g: planner.best_within([r for r in rows if group(r, steps) == g], b) for g in GROUPS})
            for b in budgets]


def composed_and_parts(best) -> tuple:
    """The best-PSNR composed row (or None) and the rows of the parts (fewer steps, 50-step caching)."""
    composed = max((best[g] for g in GROUPS[3:] if best[g]), key=lambda r: r["psnr"], default=None)
    return composed, [best[g] for g in GROUPS[:3] if best[g]]


def psnr_verdict(best) -> str:
    """Whether the best composed row has a higher PSNR than every part's best."""
    composed, parts = composed_and_parts(best)
    if composed is None:
        return "no composed point fits"
    top = max((r["psnr"] for r in parts), default=-math.inf)
    if composed["psnr"] > top:
        return f"yes, by {composed['psnr'] - top:.2f} dB" if parts else "yes: no part fits"
    return f"**no**: {top - composed['psnr']:.2f} dB short"


def share_key(rows):
    """The quality share a verdict reads: "all" (text), "accuracy" (class labels) or None."""
    if any("all" in r for r in rows):
        return "all"
    return "accuracy" if any(r.get("accuracy") is not None for r in rows) else None


def quality_verdict(best) -> str:
    """Whether the best-PSNR composed row follows better than every part's best-PSNR row: its share
    ("all" or class accuracy) above the best part's by more than two standard errors of a difference
    of two shares of n images (unpaired: conservative, the runs share their noise); within them a
    tie, with the toy FIDs (lower is better) beside it."""
    composed, parts = composed_and_parts(best)
    key = share_key([r for r in best.values() if r])
    if composed is None:
        return "no composed point fits"
    if key is None:
        return "no quality columns"
    if not parts:
        return "yes: no part fits"
    top = max(parts, key=lambda r: (r[key], -r["toy_fid"]))
    diff, n = composed[key] - top[key], composed.get("count")
    mean = (composed[key] + top[key]) / 2
    margin = 2 * math.sqrt(2 * mean * (1 - mean) / n) if n else 0.0
    if diff > margin:
        return f"yes: {key} {composed[key]:.3f} vs {top[key]:.3f}"
    if diff < -margin:
        return f"**no**: {key} {composed[key]:.3f} vs {top[key]:.3f}"
    fid = min(r["toy_fid"] for r in parts)
    noise = f"2 SE {margin:.3f}, n={n}" if n else "n not recorded: no noise band"
    return (f"tie: {key} {composed[key]:.3f} vs {top[key]:.3f} ({noise}); toy FID "
            f"{composed['toy_fid']:.2f} vs the parts' best {fid:.2f}")


def quality_columns(rows) -> tuple:
    """The quality columns these rows carry, in table order."""
    if share_key(rows) == "all":
        return ("colour", "shape", "place", "relation", "all", "toy_fid")
    return ("accuracy", "toy_fid") if share_key(rows) else ()


def quality_table(bests, steps) -> str:
    """Each family's best-PSNR row per budget with its quality columns, then per budget the two
    verdicts: does the composition beat both parts by PSNR, and (separately) by quality."""
    columns = quality_columns([r for _, best in bests for r in best.values() if r])
    names = [{"toy_fid": "toy FID", "accuracy": "class acc"}.get(c, c) for c in columns]
    lines = ["| budget | family | configuration | cost | PSNR | " + " | ".join(names) + " |",
             "|---" * (5 + len(columns)) + "|"]
    for b, best in bests:
        for g, r in best.items():
            if r is not None:
                cells = [f"{r[c]:.2f}" if c == "toy_fid" else f"{r[c]:.3f}" for c in columns]
                lines.append(f"| {b:.2f} | {g} | {short(r)} | {r['cost']:.3f} | {min(r['psnr'], 99.99):.2f} | "
                             + " | ".join(cells) + " |")
    lines += ["", "| budget | composition beats both parts by PSNR? | by quality? |", "|---|---|---|"]
    lines += [f"| {b:.2f} | {psnr_verdict(best)} | {quality_verdict(best)} |" for b, best in bests]
    return "\n".join(lines)


def envelope_table(entry) -> str:
    columns = quality_columns(entry["rows"])
    names = [{"toy_fid": "toy FID", "accuracy": "class acc"}.get(c, c) for c in columns]
    lines = ["| cost | configuration | family | PSNR (dB) | " + " | ".join(names) + " |", "|---" * (4 + len(columns)) + "|"]
    for r in planner.envelope(entry["rows"]):
        cells = ["-" if r.get(c) is None else f"{r[c]:.2f}" if c == "toy_fid" else f"{r[c]:.3f}" for c in columns]
        lines.append(f"| {r['cost']:.3f} | {Config.from_dict(r).label()} | {group(r, entry['steps'])} | "
                     f"{min(r['psnr'], 99.99):.2f} | " + " | ".join(cells) + " |")
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
    sampler, steps, guidance = entry["sampler"], entry["steps"], entry["guidance_scale"]  # 1.0: off
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
              f"(cap {planned['cost']:.3f}), PSNR {planned['psnr']:.2f}  {planner.quality_text(planned)}")
        print(quality_table(family_bests(fits, steps, [b]), steps))
        top = max(fits, key=lambda r: r["psnr"])
        print(f"planned - best alternative: {planned['psnr'] - top['psnr']:+.2f} dB "
              f"(best: {Config.from_dict(top).label()}, {top['psnr']:.2f})")


def requality(pipe, entry, budgets, seeds, metric) -> list:
    """Each family's configuration chosen at each budget on the calibration seeds, run again on
    `seeds` (many images: the quality columns' noise shrinks): family_bests' list, re-measured."""
    chosen = family_bests(entry["rows"], entry["steps"], budgets)
    configs = list(dict.fromkeys(Config.from_dict(r) for _, best in chosen for r in best.values() if r))
    start = time.perf_counter()
    rows = planner.measure(pipe, configs, sampler=entry["sampler"], reference_steps=entry["steps"],
                           guidance_scale=entry["guidance_scale"], seeds=seeds, metric=metric)
    print(f"\nquality seeds {list(seeds)} ({rows[0].get('count', '?')} images): {len(rows)} configurations in "
          f"{time.perf_counter() - start:.0f}s")
    again = {Config.from_dict(r): r for r in rows}
    return [(b, {g: r and again[Config.from_dict(r)] for g, r in best.items()}) for b, best in chosen]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="weights/digits-cond")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--guidance-scale", type=float, nargs="+",
                   help="which of the plan's guidance scales to print (and plot side by side); default the "
                        "model's (config.json guidance_scale; 1 where it names none)")
    p.add_argument("--check-budgets", type=float, nargs="*", default=[0.2, 0.3])
    p.add_argument("--seeds", type=int, nargs="*", default=[21, 22],
                   help="held-out seeds (never used to plan); none: no held-out check")
    p.add_argument("--plot", help="write the envelope figure here")
    p.add_argument("--quality-seeds", type=int, nargs="*", default=[],
                   help="re-measure each family's chosen configuration at --check-budgets on these seeds")
    p.add_argument("--classifier", help="quality classifier (default: DATASET-classifier beside the model; "
                                        "a scenes classifier for a text model; 'none')")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    plans = planner.read_plan(planner.plan_path(args.model))["plans"]
    pipe = load(args.model)
    entries = []
    for g in args.guidance_scale or [planner.resolved_guidance(pipe, None)]:
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
        print("\nquality of each family's best-PSNR configuration (the cells above), and the two verdicts:\n")
        print(quality_table(family_bests(entry["rows"], entry["steps"], TABLE_BUDGETS), entry["steps"]))
    if args.plot:
        plot(entries, args.plot, f"{args.model}: the composed frontier (calibration seeds)")
    metric = planner.quality_metric(pipe, args.model, args.classifier)
    for entry in entries:
        if args.check_budgets and args.seeds:
            check(pipe, entry, args.check_budgets, args.seeds, metric)
        if args.check_budgets and args.quality_seeds:
            print(quality_table(requality(pipe, entry, args.check_budgets, args.quality_seeds, metric), entry["steps"]))


if __name__ == "__main__":
    main()
