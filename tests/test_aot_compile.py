"""Ahead-of-time compilation for real GPUs, on this CPU, gated on the SASS: every large-vocabulary
specialization wpkl launches compiles for sm_80 and sm_90 with the Triton that is installed, spills nothing,
keeps barriers and shuffles out of its vocabulary loops, loads 16 bytes at a time, and meets the instruction
and occupancy targets of docs/design.md. The interpreter accepts code the compiler rejects (non-constexpr
globals, say), so this is also the test that the kernels are real.

It runs ``python -m wpkl.tools.kernel_report --quick`` (V >= 32000, and bf16 at V = 97); the report without
``--quick`` covers every representative vocabulary with the same gates. Triton 3.6 (the GPU machines' version)
is checked the same way in its own environment: see docs/design.md, "Checking another Triton".
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from wpkl.tools.kernel_report import LOADS_16B_VOCABS, TARGET_FORWARD_CTAS, Row, gate_failures  # noqa: E402
from wpkl.tools.sass import Loop, ctas_per_sm, vocabulary_loops  # noqa: E402
from wpkl.tools.specializations import jobs  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "wpkl.tools.kernel_report", "--quick", "--json", str(out / "rows.json"),
                             "--sass-dir", str(out / "sass")], env=env, capture_output=True, text=True, timeout=1200)
    assert (out / "rows.json").exists(), f"the report did not finish:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result, json.loads((out / "rows.json").read_text()), out / "sass"


def _row(record: dict) -> Row:
    fields = {k: v for k, v in record.items() if k in Row.__dataclass_fields__}
    return Row(**{**fields, "loops": [Loop(**loop) for loop in record["loops"]]})


def _find(rows, kernel, divergence, dtype="bfloat16", vocab=128256, arch=90, variant=""):
    found = [r for r in rows if (r["kernel"], r["divergence"], r["dtype"], r["arch"], r["variant"]) ==
             (kernel, divergence, dtype, arch, variant) and str(vocab) in r["vocabs"].split()]
    assert len(found) == 1, (kernel, divergence, dtype, vocab, arch)
    return found[0]


def test_everything_compiles_for_sm80_and_sm90(report):
    _, rows, _ = report
    assert len(rows) == len(jobs(quick=True)) > 0
    assert {r["arch"] for r in rows} == {80, 90}
    vocabulary = [r for r in rows if r["kernel"] in ("fwd", "bwd")]
    assert {r["divergence"] for r in vocabulary} == {"reverse_kl", "forward_kl", "jsd", "sampled"}
    assert {r["dtype"] for r in vocabulary} == {"float32", "bfloat16", "float16"}
    assert {r["kernel"] for r in rows} == {"fwd", "bwd", "jsd_partials", "weights", "topk", "mixture_fwd",
                                           "mixture_bwd", "mixture_atoms", "mixture_jsd_partials"}
    # Several teachers' pass (kernels/token_mixture.py): every divergence, every logits dtype, two and four teachers
    # (jsd: two), and one with top-k teachers, whose backward adds their dense part ("dense"; the quick report:
    # at one teacher and the largest group).
    mixture = [r for r in rows if r["kernel"] in ("mixture_fwd", "mixture_bwd")]
    dtypes = ("float32", "bfloat16", "float16")
    largest = {"reverse_kl": 4, "forward_kl": 4, "jsd": 2}
    assert {(r["kernel"], r["divergence"], r["dtype"], r["variant"]) for r in mixture} == {
        (kernel, d, t, variant) for d in largest for t in dtypes
        for kernel, variants in (("mixture_fwd", ["K=1", "K=2"] + ["K=4"] * (d != "jsd")),
                                 ("mixture_bwd", ["K=2"] + ["K=4"] * (d != "jsd") + ["K=1 dense", f"K={largest[d]} dense"]))
        for variant in variants}
    # With top-k teachers, their merged atoms' whole gradient (kernels/token_mixture_bwd.py's atoms kernel): a
    # masked block at one teacher, and the largest block at the largest group.
    assert {(r["divergence"], r["dtype"], r["variant"]) for r in rows if r["kernel"] == "mixture_atoms"} == {
        (d, t, variant) for d in largest for t in dtypes for variant in ("K=1 A=100", f"K={largest[d]} A=256")}
    # The top-k teacher's atom fix-up (kernels/token_topk.py), in every gradient dtype.
    assert {r["dtype"] for r in rows if r["kernel"] == "topk"} == set(dtypes)
    # The weights kernel (kernels/token_weights.py): every reduction, every option on, [B, T] and packed layouts.
    assert {r["divergence"] for r in rows if r["kernel"] == "weights"} == {"mean", "sum", "seq_mean", "none"}
    assert all(r["registers"] > 0 for r in rows)


def test_gates_pass(report):
    """The report's own verdict, and the same gates recomputed from its rows."""
    result, rows, _ = report
    assert gate_failures([_row(r) for r in rows]) == []
    assert result.returncode == 0 and "All gates pass." in result.stdout, result.stdout[-3000:]


def test_targets_for_bf16_on_sm90(report):
    """The targets, spelled out for the specialization they name (bf16, sm_90, V = 128256)."""
    _, rows, _ = report
    per_element = {(k, d): [loop["per_element"] for loop in _find(rows, k, d)["loops"]]
                   for k in ("fwd", "bwd") for d in ("reverse_kl", "forward_kl", "jsd")}
    assert per_element["fwd", "reverse_kl"][0] <= 32 and per_element["fwd", "forward_kl"][0] <= 32
    assert len(per_element["fwd", "jsd"]) == 2 and per_element["fwd", "jsd"][1] <= 40  # jsd's second pass
    assert per_element["bwd", "reverse_kl"][0] <= 24 and per_element["bwd", "forward_kl"][0] <= 24
    assert per_element["bwd", "jsd"][0] <= 40
    for divergence in ("reverse_kl", "forward_kl", "jsd"):
        assert _find(rows, "fwd", divergence)["ctas_per_sm"] >= TARGET_FORWARD_CTAS
    # jsd on vocabulary shards: the one-device kernel's second pass (one shared device function), as lean
    shards = _find(rows, "jsd_partials", "jsd")
    assert [loop["per_element"] for loop in shards["loops"]] == per_element["fwd", "jsd"][1:]
    assert shards["ctas_per_sm"] >= TARGET_FORWARD_CTAS and shards["spill_bytes"] == 0 and shards["loads_16b"]
    # An fp32 student's jsd takes the precise log2 in its second pass (kernels/common.py: mixture_log2_ratios), about
    # 20 instructions more per element (54.1 at sm_90, Triton 3.9): bounded, and the same on vocabulary shards
    precise = _find(rows, "fwd", "jsd", dtype="float32")["loops"][1]["per_element"]
    assert precise <= 60, precise
    assert [loop["per_element"] for loop in _find(rows, "jsd_partials", "jsd", dtype="float32")["loops"]] == [precise]
    for variant in ("K=1", "K=2"):  # several jsd teachers on shards: the mixture kernel's second pass, as lean
        shards = _find(rows, "mixture_jsd_partials", "jsd", variant=variant)
        second = _find(rows, "mixture_fwd", "jsd", variant=variant)["loops"][1]["per_element"]
        assert [loop["per_element"] for loop in shards["loops"]] <= [second + 0.5], (shards["loops"], second)
        assert shards["ctas_per_sm"] >= 2 and shards["spill_bytes"] == 0 and shards["loads_16b"]
    # Four teachers in one pass: below four single-teacher passes' 4 x 32 and 4 x 24 per student element.
    for divergence in ("reverse_kl", "forward_kl"):
        fwd, bwd = (_find(rows, f"mixture_{k}", divergence, variant="K=4") for k in ("fwd", "bwd"))
        assert fwd["loops"][0]["per_element"] <= 80 and bwd["loops"][0]["per_element"] <= 40
        assert fwd["ctas_per_sm"] >= 2 and fwd["spill_bytes"] == bwd["spill_bytes"] == 0
    # jsd's two teachers in one pass: below two single-teacher passes' 2 x (20 + 32) and 2 x 22.
    fwd, bwd = (_find(rows, f"mixture_{k}", "jsd", variant="K=2") for k in ("fwd", "bwd"))
    assert [loop["per_element"] <= limit for loop, limit in zip(fwd["loops"], (40, 64), strict=True)] == [True] * 2
    assert bwd["loops"][0]["per_element"] <= 44 and fwd["ctas_per_sm"] >= 2
    # With top-k teachers: their dense part costs one instruction per element; one logits teacher with them
    # within a single-teacher pass's targets.
    for divergence, group, limit in (("reverse_kl", 4, 41), ("forward_kl", 4, 41), ("jsd", 2, 45)):
        dense = _find(rows, "mixture_bwd", divergence, variant=f"K={group} dense")
        assert dense["loops"][0]["per_element"] <= limit and dense["spill_bytes"] == 0
    for divergence, fwd_limits, bwd_limit in (("reverse_kl", (32,), 24), ("forward_kl", (32,), 24),
                                              ("jsd", (32, 40), 40)):
        fwd = _find(rows, "mixture_fwd", divergence, variant="K=1")
        bwd = _find(rows, "mixture_bwd", divergence, variant="K=1 dense")
        assert [loop["per_element"] <= limit for loop, limit in zip(fwd["loops"], fwd_limits, strict=True)] == \
            [True] * len(fwd_limits)
        assert bwd["loops"][0]["per_element"] <= bwd_limit


def test_no_spills_and_no_barriers_or_shuffles_in_vocabulary_loops(report):
    _, rows, _ = report
    assert not [r for r in rows if r["spill_bytes"]]  # every kernel, the weights kernel included
    vocabulary = [r for r in rows if r["kernel"] in ("fwd", "bwd")]
    assert all(r["loops"] for r in vocabulary)
    assert not [r for r in vocabulary if any(loop["bar"] or loop["shfl"] for loop in r["loops"])]


def test_16_byte_accesses_whatever_the_vocabulary(report):
    """Every large vocabulary, including V = 151665 (not a multiple of 16), loads and stores 16 bytes at a time
    in its vocabulary loops, for every dtype and architecture."""
    _, rows, _ = report
    checked = [r for r in rows if {int(v) for v in r["vocabs"].split()} & set(LOADS_16B_VOCABS)
               and r["kernel"] in ("fwd", "bwd")]
    assert {int(v) for r in checked for v in r["vocabs"].split()} >= set(LOADS_16B_VOCABS)
    assert all(r["loads_16b"] and r["stores_16b"] for r in checked), [r for r in checked if not r["loads_16b"]]


def test_sass_dir(report):
    _, rows, sass = report
    entries = json.loads((sass / "report.json").read_text())
    keys = {"kernel", "divergence", "dtype", "V", "arch", "BLOCK_V", "num_warps", "registers", "spill_bytes"}
    assert entries and all(keys <= set(e) for e in entries)
    assert {e["V"] for e in entries} >= set(LOADS_16B_VOCABS)
    for e in entries:
        text = (sass / f"{e['kernel']}-{e['divergence']}-{e['dtype']}-V{e['V']}-sm_{e['arch']}.sass").read_text()
        assert "EXIT" in text
    assert len(entries) == sum(len(r["vocabs"].split()) for r in rows)


# The measurement itself, on hand-written listings (no compiler): it must be able to fail.
LISTING = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/              @P0 LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   FADD R5, R5, R6 ;
        /*0030*/              @!P1 BRA 0x10 ;
        /*0040*/                   LDG.E.128 R8, desc[UR4][R2.64] ;
        /*0050*/                   LDG.E.U16 R9, desc[UR4][R2.64] ;
        /*0060*/                   SHFL.BFLY PT, R3, R5, 0x1, 0x1f ;
        /*0070*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0080*/                   MUFU.EX2 R5, R5 ;
        /*0090*/                   STG.E.128 desc[UR4][R2.64], R8 ;
        /*00a0*/              @P2 BRA 0x40 ;
        /*00b0*/                   EXIT ;
"""


def test_vocabulary_loop_measurement():
    loops = vocabulary_loops(LISTING, elements_per_iteration=2)
    # The first loop's only load is guarded (a masked block): not a vocabulary loop.
    assert loops == [Loop(instructions=7, per_element=3.5, bar=1, shfl=1, mufu=1, loads=2, loads_16b=1, stores=1,
                          stores_16b=1)]
    row = Row(kernel="fwd", divergence="reverse_kl", variant="", dtype="bfloat16", block_v=64, num_warps=1, arch=90,
              vocabs="128256", registers=100, shared_bytes=0, local_bytes=8, stack_bytes=0, ctas_per_sm=2,
              loops=loops)
    failures = "\n".join(gate_failures([row]))
    for expected in ("spills 8 bytes", "1 BAR and 1 SHFL", "not all 16 bytes wide", "allow 2 CTAs"):
        assert expected in failures
    assert "instructions per element" not in failures  # 3.5 <= 32
    row.loops = [Loop(instructions=70, per_element=35.0, bar=0, shfl=0, mufu=0, loads=2, loads_16b=2, stores=0,
                      stores_16b=0)]
    assert any("35.0 instructions per element, target 32" in f for f in gate_failures([row]))


def test_mixture_gates():
    """The several-teachers gates name the group they hold (K = 4, jsd's K = 2) and every loop of it: a row over
    a loop's limit, with a loop missing or at one CTA per SM fails; other groups are not gated."""
    def loop(per_element):
        return Loop(instructions=int(per_element * 8), per_element=per_element, bar=0, shfl=0, mufu=0, loads=2,
                    loads_16b=2, stores=0, stores_16b=0)

    def row(kernel, divergence, variant, loops, ctas=2):
        return Row(kernel=kernel, divergence=divergence, variant=variant, dtype="bfloat16", block_v=2048, num_warps=8,
                   arch=90, vocabs="128256", registers=100, shared_bytes=0, local_bytes=0, stack_bytes=0,
                   ctas_per_sm=ctas, loops=[loop(x) for x in loops])

    assert gate_failures([row("mixture_fwd", "jsd", "K=2", (40, 64)), row("mixture_bwd", "jsd", "K=2", (44,)),
                          row("mixture_fwd", "reverse_kl", "K=4", (80,)), row("mixture_bwd", "forward_kl", "K=4", (40,)),
                          row("mixture_bwd", "forward_kl", "K=4 dense", (41,)), row("mixture_fwd", "jsd", "K=1", (32, 40)),
                          row("mixture_fwd", "reverse_kl", "K=2", (500,))]) == []
    failures = "\n".join(gate_failures([row("mixture_fwd", "jsd", "K=2", (40, 65)),
                                        row("mixture_fwd", "jsd", "K=2", (40,), ctas=1),
                                        row("mixture_bwd", "reverse_kl", "K=4", (41,)),
                                        row("mixture_bwd", "jsd", "K=1 dense", (41,))]))
    for expected in ("loop 1 takes 65 instructions per element, target 64", "1 vocabulary loops, expected 2",
                     "allow 1 CTAs per SM", "loop 0 takes 41 instructions per element, target 40",
                     "mixture_bwd jsd_K=1_dense bfloat16 V=128256 sm_90: loop 0 takes 41 instructions"):
        assert expected in failures


def test_occupancy_model():
    """Registers are allocated per warp in units of 256 from four 16384-register sub-partitions."""
    assert ctas_per_sm(94, 8, 1024, 90) == 2  # the 94-register forward
    assert ctas_per_sm(80, 8, 1024, 90) == 3
    assert ctas_per_sm(64, 8, 1024, 90) == 4
    assert ctas_per_sm(32, 8, 0, 80) == 8  # 64 warps per SM
    assert ctas_per_sm(24, 1, 0, 90) == 32  # 32 CTAs per SM
    assert ctas_per_sm(32, 4, 100 * 1024, 80) == 1  # shared memory bound on sm_80 (164 KiB)
