"""bench/sharded.py's rows and their Markdown table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Row:
    case: str
    tokens: int
    vocab: int
    dtype: str
    layout: str  # "1 device" or e.g. "2 ranks on 1 GPU"
    ranks: int
    status: str  # "ok", "skipped", "error", "mismatch"
    ms: float | None = None  # single device: its median; sharded: the slowest rank's median
    ms_p20: float | None = None
    ms_p80: float | None = None
    ms_per_rank: list = field(default_factory=list)
    peak_extra_mib_per_rank: list = field(default_factory=list)
    loss: float | None = None
    note: str = ""


def markdown(meta: dict, rows: list[Row], title: str = "Sharded loss", split: str | None = None) -> str:
    """``split``: how the rows with several ranks divide the work (default: the vocabulary's V / R)."""
    fmt = lambda x, spec: "" if x is None else format(x, spec)  # noqa: E731
    split = split or f"the same total vocabulary V, each rank V / {meta['ranks']} in the sharded rows"
    lines = [f"# {title}: {meta['layout']} vs 1 device ({meta['device']}, {meta['date']})", "",
             f"Forward + backward of `weighted_kl_loss` on materialized logits, backend `{meta['wpkl_backend']}`, "
             f"process group `{meta['process_group_backend']}`; {split}. Several ranks' time: the slowest rank's "
             "median.", ""]
    if meta["notice"]:
        lines += [f"**{meta['notice']}**", ""]
    lines += ["| shape | case | layout | median ms | p20-p80 ms | x 1 device | peak extra MiB per rank | note |",
              "|---|---|---|---|---|---|---|---|"]
    single = {(r.case, r.tokens, r.vocab, r.dtype): r.ms for r in rows if r.ranks == 1 and r.ms}
    for r in rows:
        base = single.get((r.case, r.tokens, r.vocab, r.dtype))
        ratio = f"{r.ms / base:.2f}x" if r.ranks > 1 and base and r.ms else ""
        spread = f"{r.ms_p20:.3f}-{r.ms_p80:.3f}" if r.ms_p20 is not None else ""
        peaks = ", ".join(fmt(p, ".1f") for p in r.peak_extra_mib_per_rank)
        note = r.note if r.status == "ok" else f"{r.status}: {r.note}".rstrip(": ")
        lines.append(f"| N={r.tokens} V={r.vocab} {r.dtype} | {r.case} | {r.layout} | {fmt(r.ms, '.3f')} | {spread} | "
                     f"{ratio} | {peaks} | {note} |")
    return "\n".join(lines) + "\n"


def write(out: Path, prefix: str, meta: dict, rows: list[Row], table: str) -> Path:
    """``<prefix>-<device>-<date>.json`` (meta and rows) and ``.md`` (the table) under ``out``; prints the table."""
    from bench.measure import slug

    target = out / f"{prefix}-{slug(meta['device'])}-{meta['date']}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    target.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {target} and {target.with_suffix('.md')}", flush=True)
    return target
