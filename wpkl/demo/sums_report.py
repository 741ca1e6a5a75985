"""The running-sum task's report: the accuracy table with paired differences to uniform (and, with an IW-OPD arm,
the other arms' paired differences to it), per-position tables, learning curves, per-position and difference
plots, and the position-bias audit plots."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from .sums_experiment import (METRICS, ORACLE, POSITION_LABELS, POSITION_METRICS, comparisons, position_means,
                              run_metric, runs_of, updates_to)
from .sums_plots import plots

TEACHER_TEXT = {
    "cons": "continues consistently from the student's wrong digit (what a trained teacher does: the null control)",
    "conf": "is uniform over the digits after a wrong prefix (a confused teacher)",
    "rec": "insists on the true sum after a wrong prefix (conflicts with the student's own prefix)",
    "trained": "is the trained teacher itself (no wrapper)",
}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, sd


def _fmt(ms: tuple[float, float], digits: int, seeds: int) -> str:
    if math.isnan(ms[0]):
        return "–"
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}" if seeds > 1 else f"{ms[0]:.{digits}f}"


def _fmt_diff(row: dict) -> str:
    if math.isnan(row["ci_low"]):
        return f"{row['mean']:+.3f}"
    return f"{row['mean']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"


def iw_opd_baseline(results: dict) -> str | None:
    """The first IW-OPD arm of the run (``iw_opd_<gamma>``), the second baseline every other arm is paired with."""
    return next((name for name in results["config"]["weightings"] if name.startswith("iw_opd")), None)


def iw_opd_lines(results: dict) -> list[str]:
    """The table of every other arm's paired difference to the IW-OPD arm (AUC of the sampled and greedy
    accuracy, the same seeds), Holm-corrected across the arms of each teacher; none without such an arm."""
    baseline = iw_opd_baseline(results)
    if baseline is None or len(results["config"]["weightings"]) < 2:
        return []
    compared = {(c["teacher"], c["weighting"], c["metric"]): c for c in comparisons(results, baseline)}
    lines = ["", f"Paired against IW-OPD (`{baseline}`), the same seeds: Δ = arm - {baseline}, 'better' counts "
             f"seeds where the arm beats it, p Holm-corrected across the arms of each teacher.", "",
             f"| teacher | weighting | Δ AUC sampled vs {baseline} [95% CI] | better | p (Holm) | Δ AUC greedy [95% CI] |",
             "|---|---|---|---|---|---|"]
    for mode in results["config"]["teachers"]:
        for name in results["config"]["weightings"]:
            primary, greedy = (compared.get((mode, name, key)) for key in ("auc_sampled", "auc_greedy"))
            if primary is None or primary["n"] == 0:
                continue
            p = "–" if math.isnan(primary["p_holm"]) else f"{primary['p_holm']:.2g}"
            lines.append(f"| {mode} | {name} | {_fmt_diff(primary)} | {primary['positive']}/{primary['n']} | {p} | "
                         f"{_fmt_diff(greedy)} |")
    return lines


def table_rows(results: dict) -> list[dict]:
    """One row per teacher and weighting: means over seeds and the paired comparison of the primary metric."""
    cfg = results["config"]
    compared = {(c["teacher"], c["weighting"], c["metric"]): c for c in comparisons(results)}
    rows = []
    for mode in cfg["teachers"]:
        for name in cfg["weightings"]:
            runs = runs_of(results, mode, name)
            if not runs:
                continue
            threshold = cfg["threshold"]
            reached = {key: [u for u in (updates_to(r["curve"], key, threshold) for r in runs) if u is not None]
                       for key in ("greedy", "sampled")}
            rows.append(dict(
                teacher=mode, weighting=name, seeds=len(runs),
                final_sampled=_mean_sd([run_metric(r, "final_sampled") for r in runs]),
                final_greedy=_mean_sd([run_metric(r, "final_greedy") for r in runs]),
                auc_sampled=_mean_sd([r["auc_sampled"] for r in runs]),
                auc_greedy=_mean_sd([r["auc_greedy"] for r in runs]),
                updates={key: (_mean_sd(values), len(values)) for key, values in reached.items()},
                final_kl=_mean_sd([r["curve"][-1]["kl"] for r in runs]),
                vs_uniform={key: compared.get((mode, name, key)) for key, _ in METRICS},
            ))
    return rows


def _quarters(values: list[float]) -> list[float]:
    k = len(values)
    edges = [round(i * k / 4) for i in range(5)]
    return [sum(values[edges[i]:edges[i + 1]]) / max(edges[i + 1] - edges[i], 1) for i in range(4)]


def _not_reached(warm: list[dict]) -> str:
    missed = [w for w in warm if w["probe_step_error"] is None or w["probe_step_error"] > w["target"]]
    return f"; NOT reached within {missed[0]['steps']} steps for {len(missed)} seed(s)" if missed else ""


def _span(warm: list[dict], key: str) -> str:
    values = [w["teacher"][key] for w in warm if "teacher" in w]
    if not values:
        return "–"
    low, high = min(values), max(values)
    return f"{low:.1%}" if f"{low:.1%}" == f"{high:.1%}" else f"{low:.1%} to {high:.1%}"


def summary_markdown(results: dict, elapsed: float) -> str:
    """The report (works on results.json as loaded, too)."""
    cfg = results["config"]
    seeds = len(cfg["seeds"])
    k = cfg["k"]
    warm = list(results["warm_start"].values())
    teacher = results["teacher"]
    threshold = cfg["threshold"]
    lines = [
        f"# wpkl demo: on-policy distillation of a running sum (K = {k})",
        "",
        f"{seeds} seed(s) x {len(cfg['teachers'])} teacher(s) x {len(cfg['weightings'])} weighting(s); "
        f"{cfg['steps']} on-policy updates of {cfg['batch']} rollouts x {k} tokens, divergence {cfg['divergence']}, "
        f"device {cfg['device']}; {elapsed:.0f} s in all.",
        "",
        f"- Teacher: 2-layer relative-position transformer, trained {teacher['steps']} steps; on held-out prompts "
        f"greedy accuracy {teacher['greedy_accuracy']:.3f}, sampled per-step error {teacher['sampled_step_error']:.4f}.",
        f"- Student start (drift {cfg['drift']!r}): warm-started to a measured sampled per-step error of "
        f"{min(w['step_error'] for w in warm):.3f} to {max(w['step_error'] for w in warm):.3f} "
        f"(target <= {warm[0]['target']:.2f}{_not_reached(warm)}); {min(w['wrong_prefix'] for w in warm):.2f} to "
        f"{max(w['wrong_prefix'] for w in warm):.2f} of its response tokens follow a wrong prefix; sampled "
        f"accuracy {min(w['accuracy'] for w in warm):.2f} to {max(w['accuracy'] for w in warm):.2f}.",
        "- The trained teacher on the warm-started students' samples: after a wrong prefix its most likely digit is "
        f"the consistent one for {_span(warm, 'consistent_after_wrong')} of tokens and the true one for "
        f"{_span(warm, 'true_after_wrong')}; after a right prefix it is the true digit for "
        f"{_span(warm, 'true_after_right')}.",
        "- Teachers: " + "; ".join(f"`{m}` {TEACHER_TEXT[m]}" for m in cfg["teachers"]) + ". "
        + ("`cons`, `conf` and `rec` are built by construction: a wrapper over the trained teacher that knows the "
           "truth, with 0.99 on its target digit and identical on correct prefixes (the trained teacher's "
           "prediction there)." if set(cfg["teachers"]) - {"trained"} else ""),
        "",
        f"Accuracy of the final answer s_K on {cfg['eval_prompts']} held-out prompts, evaluated every "
        f"{cfg['eval_every']} updates: sampled (mean over {cfg['eval_samples']} samples per prompt) and greedy. "
        "AUC = mean accuracy over training (area under the curve / updates); updates to reach the threshold: mean "
        "over the seeds that reach it (0: already at the start). Mean ± sd over seeds. Δ = paired "
        "difference to uniform (same seed: same teacher, student start, prompts and sampling noise) with a 95% "
        "t-interval; 'better' counts seeds where the arm beats uniform; p: paired t-test, Holm-corrected across "
        "the arms of each teacher.",
        "",
        f"| teacher | weighting | sampled acc, final | greedy acc, final | AUC sampled | Δ AUC sampled vs uniform "
        f"[95% CI] | better | p (Holm) | Δ AUC greedy [95% CI] | updates to {threshold:.0%}, greedy | updates to "
        f"{threshold:.0%}, sampled | KL to teacher, final (secondary) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table_rows(results):
        primary, greedy = row["vs_uniform"]["auc_sampled"], row["vs_uniform"]["auc_greedy"]
        if primary is None:
            diff = better = p = greedy_diff = "–"
        else:
            diff, greedy_diff = _fmt_diff(primary), _fmt_diff(greedy)
            better = f"{primary['positive']}/{primary['n']}"
            p = "–" if math.isnan(primary["p_holm"]) else f"{primary['p_holm']:.2g}"
        updates = {key: "not reached" if n == 0 else f"{_fmt(ms, 0, n)} ({n}/{row['seeds']})"
                   for key, (ms, n) in row["updates"].items()}
        lines.append(
            f"| {row['teacher']} | {row['weighting']} | {_fmt(row['final_sampled'], 3, seeds)} | "
            f"{_fmt(row['final_greedy'], 3, seeds)} | {_fmt(row['auc_sampled'], 3, seeds)} | {diff} | {better} | {p} | "
            f"{greedy_diff} | {updates['greedy']} | {updates['sampled']} | {_fmt(row['final_kl'], 3, seeds)} |")

    lines += iw_opd_lines(results)
    lines += ["", "Per position along the response (quarters of the K positions), on held-out student samples, before "
              "training and after it, mean over seeds:", "",
              "| teacher | weighting | when | " + " | ".join(POSITION_LABELS[m] for m in POSITION_METRICS[:-1]) + " |",
              "|---|---|---|" + "---|" * (len(POSITION_METRICS) - 1)]
    for mode in cfg["teachers"]:
        for name, when in [(cfg["weightings"][0], "initial")] + [(name, "final") for name in cfg["weightings"]]:
            means = position_means(runs_of(results, mode, name), when)
            if not means:
                continue
            cells = [" / ".join(f"{v:.2f}" for v in _quarters(means[m])) for m in POSITION_METRICS[:-1]]
            label = "(start)" if when == "initial" else name
            lines.append(f"| {mode} | {label} | {'before' if when == 'initial' else 'after'} | " + " | ".join(cells)
                         + " |")
    lines += ["", "Cells: quarter 1 / 2 / 3 / 4 of the response. 'wrong prefix': share of tokens after the student's "
              "first wrong digit; 'teacher target ≠ consistent': share of tokens where the teacher's most likely "
              "digit (none for a uniform teacher) is not the correct step from the student's own previous digit."]
    if ORACLE in cfg["weightings"] and len([m for m in cfg["teachers"] if m != "trained"]) > 1:
        lines += ["", "The oracle keeps only tokens whose prefix is right, where the `cons`, `conf` and `rec` teachers "
                  "coincide, so its runs are the same under each of them (a check of the construction)."]
    return "\n".join(lines) + "\n"


def compact(results: dict, elapsed: float) -> dict:
    """What docs/experiments keeps: the config, the teacher and warm starts, per run its curve (without
    per-position data) and summary numbers, per teacher and weighting the per-position means, and the paired
    comparisons."""
    cfg = results["config"]
    runs = []
    for r in results["runs"]:
        curve = [{k: round(v, 5) if isinstance(v, float) else v for k, v in point.items() if k != "positions"}
                 for point in r["curve"]]
        runs.append(dict(teacher=r["teacher"], weighting=r["name"], seed=r["seed"], curve=curve,
                         auc_sampled=round(r["auc_sampled"], 5), auc_greedy=round(r["auc_greedy"], 5),
                         updates_to_threshold={key: updates_to(r["curve"], key, cfg["threshold"])
                                               for key in ("greedy", "sampled")},
                         seconds=round(r["seconds"], 1)))
    positions = {}
    for mode in cfg["teachers"]:
        for name in cfg["weightings"]:
            group = runs_of(results, mode, name)
            positions[f"{mode}/{name}"] = {when: {m: [round(v, 4) for v in vs] for m, vs in
                                                   position_means(group, when).items()}
                                            for when in ("initial", "final", "training")}
    def rounded(rows):
        return [{k: round(v, 6) if isinstance(v, float) else v for k, v in c.items()} for c in rows]

    baseline = iw_opd_baseline(results)
    extra = {} if baseline is None else {"comparisons_vs_iw_opd": rounded(comparisons(results, baseline))}
    return dict(task="sums", config=cfg, teacher=results["teacher"], warm_start=results["warm_start"], runs=runs,
                positions=positions, comparisons=rounded(comparisons(results)), **extra, seconds=round(elapsed))


def write_report(results: dict, out: Path, elapsed: float) -> bool:
    """Write the report; True when the plots were written too (they need matplotlib)."""
    (out / "summary.md").write_text(summary_markdown(results, elapsed))
    baseline = iw_opd_baseline(results)
    extra = {} if baseline is None else {"comparisons_vs_iw_opd": comparisons(results, baseline)}
    serializable = dict(results, runs=[{k: v for k, v in r.items() if k != "monitor"} for r in results["runs"]],
                        comparisons=comparisons(results), **extra, seconds=elapsed)
    (out / "results.json").write_text(json.dumps(serializable, indent=1, default=str))
    for r in results["runs"]:
        r["monitor"].save(out / "runs" / r["teacher"] / r["name"] / f"seed{r['seed']}" / "position_bias.pt")
    return plots(results, out)


def merge(parts: list[dict]) -> dict:
    """One result from runs of the same configuration on different seeds (``wpkl demo --first-seed``)."""
    first = parts[0]
    ignore = ("seeds", "device")
    for other in parts[1:]:
        a = {k: v for k, v in first["config"].items() if k not in ignore}
        b = {k: v for k, v in other["config"].items() if k not in ignore}
        if a != b:
            raise ValueError(f"cannot merge results of different configurations: {sorted(k for k in a if a[k] != b.get(k))}")
        if other["teacher"] != first["teacher"]:
            raise ValueError("cannot merge results with different teachers")
    seeds = [seed for part in parts for seed in part["config"]["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"a seed appears twice: {sorted(seeds)}")
    warm = {str(k): v for part in parts for k, v in part["warm_start"].items()}
    return dict(task="sums", config=dict(first["config"], seeds=sorted(seeds)), teacher=first["teacher"],
                warm_start=warm, runs=[r for part in parts for r in part["runs"]],
                seconds=sum(part.get("seconds", 0) for part in parts))


def main(argv=None) -> int:
    """``python -m wpkl.demo.sums_report --out DIR results.json ...``: merge per-seed results and write the report
    (summary.md, summary.json: the compact results, and the plots)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m wpkl.demo.sums_report", description=main.__doc__)
    parser.add_argument("results", nargs="+", help="results.json files of `wpkl demo` (the sums task)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--prefix", default="", help="prefix of the written file names")
    args = parser.parse_args(argv)
    results = merge([json.loads(Path(p).read_text()) for p in args.results])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.prefix}summary.md").write_text(summary_markdown(results, results["seconds"]))
    # One line per run: small, and still readable line by line.
    data = compact(results, results["seconds"])
    text = json.dumps({k: v for k, v in data.items() if k != "runs"}, separators=(",", ":"))
    runs = ",\n".join(json.dumps(r, separators=(",", ":")) for r in data["runs"])
    (out / f"{args.prefix}summary.json").write_text(text[:-1] + ',"runs":[\n' + runs + "\n]}\n")
    if args.prefix:
        tmp = out / f".{args.prefix}plots"
        tmp.mkdir(exist_ok=True)
        plots(results, tmp, audit=False, dpi=80)
        for png in tmp.glob("*.png"):
            png.replace(out / f"{args.prefix}{png.name}")
        tmp.rmdir()
    else:
        plots(results, out, audit=False, dpi=80)
    print((out / f"{args.prefix}summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
