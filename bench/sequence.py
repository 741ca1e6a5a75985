"""The sequence-parallel loss (``sequence_group=``) against one rank, at the same batch: its extra time and the
bytes it communicates.

    python -m torch.distributed.run --standalone --nproc_per_node R bench/sequence.py \\
        [--device cuda|cpu] [--shapes NxV:dtype ...] [--cases uniform iw_opd ...] [--out DIR] [--budget S]

For each shape ([B, T] sequences of bench/cases.py's ``Shape.batch``, T a multiple of 2R) and case, forward +
backward of ``wpkl.weighted_kl_loss`` on materialized logits (the Triton backend on CUDA, torch on the CPU):

- "1 rank, whole batch": rank 0 alone with the whole [B, T, V] batch (the others wait at a barrier);
- "R ranks, own chunks alone": every rank its Megatron context-parallel slice [B, T / R, V]
  (``wpkl.distributed.megatron_bshd``) with no group: the work a rank does, with weights that are wrong for
  sequence-global weightings (the ideal time of a split);
- "R ranks, sequence_group": the same slices with ``sequence_group``: exact weights. Its time over the row
  above is the cost of the sequence-parallel call (the agreement's all-gather and host read, the layout's
  all-reduce and the whole-batch weights);
- "R ranks, sequence_group + bounds": the same with ``sequence_bounds=(B, T)``: the all-reduce alone, no host
  sync.

Bytes: the tensors each rank hands to the collectives in one call, recorded: the all-gathers' (each rank sends
this, and receives R - 1 times as much) and the all-reduces' (a ring sends about twice this per rank). Timing and memory as bench/sharded.py (whose harness this reuses). Writes
``sequence-<device>-<date>.json`` and ``.md`` to ``--out``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench import sharded  # noqa: E402
from bench.sharded_report import Row  # noqa: E402

DEFAULT_SHAPES = {"cuda": ["4096x128256", "16384x151936"], "cpu": ["512x4096:float32"]}
CASE_NAMES = ("uniform", "iw_opd", "combined")


def sent_bytes(fn) -> dict[str, int]:
    """Bytes of the tensors this rank hands to each collective in one call of ``fn``, by collective."""
    originals, total = {"all_gather": dist.all_gather, "all_reduce": dist.all_reduce}, {}

    def recorder(name):
        def recording(*args, **kwargs):
            tensor = args[1] if name == "all_gather" else args[0]
            total[name] = total.get(name, 0) + tensor.numel() * tensor.element_size()
            return originals[name](*args, **kwargs)
        return recording

    for name in originals:
        setattr(dist, name, recorder(name))
    try:
        fn()
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    return total


class SequenceBench(sharded.Bench):
    def inputs(self, shape, part):
        """The case's whole batch ([B, T, V], the same on every rank) or rank ``part``'s slice of it."""
        from wpkl.distributed import megatron_bshd

        B, T = shape.batch
        dtype = getattr(torch, shape.dtype)
        gen = torch.Generator(device=self.device).manual_seed(7)
        student = torch.randn(B, T, shape.vocab, generator=gen, device=self.device, dtype=dtype).mul_(2)
        teacher = torch.randn(B, T, shape.vocab, generator=gen, device=self.device, dtype=dtype).mul_(2)
        tokens = torch.randint(0, shape.vocab, (B, T), generator=gen, device=self.device)
        positions = torch.arange(T, device=self.device).expand(B, T)
        if part is None:
            return student, teacher, tokens, positions
        mine = megatron_bshd(B, T, self.world, part)
        return (*(mine.take(x) for x in (student, teacher, tokens)), mine.positions.to(self.device))

    def call(self, case, student, teacher, tokens, positions, group, bounds=None):
        import wpkl

        def fn():
            loss = wpkl.weighted_kl_loss(student, teacher, weighting=case.weighting, divergence=case.divergence,
                                         tokens=tokens, positions=positions, backend=self.wpkl_backend,
                                         sequence_group=group, sequence_bounds=bounds)
            loss.backward()
            return loss

        return fn

    def measure_call(self, case, shape, layout, data, group, collective, bounds=None):
        self.loss_fn = lambda case_, student, teacher, mask, _group: self.call(case_, student, *data[1:], group,
                                                                              bounds)
        row = self.measure(case, shape, data[0], data[1], None, sharded=collective)
        row.layout, row.ranks = layout, self.world if collective else 1
        return row

    def run(self, shapes, cases) -> list[Row]:
        from bench.cases import CASES

        rows = []
        for shape in shapes:
            B, T = shape.batch
            if T % (2 * self.world):
                rows.append(Row("*", shape.tokens, shape.vocab, shape.dtype, "-", self.world, "skipped",
                                note=f"T = {T} is not a multiple of 2 x {self.world} ranks"))
                continue
            for name in cases:
                case = CASES[name]
                if self.budget_spent():
                    rows.append(Row(name, shape.tokens, shape.vocab, shape.dtype, "-", self.world, "skipped",
                                    note=f"time budget of {self.args.budget:.0f} s spent"))
                    continue
                whole = None
                if self.rank == 0:
                    whole = self.measure_call(case, shape, "1 rank, whole batch", self.inputs(shape, None), None,
                                              collective=False)
                self.barrier()
                mine = self.inputs(shape, self.rank)
                alone = self.measure_call(case, shape, f"{self.world} ranks, own chunks alone", mine, None, True)
                grouped = [self.measure_call(case, shape, f"{self.world} ranks, sequence_group", mine, self.group,
                                             True),
                           self.measure_call(case, shape, f"{self.world} ranks, sequence_group + bounds", mine,
                                             self.group, True, bounds=(B, T))]
                for row, bounds in zip(grouped, (None, (B, T)), strict=True):
                    mine[0].requires_grad_(True)
                    sent = sent_bytes(self.call(case, *mine, self.group, bounds))
                    mine[0].requires_grad_(False)
                    mine[0].grad = None
                    if row.loss is None:
                        continue
                    total = torch.tensor([row.loss], dtype=torch.float64)
                    dist.all_reduce(total, group=self.group)  # the ranks' shares: the whole batch's loss
                    row.note = ", ".join(f"{name} {n / 1024:.1f} KiB" for name, n in sorted(sent.items()))
                    row.note += f" per rank per call; loss {float(total):.6g}"
                    if whole is not None and whole.loss is not None:
                        tol = 1e-4 if shape.dtype == "float32" else 2e-2
                        if abs(float(total) - whole.loss) > tol * max(1.0, abs(whole.loss)):
                            row.status = "mismatch"
                        row.note += f" (1 rank {whole.loss:.6g})"
                    if alone.ms and row.ms:
                        row.note += f"; +{row.ms - alone.ms:.3f} ms over its chunks alone"
                if self.rank == 0:
                    rows += [whole, alone, *grouped]
                self.barrier()
        return rows


def main(argv=None) -> int:
    args = sharded.parse_args(argv, "bench/sequence.py", __doc__, CASE_NAMES)
    from bench.cases import parse_shape
    from bench.sharded_report import markdown, write

    bench = SequenceBench(args)
    shapes = [parse_shape(s) for s in (args.shapes or DEFAULT_SHAPES["cuda" if bench.cuda else "cpu"])]
    failed = torch.tensor([0], dtype=torch.int64)
    try:
        rows = bench.run(shapes, args.cases)
        if bench.rank == 0:
            meta = bench.meta(shapes)
            meta["command"] = f"torchrun --nproc_per_node {bench.world} bench/sequence.py " + " ".join(sys.argv[1:])
            write(args.out, "sequence", meta, rows, markdown(
                meta, rows, title="Sequence-parallel loss", split=f"the same [B, T] batch, each rank its Megatron "
                f"context-parallel slice [B, T / {bench.world}] in the rows with several ranks"))
            failed[0] = int(any(r.status in ("error", "mismatch") for r in rows))
        bench.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return int(failed[0])


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()  # as bench/sharded.py: skip gloo's racy interpreter teardown
    sys.stderr.flush()
    os._exit(code)
