"""``python -m bench --plot FILE``: PNG charts of a results file under docs/ (one series per provider)."""

from __future__ import annotations

from pathlib import Path

from .measure import slug
from .results import Results


def plot(path: Path, out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit("plotting needs matplotlib: pip install -e '.[bench]'") from error

    results = Results.load(path)
    device = results.meta["device"]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for case in results.meta["cases"]:
        rows = [r for r in results.rows if r.case == case and r.status == "ok" and r.ms is not None]
        if not rows:
            continue
        shapes = sorted({(r.tokens, r.vocab, r.dtype) for r in rows})
        known = list(results.meta["providers"]) + list(results.meta.get("linear_providers", []))
        providers = [p for p in dict.fromkeys(known) if any(r.provider == p for r in rows)]
        labels = [f"N={n}\nV={v}\n{d}" for n, v, d in shapes]
        panels = [(mode, metric, ylabel) for mode, metric, ylabel in [
            ("fwd", "ms", "forward: median ms"), ("fwd+bwd", "ms", "forward + backward: median ms"),
            ("fwd+bwd", "peak_extra_mib", "fwd + bwd: peak extra MiB")]
            if any(r.mode == mode and getattr(r, metric) for r in rows)]  # the fused-linear suite times fwd+bwd only
        fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.4 * len(shapes) + 3), 3.7 * len(panels)),
                                 constrained_layout=True, squeeze=False)
        axes = axes[:, 0]
        for ax, (mode, metric, ylabel) in zip(axes, panels, strict=True):
            width = 0.8 / max(1, len(providers))
            for k, provider in enumerate(providers):
                values = []
                for shape in shapes:
                    match = [getattr(r, metric) for r in rows
                             if r.provider == provider and r.mode == mode and (r.tokens, r.vocab, r.dtype) == shape]
                    values.append(match[0] if match and match[0] is not None else float("nan"))
                ax.bar([i + k * width for i in range(len(shapes))], values, width, label=provider)
            ax.set_xticks([i + width * (len(providers) - 1) / 2 for i in range(len(shapes))], labels, fontsize=8)
            ax.set_ylabel(ylabel)
            ax.set_yscale("log")
            ax.grid(axis="y", alpha=0.3)
        axes[0].legend(ncols=min(len(providers), 6), fontsize=8)
        fig.suptitle(f"{case}: {results.meta['cases'][case]}\n{device}, {results.meta['date']}", fontsize=10)
        target = out_dir / f"bench-{slug(device)}-{case}.png"
        fig.savefig(target, dpi=110)
        plt.close(fig)
        written.append(target)
    return written
