"""Several top-k teachers in one pass (wpkl/backends/triton_topk.py: TritonTopKMixturePass), as
wpkl.multi_teacher_loss runs them with dense mixing: the student row read once forward (its log-normalizer and
entropy, which no top-k teacher changes) and once backward (the dense part p_v sum_k c_k Lambda_k / T), the
teachers' atoms merged where their ids overlap.

The pass against the float64 reference teacher by teacher (``token_terms`` with ``teacher_topk``; the gradient
against sum_k c_k d L_k / d student by autograd), on fresh random inputs: every kernel dtype, V = 1, a prime and
several blocks, K = 2 and 3 teachers with overlapping, shuffled and padded lists of different lengths, every mode
and divergence, per-teacher masks (a token no teacher sees), -inf vocabulary padding, a temperature; outputs
poisoned (conftest.py). Then the engine: reads counted, mixing numbers and a soft tensor, a logits teacher beside
the top-k ones (then their shared pass is tests/test_logits_topk.py's), the fused-linear form's projections
counted.
"""

from __future__ import annotations

import pytest
import torch

import wpkl
from test_mixture_pass import (BY_IDS, B, T, _truth, _valids, assert_each_teacher, assert_matches_the_reference_call,
                               counting_projections, mixing_of)
from test_topk import topk_teacher
from utils import DTYPES
from wpkl.backends import triton_topk
from wpkl.backends.triton_topk import TritonTopKMixturePass, merge_atoms
from wpkl.reference import TopK, token_terms
from wpkl.spec import LossSpec

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


def _lists(g, student64, K, width, seed):
    """K teachers' top-k answers near the student (so that their lists overlap), of different lengths."""
    V = student64.shape[-1]
    out = []
    for k in range(K):
        logits = student64.nan_to_num(neginf=-30.0) + (0.5 + k) * torch.randn(B, T, V, generator=g,
                                                                              dtype=torch.float64)
        logits[torch.isinf(student64)] = float("-inf")  # the padded column is no teacher's atom
        out.append(topk_teacher(logits, min(width + k, V), seed=seed + k))
    return out


@pytest.mark.parametrize("mode,divergence,beta", [("tail", "reverse_kl", 0.5), ("renormalize", "forward_kl", 0.5),
                                                  ("raw", "jsd", 0.3)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V,K", [(1, 2), (37, 3), (150, 2)])
def test_matches_each_teachers_reference(mode, divergence, beta, dtype, V, K, small_blocks):
    g = torch.Generator().manual_seed(V * 10 + K + DTYPES.index(dtype))
    student64 = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    if V > 1:
        student64[0, :, -1] = float("-inf")  # vocabulary padding (0 log 0 = 0)
    lists = _lists(g, student64, K, 4, seed=V)
    student = student64.to(dtype)
    teachers = [TopK(ids, lp.to(dtype)) for ids, lp in lists]
    valids = _valids(g, K)
    spec = LossSpec(divergence=divergence, beta=beta, temperature=0.7, topk_mode=mode)
    loss, stats, saved = TritonTopKMixturePass.forward(student, teachers, valids, spec)
    coef = torch.rand(K, B, T, generator=g) + 0.5
    grad = TritonTopKMixturePass.backward(saved, coef, torch.full_like(student, float("nan")))

    kw = dict(divergence=divergence, beta=beta, temperature=0.7, topk=spec.topk)

    def terms(x, k):
        return token_terms(x, None, teacher_topk=TopK(teachers[k].ids, _truth(teachers[k].logprobs, x)), **kw)

    assert_each_teacher(loss, stats, grad, student, valids, coef, terms)


def test_what_a_teacher_does_not_see_is_never_read(small_blocks):
    """Garbage on the tokens a teacher does not see (ids out of range, below -1, repeated, NaN log-probs) changes
    nothing: the values and the gradient are those of the same call with clean lists there."""
    g = torch.Generator().manual_seed(2)
    V, K = 23, 3
    student = 2 * torch.randn(B, T, V, generator=g)
    lists = _lists(g, student.double(), K, 4, seed=5)
    valids = _valids(g, K)
    spec = LossSpec(divergence="forward_kl", temperature=0.8)
    coef = torch.rand(K, B, T, generator=g) + 0.5
    results = []
    for dirty in (False, True):
        teachers = []
        for k, (ids, lp) in enumerate(lists):
            ids, lp = ids.clone(), lp.float().clone()
            if dirty:
                unseen = ~valids[k]
                ids[unseen] = torch.tensor([V + 5, -7, 3, 3, 3, 3])[: ids.shape[-1]]
                lp[unseen] = float("nan")
            teachers.append(TopK(ids, lp))
        loss, stats, saved = TritonTopKMixturePass.forward(student, teachers, valids, spec)
        results.append((loss, stats, TritonTopKMixturePass.backward(saved, coef, torch.full_like(student, 7.0))))
    for clean, dirty in zip(*results, strict=True):
        assert torch.equal(clean, dirty)


@pytest.mark.parametrize("teachers", [1, 2])
def test_lists_wider_than_a_fix_up_block(teachers, small_blocks):
    """More atoms per token than one fix-up launch holds (MAX_ATOM_BLOCK): a server's top-300, or two teachers'
    top-150 merged, take several launches over column blocks, against the float64 reference."""
    from wpkl.backends.triton_topk import MAX_ATOM_BLOCK

    g = torch.Generator().manual_seed(teachers)
    V, width = 307, 300 // teachers
    assert width * teachers > MAX_ATOM_BLOCK
    student64 = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    lists = [topk_teacher(student64 + torch.randn(B, T, V, generator=g, dtype=torch.float64), width, seed=k)
             for k in range(teachers)]
    options = dict(divergence="forward_kl", temperature=0.9, topk_mode="tail", reduction="sum")
    results = []
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        x = student64.to(dtype).requires_grad_(True)
        given = [dict(teacher_topk_ids=ids, teacher_topk_logprobs=lp.to(dtype)) for ids, lp in lists]
        loss = (wpkl.weighted_kl_loss(x, None, **given[0], backend=backend, **options) if teachers == 1 else
                wpkl.multi_teacher_loss(x, teachers=given, backend=backend, **options))
        loss.backward()
        results.append((loss.double(), x.grad.double()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


def test_no_tokens(small_blocks):
    """An empty batch: zero-size outputs and gradient, no launch, no error (one teacher and several)."""
    student = torch.randn(2, 0, 19, requires_grad=True)
    ids, lp = torch.zeros(2, 0, 3, dtype=torch.int64), torch.zeros(2, 0, 3)
    teacher = dict(teacher_topk_ids=ids, teacher_topk_logprobs=lp)
    for loss in (wpkl.weighted_kl_loss(student, None, **teacher, backend="triton", reduction="sum"),
                 wpkl.multi_teacher_loss(student, teachers=[teacher, teacher], backend="triton", reduction="sum")):
        loss.backward()
        assert loss.item() == 0.0 and student.grad.shape == student.shape


def test_merge_atoms_sums_the_copies_of_an_id():
    ids = torch.tensor([[4, 1, -1, 1, 7, 4, 4], [2, -1, -1, 3, 9, 8, 2]])
    a = torch.tensor([[1.0, 2.0, 5.0, 3.0, 4.0, 0.5, 0.25], [1.0, 7.0, 7.0, 2.0, 3.0, 4.0, 6.0]])
    x = ids.float() / 10  # the student's value at the id: the same for every copy
    merged, total, at = merge_atoms(ids, a, x)
    for row in range(2):
        kept = merged[row] >= 0
        got = dict(zip(merged[row][kept].tolist(), total[row][kept].tolist(), strict=True))
        expected = {}
        for i, value in zip(ids[row].tolist(), a[row].tolist(), strict=True):
            if i >= 0:
                expected[i] = expected.get(i, 0.0) + value
        assert got == expected  # each id once, with the sum of its copies (padding dropped)
        assert torch.equal(at[row][kept], merged[row][kept].float() / 10)
    again = merge_atoms(ids, a, x)
    assert all(torch.equal(p, q) for p, q in zip(again, (merged, total, at), strict=True))


def _counting(monkeypatch):
    calls = {"student forward": 0, "dense backward": 0, "groups": []}
    student_pass, backward, forward = (triton_topk.student_pass, triton_topk.TritonPass.backward,
                                       TritonTopKMixturePass.forward)

    def counted_pass(*args):
        calls["student forward"] += 1
        return student_pass(*args)

    def counted_backward(*args):
        calls["dense backward"] += 1
        return backward(*args)

    def counted_group(student, teachers, valids, spec):
        calls["groups"].append(len(teachers))
        return forward(student, teachers, valids, spec)

    monkeypatch.setattr(triton_topk, "student_pass", counted_pass)
    monkeypatch.setattr(triton_topk.TritonPass, "backward", staticmethod(counted_backward))
    monkeypatch.setattr(TritonTopKMixturePass, "forward", staticmethod(counted_group))
    return calls


def _float(teacher: dict) -> dict:
    return {**teacher, "teacher_topk_logprobs": teacher["teacher_topk_logprobs"].float()}


def _dicts(lists):
    return [dict(teacher_topk_ids=ids, teacher_topk_logprobs=lp) for ids, lp in lists]


@pytest.mark.parametrize("mixing", ["numbers", "soft tensor", "routing", "with a logits teacher", "none, by ids"])
def test_dense_mixing_reads_the_student_once(mixing, monkeypatch, small_blocks):
    """Five top-k teachers: one student pass forward and one dense pass backward for all of them, against the
    float64 reference (loss and gradient) with a weighting, a mask and a temperature. A soft mixing tensor
    (zero on some tokens for some teachers) and a one-hot routing take the same pass (it does no teacher's work
    per element); a logits teacher beside them takes the logits and top-k pass; reduction="none" with packed sequences
    (``sequence_ids``) and the stats."""
    g = torch.Generator().manual_seed(11)
    V, K = 41, 5
    student64 = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    teachers = _dicts(_lists(g, student64, K, 3, seed=7))
    weights = mixing_of(mixing, g, K)
    if mixing == "with a logits teacher":
        teachers.append(student64 + torch.randn(B, T, V, generator=g, dtype=torch.float64))
        weights.append(0.3)
    mask = torch.rand(B, T, generator=g) < 0.8
    options = dict(mixing=weights, mask=mask, divergence="forward_kl", temperature=1.3, topk_mode="tail",
                   weighting=wpkl.Weighting(accumulated=0.5))
    if mixing == "none, by ids":
        options.update(BY_IDS)
    upstream = torch.randn(B, T, generator=g, dtype=torch.float64)
    calls = _counting(monkeypatch)
    x = student64.float().requires_grad_(True)
    ours = [_float(t) if isinstance(t, dict) else t.float() for t in teachers]
    loss = wpkl.multi_teacher_loss(x, teachers=ours, backend="triton", **options)
    loss, stats = loss if isinstance(loss, tuple) else (loss, None)
    (loss * (upstream.float() if loss.dim() else 1.0)).sum().backward()
    # (a logits teacher beside them joins their pass: tests/test_logits_topk.py)
    assert calls == ({"student forward": 0, "dense backward": 0, "groups": []} if mixing == "with a logits teacher"
                     else {"student forward": 1, "dense backward": 1, "groups": [K]})
    monkeypatch.undo()
    assert_matches_the_reference_call(loss, stats, x, student64, teachers, upstream, **options)


@pytest.mark.parametrize("divergence", ("reverse_kl", "jsd"))
def test_fused_linear_projects_the_student_once_per_chunk(divergence, monkeypatch, small_blocks):
    """The fused-linear form with three top-k teachers: each chunk's student logits projected once for all of
    them (forward, and once more in the two-phase backward), against the float64 reference with a bias, a logit
    scale and a softcap."""
    import wpkl.engine.linear as linear

    g = torch.Generator().manual_seed(4)
    H, V, K, chunk = 8, 37, 3, 3
    h, w, b = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((B, T, H), (V, H), (V,)))
    with torch.no_grad():
        logits = linear.project(h, w, b, 0.7, 4.0)
    teachers = _dicts(_lists(g, logits, K, 4, seed=3))
    mask = torch.rand(B, T, generator=g) < 0.8
    options = dict(mixing=[0.5, 0.3, 0.2], mask=mask, student_softcap=4.0, student_logit_scale=0.7,
                   divergence=divergence, temperature=0.9, weighting=wpkl.Weighting(accumulated=0.5),
                   fused_linear=True)
    projected = counting_projections(monkeypatch)
    calls = _counting(monkeypatch)
    x = [t.float().requires_grad_(True) for t in (h, w, b)]
    loss = wpkl.multi_teacher_loss(x[0], x[1], teachers=[_float(t) for t in teachers],
                                   student_bias=x[2], backend="triton", chunk_size=chunk, **options)
    loss.backward()
    chunks = -(-int(mask.sum()) // chunk)
    assert calls["groups"] == [K] * chunks and calls["student forward"] == chunks
    assert projected.count(x[1].data_ptr()) == 2 * chunks
    monkeypatch.undo()
    y = [t.clone().requires_grad_(True) for t in (h, w, b)]
    expected = wpkl.multi_teacher_loss(y[0], y[1], teachers=teachers, student_bias=y[2], backend="reference",
                                       **options)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    for got, truth in zip(x, y, strict=True):
        torch.testing.assert_close(got.grad.double(), truth.grad, rtol=2e-4, atol=2e-6)
