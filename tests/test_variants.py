"""The OPD variants (docs/recipes.md, "OPD variants"): PowerOPD's advantage (``sampled_power``), PW-OPSD's rising
position schedule (``PositionSigmoid``) and TIP's token selection (``TokenImportance``).

Each is checked twice: wpkl's float64 reference against the paper's formula written out here independently (plain
float64 torch, no wpkl code), and every backend and input form against wpkl's reference on the same rounded inputs
(values, stats and gradients; the vocabulary- and sequence-parallel forms in test_tensor_parallel.py and
test_sequence_parallel.py)."""

import math

import pytest
import torch

import wpkl
from utils import DTYPES, assert_grad_close, assert_values_close, check_backend, logits_pair, random_mask

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

BACKENDS = ("triton", "torch")


def _mean(x, mask):
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


# ------------------------------------------------------------------------------------------------ PowerOPD


def powered_by_hand(student, teacher_logprob_y, tokens, mask, alpha, temperature=1.0, rollout=None):
    """PowerOPD (arXiv 2606.17199; EIT-NLP/PowerOPD): r = q(y)^alpha - p(y)^alpha on the sampled token, detached,
    and the loss -r log p(y), averaged over the valid tokens. ``student`` float64 with grad."""
    log_p = torch.log_softmax(student / temperature, -1)
    log_p_y = log_p.gather(-1, tokens.clamp(min=0)[..., None])[..., 0]
    behaviour = log_p_y.detach() if rollout is None else rollout.double()
    reward = (teacher_logprob_y.double() * alpha).exp() - (behaviour * alpha).exp()
    return _mean(-reward * log_p_y, mask)


def _peaked(shape, dtype, seed):
    """Logits peaked enough that p(y)^5 and q(y)^5 are far from 0 (the regime PowerOPD acts in)."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=g, dtype=torch.float64) * 4
    teacher = student + torch.randn(shape, generator=g, dtype=torch.float64) * 2
    return student.to(dtype), teacher.to(dtype)


@pytest.mark.parametrize("alpha", [5.0, 1.0, 0.5])
@pytest.mark.parametrize("form", ["teacher logits", "teacher logprobs", "rollout"])
def test_reference_is_powered_opd(alpha, form):
    leading, V = (3, 6), 13
    student, teacher = _peaked((*leading, V), torch.float64, seed=1)
    mask = random_mask(leading)
    tokens = student.argmax(-1).masked_fill(torch.rand(leading) < 0.3, 2)  # likely tokens, a few others
    log_q_y = torch.log_softmax(teacher / 0.7, -1).gather(-1, tokens[..., None])[..., 0]
    rollout = (torch.log_softmax(student / 0.7, -1).gather(-1, tokens[..., None])[..., 0]
               - 0.2 * torch.rand(leading, dtype=torch.float64)) if form == "rollout" else None
    x = student.clone().requires_grad_(True)
    kwargs = dict(teacher_logprobs=log_q_y) if form == "teacher logprobs" else {}
    loss, stats = wpkl.weighted_kl_loss(x, None if form == "teacher logprobs" else teacher, mask=mask, tokens=tokens,
                                        divergence="sampled", sampled_power=alpha, temperature=0.7,
                                        rollout_logprobs=rollout, backend="reference", return_stats=True, **kwargs)
    loss.backward()
    y = student.clone().requires_grad_(True)
    expected = powered_by_hand(y, log_q_y, tokens, mask, alpha, 0.7, rollout)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-13)
    assert abs(expected.item()) > 1e-3  # the powered advantage is not negligible on these inputs
    # the reported divergence stays the log-ratio (the weights see it)
    log_p_y = torch.log_softmax(student / 0.7, -1).gather(-1, tokens[..., None])[..., 0]
    behaviour = log_p_y if rollout is None else rollout
    torch.testing.assert_close(stats.divergence.double(), torch.where(mask, behaviour - log_q_y, 0.0).float().double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1, 13, 97, 300])
@pytest.mark.parametrize("weighting", [None, wpkl.Weighting(accumulated=0.5, normalize=False)],
                         ids=["uniform", "iw-opd"])
def test_powered_backends_match_reference(backend, dtype, vocab, weighting, small_blocks, device):
    leading = (3, 7)
    student, teacher = _peaked((*leading, vocab), dtype, seed=vocab)
    mask = random_mask(leading)
    tokens = torch.randint(0, vocab, leading)
    check_backend(backend, student, teacher, dtype, device, mask=mask, tokens=tokens, divergence="sampled",
                  sampled_power=5.0, temperature=0.9, weighting=weighting, reduction="none",
                  upstream=torch.randn(leading))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rollout", [False, True])
def test_powered_teacher_logprobs_and_rollout(backend, rollout, device):
    """The teacher server's form (log q(y) given, no teacher logits), with and without the sampler's log p(y)."""
    leading, V = (2, 9), 41
    student, teacher = _peaked((*leading, V), torch.float32, seed=7)
    mask = random_mask(leading)
    tokens = torch.randint(0, V, leading)
    log_q_y = torch.log_softmax(teacher.double(), -1).gather(-1, tokens[..., None])[..., 0].float()
    roll = (torch.log_softmax(student.double(), -1).gather(-1, tokens[..., None])[..., 0] - 0.1).float() \
        if rollout else None
    kwargs = dict(mask=mask, tokens=tokens, divergence="sampled", sampled_power=5.0, teacher_logprobs=log_q_y,
                  rollout_logprobs=roll, reduction="sum")
    x = student.detach().clone().to(device).requires_grad_(True)
    loss = wpkl.weighted_kl_loss(x, None, backend=backend, **{k: v.to(device) if isinstance(v, torch.Tensor) else v
                                                               for k, v in kwargs.items()})
    loss.backward()
    y = student.detach().double().requires_grad_(True)
    expected = powered_by_hand(y, log_q_y, tokens, mask, 5.0, rollout=roll) * mask.sum()
    expected.backward()
    assert_values_close(loss, expected)
    torch.testing.assert_close(x.grad.double().cpu(), y.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_powered_fused_linear(backend):
    """fused_linear_kl_loss with sampled_power: the same loss and gradients as the materialized reference."""
    g = torch.Generator().manual_seed(3)
    N, H, V = 11, 6, 23
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 1.5
    teacher_hidden, teacher_weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 1.5
    mask, tokens = torch.rand(N, generator=g) > 0.2, torch.randint(0, V, (N,), generator=g)
    x, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = wpkl.fused_linear_kl_loss(x, w, teacher_hidden, teacher_weight, mask=mask, tokens=tokens,
                                     divergence="sampled", sampled_power=5.0, backend=backend, chunk_size=4)
    loss.backward()
    xr, wr = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref = wpkl.weighted_kl_loss(xr @ wr.T, teacher_hidden.double() @ teacher_weight.double().T, mask=mask,
                                tokens=tokens, divergence="sampled", sampled_power=5.0, backend="reference")
    ref.backward()
    assert_values_close(loss, ref)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_powered_fully_masked_batch(backend, device):
    student, teacher = _peaked((2, 4, 19), torch.float32, seed=5)
    x = student.detach().clone().to(device).requires_grad_(True)
    loss = wpkl.weighted_kl_loss(x, teacher.to(device), mask=torch.zeros(2, 4, dtype=torch.bool, device=device),
                                 tokens=torch.zeros(2, 4, dtype=torch.long, device=device), divergence="sampled",
                                 sampled_power=5.0, backend=backend)
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize("options,error,words", [
    (dict(divergence="reverse_kl", sampled_power=5.0), ValueError, 'applies to divergence="sampled"'),
    (dict(divergence="sampled", sampled_power=0.0), ValueError, "sampled_power must be > 0"),
    (dict(divergence="sampled", sampled_power=-1.0), ValueError, "sampled_power must be > 0"),
    (dict(divergence="sampled", sampled_power=math.inf), ValueError, "sampled_power must be finite"),
    (dict(divergence="sampled", sampled_power=True), TypeError, "sampled_power must be a real number"),
])
def test_powered_bad_options(options, error, words):
    with pytest.raises(error, match=words):
        wpkl.WeightedKLLoss(**options)


# ------------------------------------------------------------------------------------------------ PW-OPSD


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "sampled"])
def test_position_sigmoid_backends(backend, dtype, divergence, small_blocks, device):
    """PW-OPSD's recipe: the rising schedule, per-sequence means, no renormalization, T = 1.1."""
    leading, V = (3, 9), 97
    student, teacher = logits_pair((*leading, V), dtype)
    mask = random_mask(leading)
    check_backend(backend, student, teacher, dtype, device, mask=mask, tokens=torch.randint(0, V, leading),
                  divergence=divergence, temperature=1.1, reduction="seq_mean",
                  weighting=wpkl.Weighting(position=wpkl.PositionSigmoid(), normalize=False))


def test_position_sigmoid_is_pw_opsd():
    """The weight of the i-th response token (1-based) of a response of L_b tokens, as PW-OPSD writes it."""
    mask = torch.tensor([[True, True, True, True, False, False], [False, True, True, True, True, True]])
    student, teacher = logits_pair((2, 6, 5), torch.float64)
    _, stats = wpkl.weighted_kl_loss(student, teacher, mask=mask, backend="reference", return_stats=True,
                                     weighting=wpkl.Weighting(position=wpkl.PositionSigmoid(), normalize=False))
    for b, length in ((0, 4), (1, 5)):
        got = stats.weight[b][mask[b]].double()
        u = (torch.arange(1, length + 1, dtype=torch.float64) - 0.5) / length
        expected = 0.25 + 0.75 / (1 + torch.exp(-(u - 0.3) / 0.1))
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert (stats.weight[~mask] == 0).all()


# ------------------------------------------------------------------------------------------------ TIP


def tip_by_hand(entropy, divergence, mask, keep):
    """TIP (arXiv 2604.14084): s = h + d - h d from min-max normalized student entropy and |divergence| over the
    batch's valid tokens, and the top ``keep`` share by s (ties at the threshold kept), in plain Python."""
    values = [(float(entropy[i]), abs(float(divergence[i]))) for i in range(len(mask)) if mask[i]]
    if not values:
        return torch.zeros(len(mask), dtype=torch.float64)

    def scaled(xs):
        lo, hi = min(xs), max(xs)
        return [(x - lo) / (hi - lo) if hi > lo else 0.0 for x in xs]

    h, d = scaled([v[0] for v in values]), scaled([v[1] for v in values])
    scores = [a + b - a * b for a, b in zip(h, d, strict=True)]
    k = max(1, math.ceil(keep * len(scores) - 1e-9))
    threshold = sorted(scores, reverse=True)[k - 1]
    out, it = torch.zeros(len(mask), dtype=torch.float64), iter(scores)
    for i in range(len(mask)):
        if mask[i]:
            out[i] = float(next(it) >= threshold)
    return out


@pytest.mark.parametrize("keep", [0.5, 0.2, 1.0, 0.01])
@pytest.mark.parametrize("ties", [False, True])
def test_token_importance_is_tip(keep, ties):
    g = torch.Generator().manual_seed(int(keep * 100) + ties)
    n = 40
    entropy = torch.rand(n, generator=g, dtype=torch.float64) * 3
    divergence = torch.randn(n, generator=g, dtype=torch.float64)
    if ties:  # equal scores at and around the threshold, and a constant divergence
        entropy[::3] = entropy[0]
        divergence[:] = 0.7
    mask = torch.rand(n, generator=g) > 0.25
    got = wpkl.reference.compute_weights(
        wpkl.Weighting(token_importance=wpkl.TokenImportance(keep), normalize=False), valid=mask[None],
        divergence=divergence[None], confidence=torch.ones(1, n, dtype=torch.float64), student_entropy=entropy[None])
    expected = tip_by_hand(entropy, divergence, mask, keep)
    torch.testing.assert_close(got[0], expected)
    assert expected.sum() >= max(1, math.ceil(keep * mask.sum().item() - 1e-9))


def test_token_importance_edge_cases():
    weighting = wpkl.Weighting(token_importance=wpkl.TokenImportance(0.5), normalize=False)

    def weights(mask, entropy, divergence):
        return wpkl.reference.compute_weights(weighting, valid=mask, divergence=divergence,
                                              confidence=torch.ones_like(divergence), student_entropy=entropy)

    none = torch.zeros(2, 3, dtype=torch.bool)
    assert torch.count_nonzero(weights(none, torch.rand(2, 3), torch.rand(2, 3))) == 0  # fully masked batch
    equal = torch.ones(2, 3, dtype=torch.bool)
    assert torch.equal(weights(equal, torch.ones(2, 3), torch.ones(2, 3)), torch.ones(2, 3))  # all scores equal
    one = torch.zeros(2, 3, dtype=torch.bool)
    one[1, 2] = True
    assert torch.equal(weights(one, torch.rand(2, 3), torch.rand(2, 3)), one.float())  # one valid token: kept
    empty = torch.zeros(0, 4, dtype=torch.bool)
    assert weights(empty, torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd", "sampled"])
@pytest.mark.parametrize("reduction", ["mean", "seq_mean", "none"])
def test_token_importance_backends(backend, dtype, divergence, reduction, small_blocks, device):
    leading, V = (3, 8), 67
    student, teacher = logits_pair((*leading, V), dtype)
    mask = random_mask(leading)
    loss, stats, _ = check_backend(
        backend, student, teacher, dtype, device, mask=mask, tokens=torch.randint(0, V, leading),
        divergence=divergence, reduction=reduction,
        weighting=wpkl.Weighting(token_importance=wpkl.TokenImportance(0.5)),
        upstream=torch.randn(leading) if reduction == "none" else None)
    kept = int((stats.weight > 0).sum())
    assert kept >= math.ceil(0.5 * int(mask.sum())) and kept < int(mask.sum())  # a selection, not everything


def test_token_importance_mean_is_the_selected_tokens_mean():
    """normalize=True with "mean": the loss is the mean divergence over the selected tokens (TIP's objective)."""
    student, teacher = logits_pair((3, 7, 31), torch.float64)
    mask = random_mask((3, 7))
    loss, stats = wpkl.weighted_kl_loss(student, teacher, mask=mask, backend="reference", return_stats=True,
                                        weighting=wpkl.Weighting(token_importance=wpkl.TokenImportance(0.5)))
    selected = stats.weight > 0
    expected = tip_by_hand(stats.student_entropy.reshape(-1).double(), stats.divergence.reshape(-1).double(),
                           mask.reshape(-1), 0.5).reshape(3, 7).bool()
    assert torch.equal(selected, expected)
    log_p, log_q = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    rkl = (log_p.exp() * (log_p - log_q)).sum(-1)
    torch.testing.assert_close(loss, rkl[expected].mean())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", [
    dict(weighting=wpkl.Weighting(token_importance=wpkl.TokenImportance(0.4))),  # TIP
    # PW-OPSD's recipe: the rising schedule, per-sequence means, no renormalization, T = 1.1
    dict(weighting=wpkl.Weighting(position=wpkl.PositionSigmoid(), normalize=False), reduction="seq_mean",
         temperature=1.1)], ids=["tip", "pw-opsd"])
def test_weightings_with_a_top_k_teacher(backend, variant, device):
    leading, V, K = (2, 6), 37, 5
    student, teacher = logits_pair((*leading, V), torch.float32)
    logprobs = torch.log_softmax(teacher.double(), -1)
    ids = teacher.topk(K, -1).indices
    kwargs = dict(mask=random_mask(leading), teacher_topk_ids=ids, teacher_topk_logprobs=logprobs.gather(-1, ids).float(),
                  divergence="forward_kl", **variant)
    x = student.detach().clone().to(device).requires_grad_(True)
    loss, stats = wpkl.weighted_kl_loss(x, None, backend=backend, return_stats=True,
                                        **{k: v.to(device) if isinstance(v, torch.Tensor) else v
                                           for k, v in kwargs.items()})
    loss.backward()
    y = student.detach().double().requires_grad_(True)
    ref, ref_stats = wpkl.weighted_kl_loss(y, None, backend="reference", return_stats=True, **kwargs)
    ref.backward()
    assert_values_close(loss, ref)
    assert torch.equal(stats.weight.cpu() > 0, ref_stats.weight > 0)
    assert_values_close(stats.weight.cpu(), ref_stats.weight)
    assert_grad_close(x.grad.cpu(), y.grad, y.grad.float(), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighting", [
    wpkl.Weighting(token_importance=wpkl.TokenImportance(0.3)),
    wpkl.Weighting(token_importance=wpkl.TokenImportance(0.5), position=wpkl.PositionSigmoid(), w_max=0.9),
], ids=["tip", "tip+pw-opsd"])
def test_token_importance_fused_linear(backend, weighting):
    """The fused-linear form weighs TIP over the whole batch: the two-phase schedule, never the eager one."""
    g = torch.Generator().manual_seed(11)
    N, H, V = 14, 6, 29
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    teacher_hidden, teacher_weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    mask = torch.rand(N, generator=g) > 0.2
    positions = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1, 2, 3])
    x, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = wpkl.fused_linear_kl_loss(x, w, teacher_hidden, teacher_weight, mask=mask, positions=positions,
                                     weighting=weighting, backend=backend, chunk_size=4)
    loss.backward()
    xr, wr = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref = wpkl.weighted_kl_loss(xr @ wr.T, teacher_hidden.double() @ teacher_weight.double().T, mask=mask,
                                positions=positions, weighting=weighting, backend="reference")
    ref.backward()
    assert_values_close(loss, ref)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=1e-4, atol=1e-6)


def test_token_importance_runs_two_phase():
    from wpkl.engine.route import _schedule

    class Student:
        trainable, hidden = True, torch.zeros(1, 2)

    class Batch:
        sequence_ids = None

    class Problem:
        student, batch = Student(), Batch()

        def __init__(self, weighting):
            self.spec = wpkl.spec.LossSpec(weighting=weighting)

    assert _schedule(Problem(wpkl.Weighting(accumulated=0.5)), "torch") == "eager"
    assert _schedule(Problem(wpkl.Weighting(token_importance=wpkl.TokenImportance())), "torch") == "two-phase"


@pytest.mark.parametrize("make,error,words", [
    (lambda: wpkl.TokenImportance(0.0), ValueError, "keep must be > 0"),
    (lambda: wpkl.TokenImportance(1.5), ValueError, "keep must be in (0, 1]"),
    (lambda: wpkl.TokenImportance("half"), TypeError, "keep must be a real number"),
    (lambda: wpkl.Weighting(token_importance=0.5), TypeError, "must be a TokenImportance"),
])
def test_token_importance_bad_options(make, error, words):
    with pytest.raises(error) as info:
        make()
    assert words in str(info.value)


# ------------------------------------------------------------------------------------------------ EOPD


def eopd_by_hand(student, teacher, mask, tokens, threshold, alpha, temperature=1.0):
    """EOPD (arXiv 2603.07079, Eq. 9; WLS04/EOPD): the sampled-token on-policy loss plus alpha * FKL on the tokens
    whose full-vocabulary teacher entropy is >= threshold, each averaged over all valid tokens. float64."""
    log_p, log_q = torch.log_softmax(student / temperature, -1), torch.log_softmax(teacher / temperature, -1)
    q = log_q.exp()
    entropy = -(q * log_q).sum(-1)
    log_p_y = log_p.gather(-1, tokens[..., None])[..., 0]
    log_q_y = log_q.gather(-1, tokens[..., None])[..., 0]
    on_policy = (log_p_y - log_q_y).detach() * log_p_y
    fkl = (q * (log_q - log_p)).sum(-1)
    gate = (entropy >= threshold).double()
    return _mean(on_policy, mask) + alpha * _mean(gate * fkl, mask), gate


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threshold,alpha", [(0.8, 1.0), (1.5, 0.5)])
def test_entropy_gated_loss_is_eopd(backend, dtype, threshold, alpha, small_blocks, device):
    leading, V = (3, 8), 97
    g = torch.Generator().manual_seed(int(threshold * 10))
    student = (torch.randn(*leading, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    # teachers from peaked to flat: entropies on both sides of the threshold
    teacher = (torch.randn(*leading, V, generator=g, dtype=torch.float64)
               * torch.linspace(0.3, 6.0, leading[0] * leading[1], dtype=torch.float64).view(*leading, 1)).to(dtype)
    mask = random_mask(leading)
    tokens = torch.randint(0, V, leading, generator=g)
    x = student.detach().clone().to(device).requires_grad_(True)
    loss, _, gate = wpkl.entropy_gated_loss(x, teacher.to(device), mask=mask.to(device), tokens=tokens.to(device),
                                            divergence="sampled", threshold=threshold, alpha=alpha, backend=backend,
                                            return_stats=True)
    loss.backward()
    y = student.detach().double().requires_grad_(True)
    expected, expected_gate = eopd_by_hand(y, teacher.double(), mask, tokens, threshold, alpha)
    expected.backward()
    gated = expected_gate.bool() & mask
    assert 0 < int(gated.sum()) < int(mask.sum())  # the gate opens on some valid tokens, not all
    assert torch.equal((gate.cpu() > 0) & mask, gated)
    assert_values_close(loss, expected)
    same_dtype = y.grad.to(dtype).double()  # the gradient rule's "plain torch" error: the truth rounded
    assert_grad_close(x.grad.cpu(), y.grad, same_dtype, dtype)


@pytest.mark.parametrize("reduction,num_items", [("mean", 11.0), ("sum", None), ("seq_mean", None)])
def test_entropy_gated_loss_with_teacher_logits_and_a_top_k_gated_term(reduction, num_items):
    """The authors' Eq. 10: the gate from the full teacher's entropy, the gated forward KL over its top-k
    (renormalized): ``gate_options`` gives the top-k teacher, which replaces the logits in the second term."""
    leading, V = (3, 8), 31
    g = torch.Generator().manual_seed(4)
    student = torch.randn(*leading, V, generator=g, dtype=torch.float64)
    teacher = torch.randn(*leading, V, generator=g, dtype=torch.float64) * torch.linspace(0.3, 4.0, 24,
                                                                                          dtype=torch.float64).view(3, 8, 1)
    mask = random_mask(leading)
    tokens = torch.randint(0, V, leading, generator=g)
    lq = torch.log_softmax(teacher, -1)
    top, ids = lq.topk(6, dim=-1)
    entropy = -(lq.exp() * lq).sum(-1)
    threshold = float(entropy[mask].median())
    x = student.clone().requires_grad_(True)
    loss = wpkl.entropy_gated_loss(x, teacher, mask=mask, tokens=tokens, divergence="sampled", threshold=threshold,
                                   reduction=reduction, num_items_in_batch=num_items,
                                   gate_options=dict(teacher_topk_ids=ids, teacher_topk_logprobs=top,
                                                     topk_mode="renormalize"))
    loss.backward()
    y = student.clone().requires_grad_(True)
    log_p = torch.log_softmax(y, -1)
    log_p_y = log_p.gather(-1, tokens[..., None])[..., 0]
    on_policy = (log_p_y - lq.gather(-1, tokens[..., None])[..., 0]).detach() * log_p_y
    renorm = top - top.logsumexp(-1, keepdim=True)  # both restricted to the top-k ids and renormalized
    log_p_top = log_p.gather(-1, ids)
    fkl = (renorm.exp() * (renorm - (log_p_top - log_p_top.logsumexp(-1, keepdim=True)))).sum(-1)
    gate = (entropy >= threshold).double()
    per_token = torch.where(mask, on_policy + gate * fkl, 0.0)
    if reduction == "mean":
        expected = per_token.sum() / num_items
    elif reduction == "sum":
        expected = per_token.sum()
    else:
        counts = mask.sum(-1)
        expected = (per_token.sum(-1) / counts.clamp(min=1)).sum() / (counts > 0).sum()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_gated_loss_top_k_gated_term_backends(backend, device):
    """The authors' form (the gate from the full teacher's entropy, the gated forward KL over its top-k,
    renormalized) on both backends, float32, against the float64 reference of the same call."""
    leading, V = (3, 8), 31
    g = torch.Generator().manual_seed(5)
    student = torch.randn(*leading, V, generator=g)
    teacher = torch.randn(*leading, V, generator=g) * torch.linspace(0.3, 4.0, 24).view(3, 8, 1)
    mask = random_mask(leading)
    tokens = torch.randint(0, V, leading, generator=g)
    lq = torch.log_softmax(teacher.double(), -1)
    top, ids = lq.topk(6, dim=-1)
    entropies = (-(lq.exp() * lq).sum(-1)[mask]).sort().values
    i = max(range(len(entropies) // 4, 3 * len(entropies) // 4), key=lambda j: float(entropies[j + 1] - entropies[j]))
    threshold = float(entropies[i] + entropies[i + 1]) / 2  # (no token within float32 rounding of the threshold)

    def run(x, t, q, backend, to=lambda v: v):
        x = to(x).clone().requires_grad_(True)
        loss = wpkl.entropy_gated_loss(x, to(t), mask=to(mask), tokens=to(tokens), divergence="sampled",
                                       threshold=threshold, weighting=wpkl.Weighting(accumulated=0.5),
                                       backend=backend, gate_options=dict(teacher_topk_ids=to(ids),
                                                                          teacher_topk_logprobs=to(q),
                                                                          topk_mode="renormalize"))
        loss.backward()
        return loss, x.grad

    loss, grad = run(student, teacher, top.float(), backend, lambda v: v.to(device))
    ref, ref_grad = run(student.double(), teacher.double(), top.float().double(), "reference")
    assert_values_close(loss.cpu(), ref)
    assert_grad_close(grad.cpu(), ref_grad, ref_grad.float(), torch.float32)


def test_entropy_gated_loss_teacher_server_form():
    """The paper's own form: the sampled loss from log q(y), the gated forward KL over the teacher's top-k
    renormalized, the gate from a given entropy; against the float64 formula."""
    leading, V, K = (2, 7), 41, 16
    student, teacher = logits_pair((*leading, V), torch.float64)
    mask = random_mask(leading)
    tokens = torch.randint(0, V, leading)
    log_q = torch.log_softmax(teacher, -1)
    ids = log_q.topk(K, -1).indices
    entropy = -(log_q.exp() * log_q).sum(-1)
    threshold = entropy[mask].median().item()
    x = student.clone().requires_grad_(True)
    loss = wpkl.entropy_gated_loss(
        x, None, mask=mask, tokens=tokens, divergence="sampled", teacher_logprobs=log_q.gather(-1, tokens[..., None])[..., 0],
        teacher_entropy=entropy, threshold=threshold, backend="torch",
        gate_options=dict(teacher_topk_ids=ids, teacher_topk_logprobs=log_q.gather(-1, ids), topk_mode="renormalize"))
    loss.backward()
    y = student.clone().requires_grad_(True)
    log_p = torch.log_softmax(y, -1)
    log_p_y, log_q_y = log_p.gather(-1, tokens[..., None])[..., 0], log_q.gather(-1, tokens[..., None])[..., 0]
    p_k, q_k = log_p.gather(-1, ids), log_q.gather(-1, ids)
    p_k, q_k = p_k - p_k.logsumexp(-1, keepdim=True), q_k - q_k.logsumexp(-1, keepdim=True)  # renormalized (Eq. 10)
    fkl = (q_k.exp() * (q_k - p_k)).sum(-1)
    expected = _mean((log_p_y - log_q_y).detach() * log_p_y, mask) + _mean((entropy >= threshold) * fkl, mask)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x.grad, y.grad)
    with pytest.raises(ValueError, match="needs teacher_entropy"):
        wpkl.entropy_gated_loss(x, None, mask=mask, tokens=tokens, divergence="sampled",
                                teacher_logprobs=log_q_y.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_gated_loss_fused_linear(backend):
    g = torch.Generator().manual_seed(21)
    N, H, V = 12, 6, 31
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    teacher_hidden = torch.randn(N, H, generator=g) * torch.linspace(0.2, 3, N).unsqueeze(1)
    teacher_weight = torch.randn(V, H, generator=g)
    mask = torch.rand(N, generator=g) > 0.2
    x = hidden.clone().requires_grad_(True)
    loss = wpkl.entropy_gated_loss(x, weight, teacher_hidden, teacher_weight, mask=mask, divergence="reverse_kl",
                                   threshold=2.5, fused_linear=True, backend=backend, chunk_size=5)
    loss.backward()
    xr = hidden.double().requires_grad_(True)
    s, t = xr @ weight.double().T, teacher_hidden.double() @ teacher_weight.double().T
    log_p, log_q = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    p, q = log_p.exp(), log_q.exp()
    gate = (-(q * log_q).sum(-1) >= 2.5).double()
    assert 0 < int((gate.bool() & mask).sum()) < int(mask.sum())
    expected = _mean((p * (log_p - log_q)).sum(-1), mask) + _mean(gate * (q * (log_q - log_p)).sum(-1), mask)
    expected.backward()
    assert_values_close(loss, expected)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-6)
