"""Logits teachers and top-k teachers in one pass (wpkl/backends/triton_logits_topk.py), as
wpkl.multi_teacher_loss runs a call mixing both forms: the mixture kernel reads the student row once forward (its
log-normalizer and entropy serve the top-k teachers' atoms) and once backward (with the top-k teachers' dense part
added, DENSE), then the atoms kernel rewrites each of their merged atom columns with its whole gradient (rounded
once).

The pass against the float64 reference teacher by teacher (``token_terms``; the gradient against
sum_k c_k d L_k / d student), on fresh random inputs: every kernel dtype, V = 1, a prime and several blocks, one,
two and four logits teachers with one or two top-k teachers, every divergence, per-teacher masks (a token no
teacher sees, tokens only top-k teachers see: the student's terms in the first logits teacher's slot there),
-inf vocabulary padding, a temperature; outputs poisoned (conftest.py); garbage in the first logits teacher on the
tokens it does not see changes nothing. Then the engine: passes counted against the float64 reference.
"""

from __future__ import annotations

import pytest
import torch

import wpkl
from test_mixture_pass import (BY_IDS, B, T, _teachers, _truth, assert_each_teacher, assert_matches_the_reference_call,
                               mixing_of)
from test_topk import topk_teacher
from utils import DTYPES
from wpkl.backends import triton_topk
from wpkl.backends.triton_logits_topk import TritonLogitsTopKPass
from wpkl.backends.triton_mixture import TritonMixturePass
from wpkl.reference import TopK, token_terms
from wpkl.spec import LossSpec

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


def _valids(g, K, L):
    """Per-teacher masks: a token no teacher sees, tokens only the top-k teachers see, and the first logits
    teacher not seeing some of the others' tokens."""
    valids = torch.rand(K, B, T, generator=g) < 0.75
    valids[:, 0, 2] = False
    valids[:L, 1, :2] = False  # only top-k teachers see these
    valids[L:, 1, :2] = True
    valids[0, 0, 3], valids[L:, 0, 3] = False, True
    return valids


def _inputs(g, V, L, top, dtype):
    student64 = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    if V > 1:
        student64[0, :, -1] = float("-inf")  # vocabulary padding (0 log 0 = 0)
    logits64 = _teachers(g, student64, L, strided=False)
    for teacher in logits64:
        teacher.masked_fill_(torch.isinf(student64), float("-inf"))
    lists = []
    for k in range(top):
        near = student64.nan_to_num(neginf=-30.0) + (0.5 + k) * torch.randn(B, T, V, generator=g, dtype=torch.float64)
        near[torch.isinf(student64)] = float("-inf")
        lists.append(topk_teacher(near, min(3 + k, V), seed=V + k))
    return student64, logits64, lists


@pytest.mark.parametrize("divergence,beta,mode", [("reverse_kl", 0.5, "tail"), ("forward_kl", 0.5, "renormalize"),
                                                  ("jsd", 0.3, "raw")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V,L,top", [(1, 1, 1), (37, 2, 2), (150, 4, 1), (150, 1, 2)])
def test_matches_each_teachers_reference(divergence, beta, mode, dtype, V, L, top, small_blocks):
    if divergence == "jsd" and L > 2:
        L = 2  # jsd's launches hold two
    g = torch.Generator().manual_seed(V * 10 + L + top + DTYPES.index(dtype))
    student64, logits64, lists = _inputs(g, V, L, top, dtype)
    student = student64.to(dtype)
    teachers = [t.to(dtype) for t in logits64] + [TopK(ids, lp.to(dtype)) for ids, lp in lists]
    K = L + top
    valids = _valids(g, K, L)
    spec = LossSpec(divergence=divergence, beta=beta, temperature=0.7, topk_mode=mode)
    loss, stats, saved = TritonLogitsTopKPass.forward(student, teachers, valids, spec)
    coef = torch.rand(K, B, T, generator=g) + 0.5
    grad = TritonLogitsTopKPass.backward(saved, coef, torch.full_like(student, float("nan")))
    kw = dict(divergence=divergence, beta=beta, temperature=0.7, topk=spec.topk)

    def terms(x, k):
        if k < L:
            return token_terms(x, _truth(teachers[k], x), **kw)
        top_k = teachers[k]
        return token_terms(x, None, teacher_topk=TopK(top_k.ids, _truth(top_k.logprobs, x)), **kw)

    assert_each_teacher(loss, stats, grad, student, valids, coef, terms)


def test_what_the_first_teacher_does_not_see_never_counts(small_blocks):
    """The first logits teacher's kernel row is set on every token of the pass; where it is not weighed, its
    values (NaN, -inf, huge) change nothing: loss, stats and gradient are bit for bit those of clean values."""
    g = torch.Generator().manual_seed(5)
    V, L, top = 29, 2, 1
    student64, logits64, lists = _inputs(g, V, L, top, torch.float32)
    valids = _valids(g, L + top, L)
    spec = LossSpec(divergence="reverse_kl", temperature=0.9)
    coef = torch.rand(L + top, B, T, generator=g) + 0.5
    results = []
    for dirty in (False, True):
        first = logits64[0].float().clone()
        if dirty:
            first[~valids[0]] = torch.tensor([float("nan"), float("-inf"), 3e38] * V)[:V]
        teachers = [first, logits64[1].float()] + [TopK(ids, lp.float()) for ids, lp in lists]
        loss, stats, saved = TritonLogitsTopKPass.forward(student64.float(), teachers, valids, spec)
        grad = TritonLogitsTopKPass.backward(saved, coef, torch.full((B, T, V), 7.0))
        results.append((loss, stats, grad))
    for clean, dirty in zip(*results, strict=True):
        assert torch.equal(clean, dirty)


def _counting(monkeypatch):
    calls = {"logits launches": [], "dense backward": [], "student pass": 0, "single backward": 0}
    forward, backward = TritonMixturePass.forward, TritonMixturePass.backward
    student_pass, dense = triton_topk.student_pass, triton_topk.TritonPass.backward

    def counted_forward(student, teachers, valids, spec, rows=None):
        calls["logits launches"].append(len(teachers))
        return forward(student, teachers, valids, spec, rows)

    def counted_backward(saved, coef, out, dense=None):
        calls["dense backward"].append(dense is not None)
        return backward(saved, coef, out, dense)

    def counted_pass(*args):
        calls["student pass"] += 1
        return student_pass(*args)

    def counted_dense(*args):
        calls["single backward"] += 1
        return dense(*args)

    monkeypatch.setattr(TritonMixturePass, "forward", staticmethod(counted_forward))
    monkeypatch.setattr(TritonMixturePass, "backward", staticmethod(counted_backward))
    monkeypatch.setattr(triton_topk, "student_pass", counted_pass)
    monkeypatch.setattr(triton_topk.TritonPass, "backward", staticmethod(counted_dense))
    return calls


# the calls' passes: (mixture-kernel launches, each one's backward with a dense part, top-k student passes, the
# single kernels' backwards)
ENGINE_CASES = {
    "numbers": ([2], [True], 0, 0),
    "soft tensor": ([2], [True], 0, 0),
    "none, by ids": ([2], [True], 0, 0),
    # a routing: each logits teacher its own pass (the single kernel), the top-k teachers theirs (one student pass,
    # one dense backward)
    "routing": ([], [], 1, 3),
    # five logits teachers: the first launch of four joins the top-k teachers, the fifth runs alone
    "five logits teachers": ([4], [True], 0, 1),
}


@pytest.mark.parametrize("case", ENGINE_CASES)
def test_a_call_mixing_forms_reads_the_student_once(case, monkeypatch, small_blocks):
    """Logits and top-k teachers in one call: one mixture launch forward (no top-k student pass) and one backward
    with the top-k teachers' dense part, against the float64 reference (loss, gradient, stats) with a weighting,
    a mask and a temperature; a routing keeps each form apart."""
    g = torch.Generator().manual_seed(len(case))
    V, L = 41, 5 if case == "five logits teachers" else 2
    student64, logits64, lists = _inputs(g, V, L, 2, torch.float64)
    teachers = [*logits64, *(dict(teacher_topk_ids=ids, teacher_topk_logprobs=lp) for ids, lp in lists)]
    weights = mixing_of(case if case in ("soft tensor", "routing") else "numbers", g, len(teachers))
    mask = torch.rand(B, T, generator=g) < 0.85
    options = dict(mixing=weights, mask=mask, divergence="forward_kl", temperature=1.3, topk_mode="tail",
                   weighting=wpkl.Weighting(accumulated=0.5))
    if case == "none, by ids":
        options.update(BY_IDS)
    upstream = torch.randn(B, T, generator=g, dtype=torch.float64)
    calls = _counting(monkeypatch)
    x = student64.float().requires_grad_(True)
    ours = [t.float() if isinstance(t, torch.Tensor) else {**t, "teacher_topk_logprobs": t["teacher_topk_logprobs"]
                                                           .float()} for t in teachers]
    if case == "soft tensor":
        options["mixing"] = weights.float()
    loss = wpkl.multi_teacher_loss(x, teachers=ours, backend="triton", **options)
    loss, stats = loss if isinstance(loss, tuple) else (loss, None)
    (loss * (upstream.float() if loss.dim() else 1.0)).sum().backward()
    launches, dense, student_passes, single_backwards = ENGINE_CASES[case]
    assert calls == {"logits launches": launches, "dense backward": dense, "student pass": student_passes,
                     "single backward": single_backwards}, calls
    monkeypatch.undo()
    options["mixing"] = weights
    assert_matches_the_reference_call(loss, stats, x, student64, teachers, upstream, **options)


def test_the_route_says_so():
    from wpkl.engine.route import Route, mixture_route
    from wpkl.inputs import build

    spec = LossSpec(backend="triton")
    student = torch.randn(B, T, 11)
    logits = [build.materialized(spec, student, torch.randn(B, T, 11)) for _ in range(5)]
    topk = [build.materialized(spec, student, None, teacher_topk_ids=torch.randint(0, 11, (B, T, 3)),
                               teacher_topk_logprobs=-torch.rand(B, T, 3)) for _ in range(2)]
    own = Route("triton", "kernels", "torch", None, False, "backend='triton'")
    plan = mixture_route([topk[0], *logits, topk[1]], [own] * 7)
    assert plan.groups == (("logits+top-k", (1, 2, 3, 4, 0, 6)),)  # the fifth logits teacher alone
    assert "7 teachers in 2 passes" in str(plan.route)
    assert mixture_route(logits[:1] + topk[:1], [own] * 2).groups == (("logits+top-k", (0, 1)),)
    other = build.materialized(LossSpec(backend="triton", temperature=0.5), student, torch.randn(B, T, 11))
    assert mixture_route([other, *topk], [own] * 3).groups == (("top-k", (1, 2)),)  # another specification
    assert mixture_route(logits[:2] + topk, [own] * 4, "routing").groups == (("top-k", (2, 3)),)
    # the fused-linear form: hidden-state teachers with top-k ones under dense mixing (not where the hidden-state
    # teachers run alone: a device tensor or a routing)
    none = dict.fromkeys(("mask", "token_weights", "positions", "tokens", "num_items_in_batch", "teacher_logprobs",
                          "rollout_logprobs", "teacher_token_logprobs"))
    h, w = torch.randn(B, T, 4), torch.randn(11, 4)
    heads = [build.linear(spec, h, w, torch.randn(B, T, 4), torch.randn(11, 4), **none) for _ in range(2)]
    lists = [build.linear(spec, h, w, None, None, teacher_topk_ids=torch.randint(0, 11, (B, T, 3)),
                          teacher_topk_logprobs=-torch.rand(B, T, 3), **none) for _ in range(2)]
    assert mixture_route(heads + lists, [own] * 4).groups == (("hidden+top-k", (0, 1, 2, 3)),)
    for mixing in ("device", "routing"):
        assert mixture_route(heads + lists, [own] * 4, mixing).groups == (("top-k", (2, 3)),)


def test_lists_wider_than_an_atoms_block(small_blocks):
    """Two top-k teachers' top-150 beside a logits teacher: 300 merged atoms per token, more than one atoms launch
    takes (MAX_ATOM_BLOCK), against the float64 reference."""
    from wpkl.backends.triton_topk import MAX_ATOM_BLOCK

    g = torch.Generator().manual_seed(4)
    V, width = 307, 150
    assert 2 * width > MAX_ATOM_BLOCK
    student64 = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    lists = [topk_teacher(student64 + torch.randn(B, T, V, generator=g, dtype=torch.float64), width, seed=k)
             for k in range(2)]
    logits = student64 + torch.randn(B, T, V, generator=g, dtype=torch.float64)
    options = dict(divergence="reverse_kl", temperature=0.9, topk_mode="tail", reduction="sum", mixing=[0.5, 0.3, 0.2])
    results = []
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        x = student64.to(dtype).requires_grad_(True)
        given = [logits.to(dtype)] + [dict(teacher_topk_ids=ids, teacher_topk_logprobs=lp.to(dtype))
                                      for ids, lp in lists]
        loss = wpkl.multi_teacher_loss(x, teachers=given, backend=backend, **options)
        loss.backward()
        results.append((loss.double(), x.grad.double()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


def test_no_tokens(small_blocks):
    """An empty batch: zero-size outputs and gradient, no error."""
    student = torch.randn(2, 0, 19, requires_grad=True)
    teachers = [torch.randn(2, 0, 19), dict(teacher_topk_ids=torch.zeros(2, 0, 3, dtype=torch.int64),
                                             teacher_topk_logprobs=torch.zeros(2, 0, 3))]
    loss = wpkl.multi_teacher_loss(student, teachers=teachers, backend="triton", reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and student.grad.shape == student.shape


@pytest.mark.parametrize("divergence,softcap", [("reverse_kl", None), ("forward_kl", 4.0), ("jsd", None)])
def test_fused_linear_projects_the_student_once_per_chunk(divergence, softcap, monkeypatch, small_blocks):
    """The fused-linear form with two hidden-state teachers (one with a padded head) and two top-k teachers: each
    chunk's student logits projected once for all four (forward, and once more in the two-phase backward), one
    shared pass per chunk, against the float64 reference with a bias, a logit scale and a temperature. Without a
    softcap the backward writes the gradient over the chunk's logits, which the atoms' rewrite then no longer
    reads (it takes the saved logits at the ids)."""
    from test_mixture_pass import counting_projections

    import wpkl.engine.linear as linear

    g = torch.Generator().manual_seed(6)
    H, V, chunk = 8, 37, 3
    h, w, b = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((B, T, H), (V, H), (V,)))
    with torch.no_grad():
        logits = linear.project(h, w, b, 0.7, softcap)
    heads = [(torch.randn(B, T, 6, generator=g, dtype=torch.float64), torch.randn(V + 3 * k, 6, generator=g,
                                                                                  dtype=torch.float64))
             for k in range(2)]
    lists = [topk_teacher(logits + torch.randn(B, T, V, generator=g, dtype=torch.float64), 4, seed=k)
             for k in range(2)]
    mask = torch.rand(B, T, generator=g) < 0.8
    options = dict(mixing=[0.4, 0.3, 0.2, 0.1], mask=mask, student_logit_scale=0.7, student_softcap=softcap,
                   divergence=divergence, temperature=0.9, weighting=wpkl.Weighting(accumulated=0.5),
                   fused_linear=True)

    def teachers_in(dtype):
        return [dict(teacher_hidden=heads[0][0].to(dtype), teacher_weight=heads[0][1].to(dtype)),
                dict(teacher_topk_ids=lists[0][0], teacher_topk_logprobs=lists[0][1].to(dtype)),
                dict(teacher_hidden=heads[1][0].to(dtype), teacher_weight=heads[1][1].to(dtype)),
                dict(teacher_topk_ids=lists[1][0], teacher_topk_logprobs=lists[1][1].to(dtype))]

    projected = counting_projections(monkeypatch)
    passes = []
    forward = TritonLogitsTopKPass.forward
    monkeypatch.setattr(TritonLogitsTopKPass, "forward", staticmethod(
        lambda *args: passes.append(len(args[1])) or forward(*args)))
    x = [t.float().requires_grad_(True) for t in (h, w, b)]
    loss = wpkl.multi_teacher_loss(x[0], x[1], teachers=teachers_in(torch.float32), student_bias=x[2],
                                   backend="triton", chunk_size=chunk, **options)
    loss.backward()
    chunks = -(-int(mask.sum()) // chunk)
    assert passes == [4] * chunks and projected.count(x[1].data_ptr()) == 2 * chunks
    monkeypatch.undo()
    y = [t.clone().requires_grad_(True) for t in (h, w, b)]
    expected = wpkl.multi_teacher_loss(y[0], y[1], teachers=teachers_in(torch.float64), student_bias=y[2],
                                       backend="reference", **options)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    for got, truth in zip(x, y, strict=True):
        torch.testing.assert_close(got.grad.double(), truth.grad, rtol=2e-4, atol=2e-6)
