"""Multi-teacher OPD (``wpkl.multi_teacher_loss``, MOPD arXiv 2606.30406, Eq. 5): the student against K teachers,
each token's divergences mixed by per-teacher, per-sequence (routing) or per-token weights, the weighting evaluated
on the mixture.

Checked against the float64 reference (wpkl.reference's per-token terms, one call per teacher, the mixture and
the weights of the mixed stats written out here) on both backends, every dtype, the materialized, fused-linear,
top-k and teacher-server forms and teachers of different forms mixed; the mixture formula itself against plain
torch; the vocabulary- and sequence-parallel forms in spawned gloo worlds against the single-process call (with
EOPD's ``entropy_gated_loss``, the other variant made of several fused calls, there too).
"""

from __future__ import annotations

import json
import os
import traceback

import pytest
import torch

import wpkl
from utils import (DTYPES, assert_grad_close, assert_ranks_passed, assert_values_close, leave_worker,
                   random_mask, spawn_worlds)
from wpkl.reference import TopK, TopKOptions, compute_weights, reduce_loss, token_terms

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

LEADING, V, K_TOP = (3, 6), 37, 5


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _teachers(g, student, count=3):
    """Teachers near the student and far from it (so that the mixture differs from each)."""
    scales = (0.3, 1.5, 3.0)
    return [student + scales[k % 3] * torch.randn(student.shape, generator=g, dtype=torch.float64)
            for k in range(count)]


def _topk(teacher_logits):
    lq = torch.log_softmax(teacher_logits.double(), -1)
    values, ids = lq.topk(K_TOP, dim=-1)
    ids[0, 0, -1] = -1  # a shorter list
    return ids, values


def _mixing(kind, g, count):
    if kind == "uniform":
        return None, [torch.tensor(1.0 / count, dtype=torch.float64)] * count
    if kind == "per teacher":
        values = [0.2, 0.5, 1.3][:count]
        return values, [torch.tensor(v, dtype=torch.float64) for v in values]
    if kind == "per sequence":  # the paper's domain routing: one teacher per sequence
        choice = torch.randint(0, count, (LEADING[0],), generator=g)
        one_hot = torch.nn.functional.one_hot(choice, count).T.double()  # [K, B]
        return one_hot, [row[:, None] for row in one_hot]
    table = torch.rand(count, *LEADING, generator=g, dtype=torch.float64)  # per token
    return table, list(table)


def mopd_reference(student, sources, mixing, *, weighting, mask, tokens, divergence, temperature, reduction,
                   token_weights=None, num_items_in_batch=None, teacher_token_logprobs=None):
    """sum_k m_k L_k per token, weighted by the rule on the mixed stats, reduced. ``student`` with grad;
    ``sources``: dicts of token_terms' teacher arguments; ``mixing``: one tensor per teacher (broadcast)."""
    terms = [token_terms(student, source.get("teacher_logits"), divergence=divergence, temperature=temperature,
                         tokens=tokens, teacher_logprobs=source.get("teacher_logprobs"),
                         teacher_topk=source.get("teacher_topk"), topk=TopKOptions("tail"))
             for source in sources]
    dtype = student.dtype
    loss = sum(t.loss * m.to(dtype) for t, m in zip(terms, mixing, strict=True))
    divergence_mix = sum(t.divergence.detach() * m.to(dtype) for t, m in zip(terms, mixing, strict=True))
    confidence_mix = sum(t.confidence.detach() * m.to(dtype) for t, m in zip(terms, mixing, strict=True))
    w = compute_weights(weighting, valid=mask, divergence=divergence_mix.expand(mask.shape),
                        confidence=confidence_mix.expand(mask.shape),
                        user_weights=None if token_weights is None else token_weights.to(dtype),
                        teacher_token_logprobs=teacher_token_logprobs,
                        student_entropy=terms[0].student_entropy.detach())
    weighted = torch.where(mask, w * loss, 0.0)
    reduced = weighted if reduction == "none" else reduce_loss(weighted, mask, reduction, num_items_in_batch)
    return reduced, divergence_mix, w


WEIGHTINGS = {
    "none": None,
    "iw-opd": wpkl.Weighting(accumulated=0.5),
    "position": wpkl.Weighting(position=wpkl.ExpDecay(0.2), normalize=False),
    "position normalized capped": wpkl.Weighting(position=wpkl.PowerDecay(0.5), w_max=0.9),
    "confidence disagreement": wpkl.Weighting(confidence=1.0, disagreement=0.5, normalize=False),
    "tip": wpkl.Weighting(token_importance=wpkl.TokenImportance(0.5), normalize=False),
}


def _check(backend, dtype, mixing_kind, weighting_name, divergence="reverse_kl", reduction="mean", seed=0,
           count=3, forms=("logits",) * 3, temperature=0.8, user_weights=False, return_stats=True,
           num_items=None):
    g = _gen(seed)
    student64 = torch.randn(*LEADING, V, generator=g, dtype=torch.float64) * 2
    teachers64 = _teachers(g, student64, count)
    student, teachers = student64.to(dtype), [t.to(dtype) for t in teachers64]
    mask = random_mask(LEADING)
    tokens = torch.randint(0, V, LEADING, generator=g)
    mixing, mixing_ref = _mixing(mixing_kind, g, count)
    weighting = WEIGHTINGS[weighting_name]
    token_weights = torch.rand(LEADING, generator=g) + 0.5 if user_weights else None
    api, ref = [], []
    for form, teacher in zip(forms, teachers, strict=True):
        if form == "logits":
            api.append(teacher)
            ref.append(dict(teacher_logits=teacher.double()))
        elif form == "topk":
            ids, lq = _topk(teacher)
            api.append(dict(teacher_topk_ids=ids, teacher_topk_logprobs=lq.to(dtype)))
            ref.append(dict(teacher_topk=TopK(ids, lq.to(dtype).double())))
        else:  # a teacher server's log q(y)
            lq_y = torch.log_softmax(teacher.double() / temperature, -1).gather(-1, tokens[..., None])[..., 0]
            api.append(dict(teacher_logprobs=lq_y.to(dtype)))
            ref.append(dict(teacher_logprobs=lq_y.to(dtype).double()))
    x = student.clone().requires_grad_(True)
    out = wpkl.multi_teacher_loss(x, teachers=api, mixing=mixing, weighting=weighting, mask=mask, tokens=tokens,
                                  divergence=divergence, temperature=temperature, reduction=reduction,
                                  backend=backend, return_stats=return_stats, token_weights=token_weights,
                                  num_items_in_batch=num_items)
    loss, stats = out if return_stats else (out, None)
    upstream = torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5
    (loss * upstream.to(loss.dtype)).sum().backward()
    options = dict(weighting=weighting, mask=mask, tokens=tokens, divergence=divergence, temperature=temperature,
                   reduction=reduction, token_weights=token_weights, num_items_in_batch=num_items)
    y = student.double().requires_grad_(True)
    expected, divergence_mix, w = mopd_reference(y, ref, mixing_ref, **options)
    (expected * upstream).sum().backward()
    low = student.clone().requires_grad_(True)  # plain torch in the inputs' dtype: the gradient rule's yardstick
    low_ref = [{k: (v.to(dtype) if isinstance(v, torch.Tensor) else TopK(v.ids, v.logprobs.to(dtype)))
                for k, v in source.items()} for source in ref]
    (mopd_reference(low, low_ref, mixing_ref, **options)[0].double() * upstream).sum().backward()
    assert_values_close(loss, expected)
    if return_stats:
        assert_values_close(stats.divergence, torch.where(mask, divergence_mix.expand(mask.shape), 0.0))
        assert_values_close(stats.weight, torch.where(mask, w, 0.0))
    assert_grad_close(x.grad, y.grad, low.grad.double(), dtype)


@pytest.mark.parametrize("backend", ("triton", "torch"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mixing", ("uniform", "per teacher", "per sequence", "per token"))
def test_matches_reference(backend, dtype, mixing, small_blocks):
    names = list(WEIGHTINGS)
    index = (DTYPES.index(dtype) * 4 + ("uniform", "per teacher", "per sequence", "per token").index(mixing))
    _check(backend, dtype, mixing, names[index % len(names)], seed=index)


@pytest.mark.parametrize("weighting", list(WEIGHTINGS))
@pytest.mark.parametrize("divergence,reduction", [("reverse_kl", "mean"), ("forward_kl", "sum"),
                                                  ("jsd", "seq_mean"), ("sampled", "none")])
def test_every_weighting_and_divergence(weighting, divergence, reduction, small_blocks):
    _check("triton", torch.float32, "per token", weighting, divergence=divergence, reduction=reduction,
           seed=len(weighting) + len(divergence), user_weights=True)


@pytest.mark.parametrize("weighting", ["none", "position", "position normalized capped", "iw-opd"])
@pytest.mark.parametrize("mixing", ["per teacher", "per sequence", "per token"])
@pytest.mark.parametrize("reduction,num_items", [("mean", None), ("mean", 7.0), ("seq_mean", None)])
def test_without_stats_and_with_a_token_count(weighting, mixing, reduction, num_items, small_blocks):
    """The paths that weigh without the stats (linear rules; normalize or w_max from one no-grad call; routing
    that masks the tokens a teacher is routed away from) and ``num_items_in_batch``."""
    _check("triton", torch.float32, mixing, weighting, reduction=reduction, num_items=num_items, return_stats=False,
           seed=len(weighting) + len(mixing), user_weights=True)


def test_a_teacher_routed_away_counts_nothing_there():
    """One-hot routing: a teacher's infinite divergence (it bans a token the student allows) on the sequences
    routed to another teacher leaves the loss and gradient those of the routed teachers alone."""
    g = _gen(13)
    student = torch.randn(2, 4, V, generator=g, dtype=torch.float64)
    t0, t1 = _teachers(g, student, 2)
    t1[1, :, 0] = -float("inf")  # sequence 1 is routed to teacher 0
    routing = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    routed = torch.stack([t1[0], t0[1]])
    for reduction in ("mean", "sum", "seq_mean", "none"):
        for weighting in (None, wpkl.Weighting(accumulated=0.5), wpkl.Weighting(position=wpkl.ExpDecay(1.0))):
            x, y = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
            loss = wpkl.multi_teacher_loss(x, teachers=[t0, t1], mixing=routing, weighting=weighting,
                                           reduction=reduction)
            expected = wpkl.weighted_kl_loss(y, routed, weighting=weighting, reduction=reduction)
            loss.sum().backward()
            expected.sum().backward()
            assert torch.isfinite(loss).all()
            # (the weights of a weighting come from the float32 stats)
            torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", ("triton", "torch"))
@pytest.mark.parametrize("forms,divergence", [(("logits", "topk"), "reverse_kl"), (("topk", "topk"), "forward_kl"),
                                              (("logits", "server"), "sampled")])
def test_teachers_of_different_forms(backend, forms, divergence, small_blocks):
    _check(backend, torch.float32, "per teacher", "iw-opd", divergence=divergence, count=len(forms), forms=forms,
           seed=len(forms[1]))


def test_is_the_weighted_sum_of_the_teachers_divergences():
    """Eq. 5 in plain torch: 0.3 KL(p || q_1) + 0.7 KL(p || q_2), averaged over the valid tokens."""
    g = _gen(5)
    student = torch.randn(*LEADING, V, generator=g, dtype=torch.float64)
    t1, t2 = _teachers(g, student, 2)
    mask = random_mask(LEADING)
    x = student.clone().requires_grad_(True)
    loss = wpkl.multi_teacher_loss(x, teachers=[t1, t2], mixing=[0.3, 0.7], mask=mask)
    log_p = torch.log_softmax(student, -1)

    def kl(t):
        return (log_p.exp() * (log_p - torch.log_softmax(t, -1))).sum(-1)

    expected = torch.where(mask, 0.3 * kl(t1) + 0.7 * kl(t2), 0.0).sum() / mask.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    # one teacher with weight 1 is the plain call
    single = wpkl.weighted_kl_loss(student, t1, mask=mask, weighting=wpkl.Weighting(accumulated=0.5))
    torch.testing.assert_close(wpkl.multi_teacher_loss(student, teachers=[t1], weighting=wpkl.Weighting(accumulated=0.5),
                                                       mask=mask), single, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ("triton", "torch"))
def test_fused_linear(backend, small_blocks):
    g = _gen(9)
    B, T, H = 2, 5, 8
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.5
    teachers = [torch.randn(B, T, H, generator=g) for _ in range(2)]
    tw = torch.randn(V, H, generator=g) * 0.5
    other_head = torch.randn(V, H, generator=g) * 0.5
    mask = random_mask((B, T))
    routing = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # sequence 0 to teacher 0, sequence 1 to teacher 1
    weighting = wpkl.Weighting(accumulated=0.5)
    hx, wx = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = wpkl.multi_teacher_loss(hx, wx, teachers=[teachers[0], dict(teacher_hidden=teachers[1],
                                                                       teacher_weight=other_head)],
                                   teacher_weight=tw, mixing=routing, weighting=weighting, mask=mask,
                                   fused_linear=True, backend=backend)
    loss.backward()
    hy, wy = h.double().requires_grad_(True), w.double().requires_grad_(True)
    logits = hy @ wy.T
    ref = [dict(teacher_logits=teachers[0].double() @ tw.double().T),
           dict(teacher_logits=teachers[1].double() @ other_head.double().T)]
    expected = mopd_reference(logits, ref, [routing[0][:, None].double(), routing[1][:, None].double()],
                              weighting=weighting, mask=mask, tokens=None, divergence="reverse_kl", temperature=1.0,
                              reduction="mean")[0]
    expected.backward()
    assert_values_close(loss, expected)
    torch.testing.assert_close(hx.grad.double(), hy.grad, rtol=2e-4, atol=2e-6)
    torch.testing.assert_close(wx.grad.double(), wy.grad, rtol=2e-4, atol=2e-6)


def test_fused_linear_mixes_a_hidden_state_teacher_and_a_top_k_one():
    """The shared ``teacher_weight`` goes to the hidden-state teachers only."""
    g = _gen(10)
    B, T, H = 2, 4, 6
    h, w = torch.randn(B, T, H, generator=g, dtype=torch.float64), torch.randn(V, H, generator=g, dtype=torch.float64)
    th, tw = torch.randn(B, T, H, generator=g, dtype=torch.float64), torch.randn(V, H, generator=g, dtype=torch.float64)
    ids, lq = _topk((h + torch.randn(B, T, H, generator=g, dtype=torch.float64)) @ w.T)
    hx = h.clone().requires_grad_(True)
    loss = wpkl.multi_teacher_loss(hx, w, teachers=[th, dict(teacher_topk_ids=ids, teacher_topk_logprobs=lq)],
                                   teacher_weight=tw, mixing=[0.4, 0.6], fused_linear=True)
    loss.backward()
    hy = h.clone().requires_grad_(True)
    expected = (0.4 * wpkl.weighted_kl_loss(hy @ w.T, th @ tw.T)
                + 0.6 * wpkl.weighted_kl_loss(hy @ w.T, None, teacher_topk_ids=ids, teacher_topk_logprobs=lq))
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(hx.grad, hy.grad, rtol=1e-9, atol=1e-12)


def test_bad_input():
    g = _gen(3)
    student = torch.randn(*LEADING, V, generator=g)
    t = torch.randn(*LEADING, V, generator=g)
    cases = [
        (dict(teachers=[t], teacher_logits=t), ValueError, "give the teachers in teachers=[...]"),
        (dict(teachers=t), ValueError, "non-empty list"),
        (dict(teachers=[]), ValueError, "non-empty list"),
        (dict(teachers=[t, 3]), TypeError, "must be a tensor or a dict"),
        (dict(teachers=[dict(teacher_logit=t)]), ValueError, "teacher 0 has teacher_logit"),
        (dict(teachers=[t, t], mixing=[1.0]), ValueError, "2 numbers"),
        (dict(teachers=[t, t], mixing=[1.0, float("nan")]), ValueError, "finite numbers"),
        (dict(teachers=[t, t], mixing=torch.ones(3)), ValueError, "2 rows"),
        (dict(teachers=[t, t], mixing=torch.ones(2, 4)), ValueError, "prefix of the tokens' leading shape"),
        (dict(teachers=[t, t], mixing=torch.ones(2, 3, dtype=torch.long)), TypeError, "floating point"),
        (dict(teachers=[t], weighting=wpkl.Weighting(accumulated=0.5), sequence_ids=torch.zeros(LEADING, dtype=torch.long)),
         ValueError, "sequence_ids needs positions"),
        (dict(teachers=[t, t], inplace_backward=True), ValueError, "inplace_backward=True would overwrite"),
        (dict(teachers=[t, t], mixing=[0, 0.0]), ValueError, "all 0"),
        (dict(teachers=[t, dict(teacher_logprobs=-torch.rand(LEADING))], tokens=torch.zeros(LEADING, dtype=torch.long),
              divergence="sampled", weighting=wpkl.Weighting(confidence=1.0)), ValueError, "carry no confidence"),
        (dict(teachers=[dict(teacher_logits=t, teacher_token_logprobs=-torch.rand(LEADING)), t]), ValueError,
         "in every teacher's dict"),
        (dict(teachers=[dict(teacher_logits=t, teacher_token_logprobs=-torch.rand(LEADING))],
              teacher_token_logprobs=-torch.rand(LEADING)), ValueError, "not both"),
        (dict(teachers=[t], weighting=wpkl.Weighting(prefix_confidence=wpkl.PrefixConfidence()),
              tokens=torch.zeros(LEADING, dtype=torch.long)), ValueError, "needs teacher_token_logprobs"),
    ]
    for options, error, words in cases:
        with pytest.raises(error) as info:
            wpkl.multi_teacher_loss(student, **options)
        assert words in str(info.value), (options, str(info.value))


def test_entropy_gated_loss_refuses_an_inplace_backward():
    student, teacher = torch.randn(2, 3, V), torch.randn(2, 3, V)
    with pytest.raises(ValueError, match="inplace_backward=True would overwrite"):
        wpkl.entropy_gated_loss(student, teacher, inplace_backward=True)


def test_prefix_confidence_mixes_the_teachers_log_q_y():
    """prefix_confidence reads sum_k m_k log q_k(y) when each teacher brings its own log q(y)."""
    g = _gen(11)
    student = torch.randn(*LEADING, V, generator=g)
    teachers = _teachers(g, student.double(), 2)
    tokens = torch.randint(0, V, LEADING, generator=g)
    mask = random_mask(LEADING)
    lq = [torch.log_softmax(t, -1).gather(-1, tokens[..., None])[..., 0].float() for t in teachers]
    weighting = wpkl.Weighting(prefix_confidence=wpkl.PrefixConfidence(), normalize=False)
    loss = wpkl.multi_teacher_loss(student, teachers=[dict(teacher_logits=t.float(), teacher_token_logprobs=l)
                                                      for t, l in zip(teachers, lq, strict=True)],
                                   mixing=[0.25, 0.75], weighting=weighting, mask=mask, tokens=tokens)
    given = wpkl.multi_teacher_loss(student, teachers=[t.float() for t in teachers], mixing=[0.25, 0.75],
                                    weighting=weighting, mask=mask, tokens=tokens,
                                    teacher_token_logprobs=0.25 * lq[0] + 0.75 * lq[1])
    torch.testing.assert_close(loss, given)
    flat = wpkl.multi_teacher_loss(student, teachers=[t.float() for t in teachers], mixing=[0.25, 0.75],
                                   weighting=None, mask=mask, tokens=tokens)
    assert not torch.allclose(loss, flat)  # the weight acts
    mixed = 0.25 * lq[0].double() + 0.75 * lq[1].double()
    expected = mopd_reference(student.double(), [dict(teacher_logits=t.float().double()) for t in teachers],
                              [torch.tensor(0.25, dtype=torch.float64), torch.tensor(0.75, dtype=torch.float64)],
                              weighting=weighting, mask=mask, tokens=tokens, divergence="reverse_kl",
                              temperature=1.0, reduction="mean", teacher_token_logprobs=mixed)[0]
    assert_values_close(loss, expected)


# ------------------------------------------------------------------------------------ vocabulary and sequence shards


def _world_case(rank, world, group):
    """Two teachers (logits and top-k), per-token mixing: the vocabulary-sharded call against the whole-vocabulary
    call (IW-OPD, weights that read the teachers) and the sequence-split call against the whole batch (a position
    schedule, normalized and capped)."""
    g = _gen(21)
    B, T, Vw = 2, 6, 4 * world
    student = torch.randn(B, T, Vw, generator=g, dtype=torch.float64) * 2
    teacher = student + torch.randn(B, T, Vw, generator=g, dtype=torch.float64)
    ids, lq = torch.log_softmax(student + 2 * torch.randn(B, T, Vw, generator=g, dtype=torch.float64), -1).topk(
        3, dim=-1)[::-1]
    mask = torch.rand(B, T, generator=g) < 0.7  # the same on every rank
    mask[0, 0], mask[1, 2:] = True, False
    mixing = torch.rand(2, B, T, generator=g, dtype=torch.float64)
    results = {}

    def case(name, fn):
        try:
            fn()
            results[name] = None
        except Exception:  # noqa: BLE001 - reported to the parent test
            results[name] = traceback.format_exc()

    def shards():
        weighting = wpkl.Weighting(accumulated=0.5)
        sl = slice(rank * 4, rank * 4 + 4)
        x = student[..., sl].clone().requires_grad_(True)
        loss = wpkl.multi_teacher_loss(x, teachers=[teacher[..., sl], dict(teacher_topk_ids=ids,
                                                                            teacher_topk_logprobs=lq)],
                                       mixing=mixing, weighting=weighting, mask=mask, process_group=group)
        loss.backward()
        y = student.clone().requires_grad_(True)
        whole = wpkl.multi_teacher_loss(y, teachers=[teacher, dict(teacher_topk_ids=ids, teacher_topk_logprobs=lq)],
                                        mixing=mixing, weighting=weighting, mask=mask)
        whole.backward()
        torch.testing.assert_close(loss, whole, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(x.grad, y.grad[..., sl], rtol=1e-9, atol=1e-11)

    def triton_shards():  # float32 on the Triton backend: the logits and top-k teachers' shared sharded pass,
        sl = slice(rank * 4, rank * 4 + 4)  # against the float64 reference on the whole vocabulary
        sources = [teacher.float(), dict(teacher_topk_ids=ids, teacher_topk_logprobs=lq.float())]
        weighting = wpkl.Weighting(accumulated=0.5)
        x = student[..., sl].float().requires_grad_(True)
        loss = wpkl.multi_teacher_loss(x, teachers=[sources[0][..., sl], sources[1]], mixing=mixing.float(),
                                       mask=mask, process_group=group, backend="triton", weighting=weighting)
        loss.backward()
        y = student.float().double().requires_grad_(True)
        whole = wpkl.multi_teacher_loss(y, teachers=[teacher.float().double(), dict(
            teacher_topk_ids=ids, teacher_topk_logprobs=lq.float().double())], mixing=mixing.float().double(),
            mask=mask, backend="reference", weighting=weighting)
        whole.backward()
        torch.testing.assert_close(loss.double(), whole, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad.double(), y.grad[..., sl], rtol=1e-4, atol=1e-6)

    def sequences(weighting, bounded=False, backend="torch"):
        # (the Triton backend: float32 against the float64 reference on the whole batch)
        flat = torch.arange(B * T)
        mine = flat[flat % world == rank]  # tokens dealt round-robin: non-contiguous chunks
        positions = torch.arange(T).expand(B, T).reshape(-1)
        sequence_ids = torch.arange(B)[:, None].expand(B, T).reshape(-1)
        low = (lambda t: t) if backend == "torch" else (lambda t: t.float())

        def local(x):
            return x.reshape(B * T, *x.shape[2:])[mine]

        x = low(local(student)).clone().requires_grad_(True)
        loss = wpkl.multi_teacher_loss(x, teachers=[low(local(teacher)), dict(teacher_topk_ids=local(ids),
                                                                              teacher_topk_logprobs=low(local(lq)))],
                                       mixing=low(local(mixing.permute(1, 2, 0)).T.contiguous()), weighting=weighting,
                                       mask=local(mask), positions=positions[mine], sequence_ids=sequence_ids[mine],
                                       sequence_group=group, sequence_bounds=(B, T) if bounded else None,
                                       backend=backend)
        loss.backward()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total, group=group)
        y = low(student).double().clone().requires_grad_(True)
        whole = wpkl.multi_teacher_loss(y, teachers=[low(teacher).double(), dict(
            teacher_topk_ids=ids, teacher_topk_logprobs=low(lq).double())], mixing=low(mixing).double(),
            weighting=weighting, mask=mask, backend="torch" if backend == "torch" else "reference")
        whole.backward()
        tol = dict(rtol=1e-9, atol=1e-11) if backend == "torch" else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(total.double(), whole, **tol)
        torch.testing.assert_close(x.grad.double(), local(y.grad), **(tol if backend == "torch" else
                                                                       dict(rtol=1e-4, atol=1e-6)))

    def sequences_linear(backend):
        # the fused-linear form split over the sequence group: a hidden-state teacher and a top-k one, per-token
        # mixing, IW-OPD weights across the ranks' chunks
        g = _gen(25)
        H = 5
        h, w = torch.randn(B, T, H, generator=g, dtype=torch.float64), torch.randn(Vw, H, generator=g,
                                                                                   dtype=torch.float64)
        ht, wt = torch.randn(B, T, H, generator=g, dtype=torch.float64), torch.randn(Vw, H, generator=g,
                                                                                     dtype=torch.float64)
        flat = torch.arange(B * T)
        mine = flat[flat % world == rank]
        low = (lambda t: t) if backend == "torch" else (lambda t: t.float())
        weighting = wpkl.Weighting(accumulated=0.5)

        def local(x):
            return x.reshape(B * T, *x.shape[2:])[mine]

        x = [low(local(h)).clone().requires_grad_(True), low(w).clone().requires_grad_(True)]
        loss = wpkl.multi_teacher_loss(x[0], x[1], teachers=[dict(teacher_hidden=low(local(ht)), teacher_weight=low(wt)),
                                                             dict(teacher_topk_ids=local(ids),
                                                                  teacher_topk_logprobs=low(local(lq)))],
                                       mixing=low(local(mixing.permute(1, 2, 0)).T.contiguous()), fused_linear=True,
                                       weighting=weighting, mask=local(mask), backend=backend, chunk_size=3,
                                       positions=torch.arange(T).expand(B, T).reshape(-1)[mine],
                                       sequence_ids=torch.arange(B)[:, None].expand(B, T).reshape(-1)[mine],
                                       sequence_group=group)
        loss.backward()
        total, grad_w = loss.detach().clone(), x[1].grad.clone()
        torch.distributed.all_reduce(total, group=group)
        torch.distributed.all_reduce(grad_w, group=group)  # (each rank's tokens' share of the weight's gradient)
        y = [low(h).double().clone().requires_grad_(True), low(w).double().clone().requires_grad_(True)]
        whole = wpkl.multi_teacher_loss(y[0], y[1], teachers=[dict(teacher_hidden=low(ht).double(),
                                                                   teacher_weight=low(wt).double()),
                                                              dict(teacher_topk_ids=ids,
                                                                   teacher_topk_logprobs=low(lq).double())],
                                        mixing=low(mixing).double(), fused_linear=True, weighting=weighting,
                                        mask=mask, backend="reference")
        whole.backward()
        tol = dict(rtol=1e-7, atol=1e-9) if backend == "torch" else dict(rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(total.double(), whole, **tol)
        torch.testing.assert_close(x[0].grad.double(), local(y[0].grad), **tol)
        torch.testing.assert_close(grad_w.double(), y[1].grad, **tol)

    def sequences_one_read():  # dense mixing on the Triton backend: both logits teachers in one pass per rank
        flat = torch.arange(B * T)
        mine = flat[flat % world == rank]
        second = student - torch.randn(B, T, Vw, generator=_gen(23), dtype=torch.float64)
        weighting = wpkl.Weighting(accumulated=0.5)

        def local(x):
            return x.reshape(B * T, *x.shape[2:])[mine].float()

        x = local(student).requires_grad_(True)
        loss = wpkl.multi_teacher_loss(x, teachers=[local(teacher), local(second)], mixing=[0.3, 0.9],
                                       weighting=weighting, mask=local(mask).bool(), backend="triton",
                                       positions=torch.arange(T).expand(B, T).reshape(-1)[mine],
                                       sequence_ids=torch.arange(B)[:, None].expand(B, T).reshape(-1)[mine],
                                       sequence_group=group)
        loss.backward()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total, group=group)
        y = student.clone().requires_grad_(True)
        whole = wpkl.multi_teacher_loss(y, teachers=[teacher, second], mixing=[0.3, 0.9], weighting=weighting,
                                        mask=mask, backend="reference")
        whole.backward()
        torch.testing.assert_close(total.double(), whole, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad.double(), local(y.grad).double(), rtol=1e-4, atol=1e-6)

    def gap_threshold(logits):
        """A threshold on the teacher's entropy that opens the gate on about half the valid tokens, in the widest
        gap of the middle entropies: no token lies within float32 rounding of it."""
        log_q = torch.log_softmax(logits, -1)
        entropies = (-(log_q.exp() * log_q).sum(-1)[mask]).sort().values
        i = max(range(len(entropies) // 4, 3 * len(entropies) // 4),
                key=lambda j: float(entropies[j + 1] - entropies[j]))
        return float(entropies[i] + entropies[i + 1]) / 2

    threshold = gap_threshold(teacher)

    def eopd_triton_shards(fused, gated_topk):
        # EOPD on the Triton backend's sharded kernels: materialized or fused-linear, the gated term against the
        # teacher's logits or (the authors' form) over its top-k, renormalized (the sharded top-k kernels)
        sl = slice(rank * 4, rank * 4 + 4)
        tokens = torch.randint(0, Vw, (B, T), generator=_gen(22))
        gate_options = dict(teacher_topk_ids=ids, teacher_topk_logprobs=lq.float(), topk_mode="renormalize") \
            if gated_topk else None
        options = dict(mask=mask, tokens=tokens, divergence="sampled", weighting=wpkl.Weighting(accumulated=0.5))
        if fused:
            g = _gen(26)
            h, w, ht, wt = (torch.randn(*shape, generator=g, dtype=torch.float64).float().double()
                            for shape in ((B, T, 5), (Vw, 5), (B, T, 5), (Vw, 5)))
            options["threshold"] = gap_threshold(ht @ wt.T)
            x = [h.float().requires_grad_(True), w[sl].float().requires_grad_(True)]
            loss = wpkl.entropy_gated_loss(x[0], x[1], ht.float(), wt[sl].float(), fused_linear=True,
                                           process_group=group, backend="triton", chunk_size=4, **options)
            y = [h.clone().requires_grad_(True), w.clone().requires_grad_(True)]
            whole = wpkl.entropy_gated_loss(y[0], y[1], ht, wt, fused_linear=True, backend="reference", **options)
            truths = (y[0], y[1])
        else:
            options["threshold"] = threshold
            x = [student[..., sl].float().requires_grad_(True)]
            loss = wpkl.entropy_gated_loss(x[0], teacher[..., sl].float(), process_group=group, backend="triton",
                                           gate_options=gate_options, **options)
            y = [student.float().double().requires_grad_(True)]
            whole = wpkl.entropy_gated_loss(y[0], teacher.float().double(), backend="reference",
                                            gate_options=None if gate_options is None else dict(
                                                gate_options, teacher_topk_logprobs=lq.float().double()),
                                            **options)
            truths = (y[0],)
        loss.backward()
        whole.backward()
        torch.testing.assert_close(loss.double(), whole, rtol=1e-5, atol=1e-6)
        for n, (got, truth) in enumerate(zip(x, truths, strict=True)):
            expected = (truth.grad if n == 0 else truth.grad[sl]) if fused else truth.grad[..., sl]
            torch.testing.assert_close(got.grad.double(), expected, rtol=1e-4, atol=1e-6)

    def eopd_shards():  # EOPD (wpkl.entropy_gated_loss) composes the same way: its gate from the merged entropy
        sl = slice(rank * 4, rank * 4 + 4)
        tokens = torch.randint(0, Vw, (B, T), generator=_gen(22))
        x = student[..., sl].clone().requires_grad_(True)
        loss = wpkl.entropy_gated_loss(x, teacher[..., sl], mask=mask, tokens=tokens, divergence="sampled",
                                       threshold=threshold, process_group=group)
        loss.backward()
        y = student.clone().requires_grad_(True)
        whole, _, gate = wpkl.entropy_gated_loss(y, teacher, mask=mask, tokens=tokens, divergence="sampled",
                                                 threshold=threshold, return_stats=True)
        whole.backward()
        assert 0 < int((gate.bool() & mask).sum()) < int(mask.sum())
        torch.testing.assert_close(loss, whole, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(x.grad, y.grad[..., sl], rtol=1e-9, atol=1e-11)

    def eopd_sequences():
        flat = torch.arange(B * T)
        mine = flat[flat % world == rank]
        weighting = wpkl.Weighting(accumulated=0.5)

        def local(x):
            return x.reshape(B * T, *x.shape[2:])[mine]

        x = local(student).clone().requires_grad_(True)
        loss = wpkl.entropy_gated_loss(x, local(teacher), mask=local(mask), threshold=threshold, weighting=weighting,
                                       positions=torch.arange(T).expand(B, T).reshape(-1)[mine],
                                       sequence_ids=torch.arange(B)[:, None].expand(B, T).reshape(-1)[mine],
                                       sequence_group=group)
        loss.backward()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total, group=group)
        y = student.clone().requires_grad_(True)
        whole = wpkl.entropy_gated_loss(y, teacher, mask=mask, threshold=threshold, weighting=weighting)
        whole.backward()
        torch.testing.assert_close(total, whole, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(x.grad, local(y.grad), rtol=1e-9, atol=1e-11)

    case("vocabulary shards", shards)
    case("vocabulary shards, Triton", triton_shards)
    case("sequence split", lambda: sequences(wpkl.Weighting(position=wpkl.ExpDecay(0.3), w_max=1.2)))
    # weights that read the teachers: IW-OPD's prefix share of the mixed divergence, across the ranks' chunks
    case("sequence split, weights on the mixture", lambda: sequences(wpkl.Weighting(accumulated=0.5, w_max=1.5,
                                                                                    normalize=True)))
    case("sequence split, bounded", lambda: sequences(wpkl.Weighting(accumulated=0.5, normalize=True), bounded=True))
    case("sequence split, one read of the student", sequences_one_read)
    case("eopd vocabulary shards", eopd_shards)
    case("eopd sequence split", eopd_sequences)
    case("sequence split, Triton, a top-k teacher", lambda: sequences(wpkl.Weighting(accumulated=0.5),
                                                                       backend="triton"))
    for backend in ("torch", "triton"):
        case(f"sequence split, fused-linear, {backend}", lambda b=backend: sequences_linear(b))
    for fused, gated_topk in ((False, False), (False, True), (True, False)):
        case(f"eopd vocabulary shards, Triton, fused-linear={fused}, top-k gated term={gated_topk}",
             lambda f=fused, k=gated_topk: eopd_triton_shards(f, k))
    return results


def _worker(rank, world, port, out_dir):
    os.environ.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = _world_case(rank, world, torch.distributed.group.WORLD)
    except Exception:  # noqa: BLE001
        results = {"setup": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"results": results}, f)
    torch.distributed.barrier()
    leave_worker()


@pytest.mark.parametrize("world", (2, 3))
def test_vocabulary_and_sequence_shards(world, tmp_path):
    results = spawn_worlds(_worker, {world: str(tmp_path)}, timeout_s=300)[world]
    assert_ranks_passed(results)
    assert all(set(r["results"]) == {"vocabulary shards", "vocabulary shards, Triton", "sequence split",
                                     "sequence split, weights on the mixture", "sequence split, bounded",
                                     "sequence split, one read of the student",
                                     "eopd vocabulary shards", "eopd sequence split",
                                     "sequence split, Triton, a top-k teacher", "sequence split, fused-linear, torch",
                                     "sequence split, fused-linear, triton",
                                     *(f"eopd vocabulary shards, Triton, fused-linear={f}, top-k gated term={k}"
                                       for f, k in ((False, False), (False, True), (True, False)))}
               for r in results)


@pytest.mark.parametrize("routing", ("per sequence", "per token", "dense"))
def test_the_student_rows_each_pass_reads(routing, monkeypatch):
    """The kernels read a row only where its token is valid for the pass's teacher (a masked row reads nothing):
    under one-hot routing, the paper's deployment, each valid student row is read once forward and once backward
    over all the teachers' passes; with dense mixing once too, by the pass that reads all the teachers at once
    (kernels/token_mixture.py)."""
    from wpkl.backends.triton_mixture import TritonMixturePass
    from wpkl.backends.triton_pass import TritonPass

    K = 3
    g = _gen(31)
    student = torch.randn(*LEADING, V, generator=g, requires_grad=True)
    teachers = [torch.randn(*LEADING, V, generator=g) for _ in range(K)]
    mask = random_mask(LEADING)
    if routing == "per sequence":
        mixing = torch.nn.functional.one_hot(torch.tensor([0, 2, 1]), K).T.float()
    elif routing == "per token":
        mixing = torch.nn.functional.one_hot(torch.randint(0, K, LEADING, generator=g), K).permute(2, 0, 1).float()
    else:
        mixing = [0.2, 0.3, 0.5]
    rows = {"forward": 0, "backward": 0}
    forward, backward = TritonPass.forward, TritonPass.backward

    def counted_forward(student, teacher, valid, *rest):
        rows["forward"] += int(valid.sum())
        return forward(student, teacher, valid, *rest)

    def counted_backward(saved, coef, out):
        rows["backward"] += int(saved.valid_bytes.sum())
        return backward(saved, coef, out)

    mixture_forward, mixture_backward = TritonMixturePass.forward, TritonMixturePass.backward

    def counted_mixture_forward(student, teachers, valids, spec):
        rows["forward"] += int(valids.any(0).sum())
        return mixture_forward(student, teachers, valids, spec)

    def counted_mixture_backward(saved, coef, out):
        rows["backward"] += int(saved.valid.bool().any(0).sum())
        return mixture_backward(saved, coef, out)

    monkeypatch.setattr(TritonPass, "forward", staticmethod(counted_forward))
    monkeypatch.setattr(TritonPass, "backward", staticmethod(counted_backward))
    monkeypatch.setattr(TritonMixturePass, "forward", staticmethod(counted_mixture_forward))
    monkeypatch.setattr(TritonMixturePass, "backward", staticmethod(counted_mixture_backward))
    loss = wpkl.multi_teacher_loss(student, teachers=teachers, mixing=mixing, mask=mask,
                                   weighting=wpkl.Weighting(accumulated=0.5), backend="triton")
    loss.backward()
    valid = int(mask.sum())
    assert rows == {"forward": valid, "backward": valid}
    monkeypatch.undo()
    y = student.detach().clone().requires_grad_(True)
    whole = wpkl.multi_teacher_loss(y, teachers=teachers, mixing=mixing, mask=mask,
                                    weighting=wpkl.Weighting(accumulated=0.5), backend="reference")
    whole.backward()
    torch.testing.assert_close(loss, whole.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student.grad, y.grad.float(), rtol=1e-4, atol=1e-6)


def test_tokens_no_teacher_weighs_keep_the_students_entropy():
    """A valid token whose mixing is 0 for every teacher: loss 0 there, but the student's entropy is its own (TIP
    min-max scales it over every valid token)."""
    g = _gen(41)
    student = torch.randn(*LEADING, V, generator=g, dtype=torch.float64)
    teachers = [torch.randn(*LEADING, V, generator=g, dtype=torch.float64) for _ in range(2)]
    mask = torch.ones(LEADING, dtype=torch.bool)
    mixing = torch.nn.functional.one_hot(torch.randint(0, 2, LEADING, generator=g), 2).permute(2, 0, 1).double()
    mixing[:, 0, 1] = mixing[:, 2, 4] = 0.0
    weighting = wpkl.Weighting(token_importance=wpkl.TokenImportance(0.5))
    for backend in ("torch", "triton"):
        x = student.clone().requires_grad_(True)
        loss, stats = wpkl.multi_teacher_loss(x if backend == "torch" else x.float(),
                                              teachers=[t if backend == "torch" else t.float() for t in teachers],
                                              mixing=mixing, mask=mask, weighting=weighting, return_stats=True,
                                              backend=backend)
        y = student.clone().requires_grad_(True)
        expected = mopd_reference(y, [dict(teacher_logits=t) for t in teachers], list(mixing), weighting=weighting,
                                  mask=mask, tokens=None, divergence="reverse_kl", temperature=1.0,
                                  reduction="mean")[0]
        entropy = -(torch.softmax(student, -1) * torch.log_softmax(student, -1)).sum(-1)
        torch.testing.assert_close(stats.student_entropy.double(), entropy, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
        loss.backward()
        expected.backward()
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-6)


def test_a_teachers_own_options_apply_to_it():
    """teacher_softcap given in one teacher's dict (fused_linear) applies to that teacher only."""
    g = _gen(43)
    B, T, H = 2, 4, 8
    h, w = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g)
    th, tw = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g)
    loss = wpkl.multi_teacher_loss(h, w, teachers=[dict(teacher_hidden=th, teacher_softcap=0.5), th], mixing=[0.3, 0.7],
                                   teacher_weight=tw, fused_linear=True)
    one = [wpkl.fused_linear_kl_loss(h, w, th, tw, teacher_softcap=cap) for cap in (0.5, None)]
    torch.testing.assert_close(loss, 0.3 * one[0] + 0.7 * one[1], rtol=1e-5, atol=1e-7)


def test_a_teachers_values_are_checked_only_where_it_is_weighed():
    """teacher_logprobs NaN on a sequence routed to the other teacher is never read; on its own sequence it is
    rejected."""
    g = _gen(45)
    student = torch.randn(*LEADING, V, generator=g)
    tokens = torch.randint(0, V, LEADING, generator=g)
    logprobs = -torch.rand(LEADING, generator=g)
    logprobs[1] = float("nan")
    routing = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    other = torch.randn(*LEADING, V, generator=g)
    loss = wpkl.multi_teacher_loss(student, teachers=[dict(teacher_logprobs=logprobs), other], mixing=routing,
                                   tokens=tokens, divergence="sampled")
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="teacher_logprobs must be finite"):
        wpkl.multi_teacher_loss(student, teachers=[dict(teacher_logprobs=logprobs), other], mixing=routing.flip(0),
                                tokens=tokens, divergence="sampled")
