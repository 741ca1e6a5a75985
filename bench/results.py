"""Results: rows kept as data (JSON) and rendered as a markdown table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Row:
    provider: str
    case: str
    tokens: int
    vocab: int
    dtype: str
    mode: str  # "fwd" or "fwd+bwd"
    status: str  # "ok", "skipped", "oom", "error", "smoke-ok", "smoke-failed"
    ms: float | None = None
    ms_p20: float | None = None
    ms_p80: float | None = None
    gbps: float | None = None  # minimal bytes / median time
    copy_fraction: float | None = None  # gbps / the device's copy bandwidth measured in the same run
    peak_extra_mib: float | None = None
    note: str = ""
    hidden: int | None = None  # the fused-linear suite's H
    tflops: float | None = None  # the fused-linear suite: the four GEMMs' work (8 N V H flops) / median time


@dataclass
class Results:
    meta: dict
    rows: list[Row] = field(default_factory=list)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"meta": self.meta, "rows": [asdict(r) for r in self.rows]}, indent=1))
        path.with_suffix(".md").write_text(self.markdown())

    @classmethod
    def load(cls, path: Path) -> "Results":
        data = json.loads(Path(path).read_text())
        return cls(data["meta"], [Row(**r) for r in data["rows"]])

    def _linear_table(self, case: str, description: str, rows: list[Row]) -> list[str]:
        lines = [f"## {case}: {description}", "",
                 "Time relative to the bare GEMMs (column `x GEMMs`): the fused path's target is 1.15x or less.", "",
                 "| shape | provider | median ms | GEMM-work TFLOP/s | peak extra MiB | x GEMMs | note |",
                 "|---|---|---|---|---|---|---|"]
        gemms = {(r.tokens, r.hidden, r.vocab, r.dtype): r.ms for r in self.rows if r.provider == "gemms" and r.ms}
        for r in rows:
            base = gemms.get((r.tokens, r.hidden, r.vocab, r.dtype))
            ratio = f"{r.ms / base:.2f}x" if base and r.ms else ""
            fmt = lambda x, spec: "" if x is None else format(x, spec)  # noqa: E731
            note = r.note if r.status == "ok" else f"{r.status}: {r.note}".rstrip(": ")
            lines.append(f"| N={r.tokens} H={r.hidden} V={r.vocab} {r.dtype} | {r.provider} | {fmt(r.ms, '.3f')} | "
                         f"{fmt(r.tflops, '.3g')} | {fmt(r.peak_extra_mib, '.1f')} | {ratio} | {note} |")
        return lines + [""]

    def torch_path_ratios(self) -> list[tuple[str, float]]:
        """(case and shape, wpkl-torch ms / eager ms) for every fwd+bwd pair measured in this run."""
        timed = {(r.provider, r.case, r.tokens, r.vocab, r.dtype): r.ms for r in self.rows
                 if r.mode == "fwd+bwd" and r.status == "ok" and r.ms}
        out = []
        for (provider, case, n, v, dtype), ms in timed.items():
            eager = timed.get(("eager", case, n, v, dtype))
            if provider == "wpkl-torch" and eager:
                out.append((f"{case} N={n} V={v} {dtype}", ms / eager))
        return out

    def markdown(self) -> str:
        m = self.meta
        lines = [
            f"# wpkl benchmark: {m['device']}",
            "",
            f"- date: {m['date']}; command: `{m['command']}`",
            f"- versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}",
            f"- timer: {m['timer']}; memory: {m['memory_method']}",
            f"- copy bandwidth measured in this run: {m['copy_gbps']:.1f} GB/s",
            "- GB/s uses the minimal-bytes model: each [N, V] input read once, each [N, V] output written once",
            "",
        ]
        if m.get("notice"):
            lines += [f"**{m['notice']}**", ""]
        ratios = self.torch_path_ratios()
        if ratios:
            lines += ["wpkl's torch path against eager torch (fwd+bwd time ratio, below 1 is faster):", ""]
            lines += [f"- {label}: {ratio:.2f}" for label, ratio in ratios] + [""]
        for case, description in m["cases"].items():
            rows = [r for r in self.rows if r.case == case]
            if not rows:
                continue
            if case.startswith("linear-"):
                lines += self._linear_table(case, description, rows)
                continue
            lines += [f"## {case}: {description}", "",
                      "| shape | mode | provider | median ms | GB/s | % of copy BW | peak extra MiB | vs eager | note |",
                      "|---|---|---|---|---|---|---|---|---|"]
            eager = {(r.tokens, r.vocab, r.dtype, r.mode): r.ms for r in rows if r.provider == "eager" and r.ms}
            for r in rows:
                base = eager.get((r.tokens, r.vocab, r.dtype, r.mode))
                speedup = f"{base / r.ms:.2f}x" if base and r.ms else ""
                fmt = lambda x, spec: "" if x is None else format(x, spec)  # noqa: E731
                note = r.note if r.status in ("ok",) else f"{r.status}: {r.note}".rstrip(": ")
                lines.append(
                    f"| N={r.tokens} V={r.vocab} {r.dtype} | {r.mode} | {r.provider} | {fmt(r.ms, '.3f')} | "
                    f"{fmt(r.gbps, '.1f')} | {fmt(None if r.copy_fraction is None else 100 * r.copy_fraction, '.0f')} | "
                    f"{fmt(r.peak_extra_mib, '.1f')} | {speedup} | {note} |"
                )
            lines.append("")
        return "\n".join(lines)
