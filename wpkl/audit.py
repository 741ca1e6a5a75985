"""Position-bias audit: where along the response the loss comes from, and how weighting moves it.

    monitor = wpkl.audit.PositionBiasMonitor()
    loss, stats = wpkl.weighted_kl_loss(..., return_stats=True)
    monitor.update(stats)            # every step: on-device accumulation, no host sync
    print(monitor.format_table())    # when you want to look (this syncs)
    monitor.save("run/position_bias.pt")   # then: wpkl audit run/position_bias.pt --out run/audit

Positions are bucketed on a log scale: [0, 1), [1, 2), [2, 4), [4, 8), ... The last bucket also takes every
position beyond it. Per bucket it accumulates token counts and sums of the divergence D, the weight w, the
teacher confidence, both entropies, and of D and w * D, so that each bucket's share of the loss can be read
under uniform weighting (sum D) and under the active weighting (sum w D). Buckets widen along the response,
so the plots show that share per position (share / the bucket's width; the last bucket ends at the largest
position seen). Per step it keeps each bucket's divergence sum and count for a position x step heatmap; updates
with the same ``step`` (micro-batches of one optimizer step) add up into one column. Tokens whose teacher
statistics are unknown (NaN, e.g. "sampled" with teacher_logprobs) count in every column but those.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .stats import TokenStats

# The per-bucket sums, in column order.
COLUMNS = ("tokens", "divergence", "weight", "teacher_confidence", "teacher_entropy", "student_entropy",
           "weighted_divergence", "confidence_tokens")


def bucket_edges(num_buckets: int) -> list[float]:
    """Lower edges: 0, 1, 2, 4, ..., 2**(num_buckets - 2)."""
    return [0.0] + [float(2**k) for k in range(num_buckets - 1)]


def bucket_of(position: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """0 for position < 1, else floor(log2(position)) + 1, capped at the last bucket."""
    position = position.float()
    index = torch.where(position < 1, 0.0, torch.floor(torch.log2(position.clamp_min(1))) + 1)
    return index.clamp(max=num_buckets - 1).long()


class PositionBiasMonitor:
    def __init__(self, num_buckets: int = 16, keep_steps: bool = True):
        if num_buckets < 2:
            raise ValueError(f"num_buckets must be >= 2, got {num_buckets}")
        self.num_buckets = num_buckets
        self.keep_steps = keep_steps
        self.totals: torch.Tensor | None = None  # [num_buckets, len(COLUMNS)] float64
        self.max_position: torch.Tensor | None = None  # the largest valid position seen (a device scalar)
        self.steps: list[int] = []
        self.step_sums: list[torch.Tensor] = []  # per step: [2, num_buckets] (divergence sum, token count)

    def update(self, stats: TokenStats, step: int | None = None) -> None:
        """Accumulate one batch's TokenStats. Runs on the stats' device without a host sync.

        ``step``: the training step the batch belongs to (default: one more than the last update's). Several
        updates with the same step (gradient-accumulation micro-batches) add up into that step's column.
        """
        valid = stats.mask.reshape(-1)
        div = stats.divergence.reshape(-1).double()
        weight = stats.weight.reshape(-1).double()
        conf = stats.teacher_confidence.reshape(-1).double()
        known = valid & ~torch.isnan(conf)
        columns = torch.stack([
            valid.double(),
            div,
            weight,
            torch.where(known, conf, 0.0),
            torch.where(known, stats.teacher_entropy.reshape(-1).double(), 0.0),
            stats.student_entropy.reshape(-1).double(),
            weight * div,
            known.double(),
        ], dim=1) * valid.double().unsqueeze(1)
        # A one-hot matmul instead of index_add_: deterministic on every device (no atomics).
        one_hot = torch.nn.functional.one_hot(bucket_of(stats.position.reshape(-1), self.num_buckets),
                                              self.num_buckets).double()
        sums = one_hot.T @ columns
        self.totals = sums if self.totals is None else self.totals + sums
        largest = torch.where(valid, stats.position.reshape(-1).double(), -1.0).amax() if valid.numel() else None
        if largest is not None:
            self.max_position = largest if self.max_position is None else torch.maximum(self.max_position, largest)
        if self.keep_steps:
            step = (self.steps[-1] + 1 if self.steps else 0) if step is None else int(step)
            column = torch.stack([sums[:, 1], sums[:, 0]])
            if step in self.steps:
                index = self.steps.index(step)
                self.step_sums[index] = self.step_sums[index] + column
            else:
                self.steps.append(step)
                self.step_sums.append(column)

    def summary(self) -> list[dict]:
        """One dict per bucket that saw tokens: position range, token count, means and loss shares."""
        if self.totals is None:
            return []
        totals = self.totals.cpu()
        edges = bucket_edges(self.num_buckets)
        col = {name: totals[:, i] for i, name in enumerate(COLUMNS)}
        all_div, all_weighted = col["divergence"].sum().item(), col["weighted_divergence"].sum().item()
        last = None if self.max_position is None else self.max_position.item()
        rows = []
        for b in range(self.num_buckets):
            n = col["tokens"][b].item()
            if n == 0:
                continue
            known = col["confidence_tokens"][b].item()
            upper = edges[b + 1] if b + 1 < self.num_buckets else math.inf
            # Positions the bucket spans: the last one up to the largest position seen.
            width = upper - edges[b] if math.isfinite(upper) else max((last or edges[b]) + 1 - edges[b], 1.0)
            rows.append(dict(
                bucket=b, start=edges[b], end=upper, width=width, tokens=int(n),
                mean_divergence=col["divergence"][b].item() / n,
                mean_weight=col["weight"][b].item() / n,
                teacher_confidence=col["teacher_confidence"][b].item() / known if known else math.nan,
                teacher_entropy=col["teacher_entropy"][b].item() / known if known else math.nan,
                student_entropy=col["student_entropy"][b].item() / n,
                share_uniform=col["divergence"][b].item() / all_div if all_div else math.nan,
                share_weighted=col["weighted_divergence"][b].item() / all_weighted if all_weighted else math.nan,
            ))
        return rows

    def format_table(self) -> str:
        head = ("positions", "tokens", "mean D", "mean w", "teacher conf", "teacher H", "student H",
                "share (uniform)", "share (weighted)")
        lines = [" | ".join(head), " | ".join("-" * len(h) for h in head)]
        for r in self.summary():
            end = "inf" if math.isinf(r["end"]) else f"{r['end']:.0f}"
            lines.append(" | ".join([
                f"[{r['start']:.0f}, {end})", str(r["tokens"]), f"{r['mean_divergence']:.4f}",
                f"{r['mean_weight']:.3f}", f"{r['teacher_confidence']:.3f}", f"{r['teacher_entropy']:.3f}",
                f"{r['student_entropy']:.3f}", f"{100 * r['share_uniform']:.1f}%", f"{100 * r['share_weighted']:.1f}%",
            ]))
        return "\n".join(lines)

    def heatmap(self) -> tuple[list[int], torch.Tensor]:
        """(steps, [num_steps, num_buckets] mean divergence; NaN where a bucket saw no token that step)."""
        if not self.step_sums:
            return [], torch.empty(0, self.num_buckets)
        sums = torch.stack(self.step_sums).cpu()  # [steps, 2, buckets]
        div, count = sums[:, 0], sums[:, 1]
        return list(self.steps), torch.where(count > 0, div / count.clamp_min(1), torch.nan)

    def state_dict(self) -> dict:
        return dict(num_buckets=self.num_buckets, keep_steps=self.keep_steps,
                    totals=None if self.totals is None else self.totals.cpu(), steps=list(self.steps),
                    max_position=None if self.max_position is None else self.max_position.cpu(),
                    step_sums=torch.stack(self.step_sums).cpu() if self.step_sums else None)

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), path)
        return path

    @classmethod
    def load(cls, path) -> "PositionBiasMonitor":
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        monitor = cls(state["num_buckets"], state["keep_steps"])
        monitor.totals = state["totals"]
        monitor.max_position = state.get("max_position")
        monitor.steps = list(state["steps"])
        monitor.step_sums = list(state["step_sums"].unbind(0)) if state["step_sums"] is not None else []
        return monitor


def plot(monitor: PositionBiasMonitor, out_dir, title: str = "") -> list[Path]:
    """PNG plots: divergence and teacher confidence vs position, loss share per bucket (uniform vs weighted),
    and a divergence heatmap over position bucket x step. Needs matplotlib (``pip install wpkl[plot]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = monitor.summary()
    labels = [f"{r['start']:.0f}" for r in rows]
    x = list(range(len(rows)))
    written = []

    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    ax.plot(x, [r["mean_divergence"] for r in rows], "o-", label="mean divergence D")
    ax.set_xlabel("position bucket (lower edge, log scale)")
    ax.set_ylabel("mean divergence")
    ax.set_xticks(x, labels)
    ax2 = ax.twinx()
    ax2.plot(x, [r["teacher_confidence"] for r in rows], "s--", color="tab:orange", label="teacher confidence")
    ax2.set_ylabel("teacher confidence max q")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    # Outside the axes: inside, a marker can always sit under it.
    fig.legend(handles, [h.get_label() for h in handles], loc="outside lower center", ncols=2, fontsize=8)
    ax.set_title(f"{title} divergence and teacher confidence by position".strip())
    written.append(out_dir / "divergence_by_position.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    # Per position, not per bucket: log-spaced buckets widen, and a wide bucket's share grows with its width alone.
    bar = 0.4
    ax.bar([i - bar / 2 for i in x], [100 * r["share_uniform"] / r["width"] for r in rows], bar, label="uniform")
    ax.bar([i + bar / 2 for i in x], [100 * r["share_weighted"] / r["width"] for r in rows], bar, label="weighted")
    ax.set_xticks(x, labels)
    ax.set_xlabel("position bucket (lower edge)")
    ax.set_ylabel("share of the loss per position (%)")
    ax.legend()
    ax.set_title(f"{title} loss share per position (bucket share / bucket width)".strip())
    written.append(out_dir / "loss_share_by_position.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    steps, heat = monitor.heatmap()
    if steps:
        used = [b for b in range(monitor.num_buckets) if not torch.isnan(heat[:, b]).all()]
        fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
        image = ax.imshow(heat[:, used].T.numpy(), aspect="auto", origin="lower", interpolation="nearest",
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(used) - 0.5))
        ax.set_yticks(range(len(used)), [f"{bucket_edges(monitor.num_buckets)[b]:.0f}" for b in used])
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("training step")
        ax.set_ylabel("position bucket")
        fig.colorbar(image, ax=ax, label="mean divergence")
        ax.set_title(f"{title} divergence by position and step".strip())
        written.append(out_dir / "divergence_heatmap.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
