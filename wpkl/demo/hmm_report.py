"""The HMM task's report (``wpkl demo --task hmm``): table, curves and audit plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .experiment import mean_std


def summarize(results: dict) -> list[dict]:
    final_kl = {(r["name"], r["seed"]): r["curve"][-1]["kl"] for r in results["runs"]}
    rows = []
    for name in results["config"]["weightings"]:
        runs = [r for r in results["runs"] if r["name"] == name]
        final = [r["curve"][-1] for r in runs]
        reached = [r["steps_to_target"] for r in runs if r["steps_to_target"] is not None]
        # Paired by seed: the same teacher, student start and prompts, so seed-to-seed spread cancels.
        paired = [final_kl[(name, r["seed"])] - final_kl[("uniform", r["seed"])] for r in runs
                  if ("uniform", r["seed"]) in final_kl]
        rows.append(dict(
            weighting=name,
            kl=mean_std([f["kl"] for f in final]),
            kl_vs_uniform=mean_std(paired) if paired else (float("nan"), float("nan")),
            better_than_uniform=f"{sum(d < 0 for d in paired)}/{len(paired)}" if paired else "",
            true_ll=mean_std([f["true_ll"] for f in final]),
            steps_to_target=mean_std(reached) if reached else (float("nan"), float("nan")),
            reached=f"{len(reached)}/{len(runs)}",
            per_seed_kl=[round(f["kl"], 4) for f in final],
        ))
    return rows


def write_report(results: dict, out: Path, elapsed: float) -> bool:
    """Write the report; True when the plots were written too (they need matplotlib)."""
    (out / "summary.md").write_text(summary_markdown(results, elapsed))
    serializable = dict(results, runs=[{k: v for k, v in r.items() if k != "monitor"} for r in results["runs"]],
                        summary=summarize(results), seconds=elapsed)
    (out / "results.json").write_text(json.dumps(serializable, indent=1, default=str))
    for r in results["runs"]:
        r["monitor"].save(out / "runs" / r["name"] / f"seed{r['seed']}" / "position_bias.pt")
    return _plots(results, out)


def summary_markdown(results: dict, elapsed: float) -> str:
    """The report's table (works on results.json as loaded, too)."""
    cfg = results["config"]
    rows = summarize(results)
    ref = results["reference"]
    seeds = len(cfg["seeds"])
    fmt = lambda ms, digits=4: f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}" if seeds > 1 else f"{ms[0]:.{digits}f}"  # noqa: E731
    lines = [
        "# wpkl demo: on-policy distillation on a synthetic language",
        "",
        f"{len(cfg['seeds'])} seed(s), {cfg['steps']} on-policy updates of {cfg['batch']} rollouts x "
        f"{cfg['new_tokens']} tokens per weighting, divergence {cfg['divergence']}, device {cfg['device']}; "
        f"{elapsed:.0f} s in all. Mean ± standard deviation over seeds.",
        "",
        "| weighting | final KL(student ‖ teacher) / token | KL − uniform's (paired) | lower than uniform | "
        "true log-likelihood / token | steps to target KL | reached | per-seed KL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        steps = "not reached" if r["reached"].startswith("0/") else fmt(r["steps_to_target"], 0)
        lines.append(f"| {r['weighting']} | {fmt(r['kl'])} | {fmt(r['kl_vs_uniform'])} | {r['better_than_uniform']} | "
                     f"{fmt(r['true_ll'], 3)} | {steps} | {r['reached']} | {', '.join(map(str, r['per_seed_kl']))} |")
    teacher_ll = [v["teacher_true_ll"] for v in ref.values()]
    language_ll = [v["language_true_ll"] for v in ref.values()]
    target = [r["target_kl"] for r in results["runs"]]
    lines += [
        "",
        f"Reference: the teacher's own samples score {sum(teacher_ll) / len(teacher_ll):.3f} nats/token under the "
        f"language, samples of the language itself {sum(language_ll) / len(language_ll):.3f}. Target KL: "
        f"{'given' if cfg['target_kl'] is not None else 'half the warm-started student KL'} "
        f"({min(target):.4f} to {max(target):.4f}), checked every {cfg['eval_every']} updates. KL is measured on "
        f"the student's own samples of {cfg['eval_prompts']} held-out prompts; 'KL − uniform's' pairs runs of the "
        "same seed (same teacher, student start and prompts).",
    ]
    return "\n".join(lines) + "\n"


def _plots(results: dict, out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'wpkl[demo]')", file=sys.stderr)
        return False
    from ..audit import plot as audit_plot

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for name in results["config"]["weightings"]:
        runs = [r for r in results["runs"] if r["name"] == name]
        steps = [p["step"] for p in runs[0]["curve"]]
        for ax, key in zip(axes, ("kl", "true_ll"), strict=True):
            values = [sum(r["curve"][i][key] for r in runs) / len(runs) for i in range(len(steps))]
            ax.plot(steps, values, marker=".", label=name)
    axes[0].set_ylabel("KL(student ‖ teacher) per token, held-out prompts")
    axes[1].set_ylabel("true log-likelihood per token of student samples")
    for ax in axes:
        ax.set_xlabel("on-policy update")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("wpkl demo: learning curves (mean over seeds)")
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    for r in results["runs"]:
        if r["seed"] == results["config"]["seeds"][0]:
            audit_plot(r["monitor"], out / "audit" / r["name"], title=r["name"])
    return True
