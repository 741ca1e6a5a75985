"""The running-sum task's plots: learning curves, the paired differences in AUC, the per-position metrics, and
the position-bias audit plots (wpkl/demo/sums_report.py writes them beside the report)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from .sums_experiment import POSITION_LABELS, POSITION_METRICS, comparisons, position_means, runs_of


def plots(results: dict, out: Path, audit: bool = True, dpi: int = 110) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'wpkl[demo]')", file=sys.stderr)
        return False
    cfg = results["config"]
    teachers, names = cfg["teachers"], cfg["weightings"]
    colors = {name: f"C{i}" for i, name in enumerate(names)}

    fig, axes = plt.subplots(2, len(teachers), figsize=(4.2 * len(teachers), 6.5), squeeze=False, sharey=True,
                             constrained_layout=True)
    for col, mode in enumerate(teachers):
        for name in names:
            runs = runs_of(results, mode, name)
            if not runs:
                continue
            steps = [p["step"] for p in runs[0]["curve"]]
            for row, key in enumerate(("sampled", "greedy")):
                values = [sum(r["curve"][i][key] for r in runs) / len(runs) for i in range(len(steps))]
                axes[row, col].plot(steps, values, marker=".", color=colors[name], label=name)
        axes[0, col].set_title(f"teacher {mode}")
        for row in range(2):
            axes[row, col].grid(alpha=0.3)
        axes[1, col].set_xlabel("on-policy update")
    axes[0, 0].set_ylabel(f"accuracy, sampled (mean@{cfg['eval_samples']})")
    axes[1, 0].set_ylabel("accuracy, greedy")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"final-answer accuracy on held-out prompts (mean over {len(cfg['seeds'])} seeds)")
    fig.savefig(out / "curves.png", dpi=dpi)
    plt.close(fig)

    rows = [c for c in comparisons(results) if c["metric"] == "auc_sampled"]
    fig, axes = plt.subplots(1, len(teachers), figsize=(4.2 * len(teachers), 0.5 + 0.45 * len(names)),
                             squeeze=False, sharex=True, constrained_layout=True)
    for col, mode in enumerate(teachers):
        ax = axes[0, col]
        group = [c for c in rows if c["teacher"] == mode]
        for y, c in enumerate(group):
            low, high = c["ci_low"], c["ci_high"]
            if not math.isnan(low):
                ax.plot([low, high], [y, y], color=colors[c["weighting"]], lw=2)
            ax.plot([c["mean"]], [y], "o", color=colors[c["weighting"]])
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(group)), [c["weighting"] for c in group])
        ax.set_title(f"teacher {mode}")
        ax.set_xlabel("Δ AUC sampled accuracy vs uniform (95% CI)")
        ax.grid(alpha=0.3, axis="x")
    fig.savefig(out / "differences.png", dpi=dpi)
    plt.close(fig)

    metrics = POSITION_METRICS
    fig, axes = plt.subplots(len(metrics), len(teachers), figsize=(4.2 * len(teachers), 2.1 * len(metrics)),
                             squeeze=False, sharex=True, constrained_layout=True)
    for col, mode in enumerate(teachers):
        start = position_means(runs_of(results, mode, names[0]), "initial")
        for name in names:
            runs = runs_of(results, mode, name)
            final, training = position_means(runs, "final"), position_means(runs, "training")
            for row, metric in enumerate(metrics):
                values = training.get(metric) if metric == "weight" else final.get(metric)
                if values:
                    axes[row, col].plot(range(1, len(values) + 1), values, color=colors[name], label=name)
        for row, metric in enumerate(metrics):
            ax = axes[row, col]
            if metric != "weight" and start.get(metric):
                ax.plot(range(1, len(start[metric]) + 1), start[metric], "k--", lw=1, label="before")
            # From 0, and no offset notation: a flat line (the teacher's entropy) must look flat.
            ax.ticklabel_format(axis="y", useOffset=False)
            top = max([max(line.get_ydata()) for line in ax.get_lines()] or [1.0])
            ax.set_ylim(0, max(1.1 * top, 0.05 if metric in ("step_error", "wrong_prefix", "conflict") else 0.1))
            ax.grid(alpha=0.3)
            if col == 0:
                axes[row, col].set_ylabel(POSITION_LABELS[metric], fontsize=8)
        axes[0, col].set_title(f"teacher {mode}")
        axes[-1, col].set_xlabel("response position k")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("per position: held-out samples after training (dashed: before); weight: mean over training")
    fig.savefig(out / "positions.png", dpi=dpi)
    plt.close(fig)

    if audit:
        from ..audit import plot as audit_plot

        for r in results["runs"]:
            if r["seed"] == cfg["seeds"][0] and "monitor" in r:
                audit_plot(r["monitor"], out / "audit" / r["teacher"] / r["name"], title=f"{r['teacher']} {r['name']}")
    return True
