"""The weighting formula, checked against values computed by hand (plain Python loops)."""

import dataclasses
import math

import pytest
import torch

import wpkl
from wpkl.reference import compute_weights

VALID = torch.tensor([[False, True, True, True, False, True],
                      [True, True, False, True, True, True],
                      [False, False, False, False, False, False]])
DIV = torch.tensor([[9.0, 0.5, -0.25, 2.0, 9.0, 1.0],
                    [0.1, 0.0, 9.0, 0.4, 0.3, 0.2],
                    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
CONF = torch.tensor([[0.1, 0.9, 0.5, 0.25, 0.1, 0.8],
                     [0.3, 0.6, 0.1, 0.7, 0.2, 1.0],
                     [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])


def by_hand(factor):
    """w_i = factor(b, t, pos, n_b) on valid tokens, 0 elsewhere, with pos counted over valid tokens."""
    out = torch.zeros(VALID.shape, dtype=torch.float64)
    for b in range(VALID.shape[0]):
        n_b = int(VALID[b].sum())
        pos = 0
        for t in range(VALID.shape[1]):
            if VALID[b, t]:
                out[b, t] = factor(b, t, pos, n_b)
                pos += 1
    return out


def weights(weighting, **kwargs):
    return compute_weights(weighting, valid=VALID, divergence=DIV.double(), confidence=CONF.double(), **kwargs)


def normalized(w):
    return w * VALID.sum() / w.sum()


@pytest.mark.parametrize("schedule,f", [
    (wpkl.ExpDecay(2.0), lambda pos, n: 2 ** (-pos / 2.0)),
    (wpkl.PowerDecay(0.5), lambda pos, n: (1 + pos) ** -0.5),
    (wpkl.PositionTable([3.0, 2.0, 1.0]), lambda pos, n: [3.0, 2.0, 1.0][min(pos, 2)]),
    (wpkl.PositionWindow(0.0, 0.3), lambda pos, n: float(0.0 <= pos / n < 0.3)),
    (wpkl.PositionWindow(0.7, 1.0), lambda pos, n: float(0.7 <= pos / n < 1.0)),
    (wpkl.PositionWindow(0.25, 0.75), lambda pos, n: float(0.25 <= pos / n < 0.75)),
    # PW-OPSD (arXiv 2605.21606): u = (i - 0.5) / L_b with i 1-based, w = w_min + (1 - w_min) sigmoid((u - tau) / s)
    (wpkl.PositionSigmoid(), lambda pos, n: 0.25 + 0.75 / (1 + math.exp(-(((pos + 1) - 0.5) / n - 0.3) / 0.1))),
    (wpkl.PositionSigmoid(0.0, 0.6, 0.05), lambda pos, n: 1 / (1 + math.exp(-(((pos + 1) - 0.5) / n - 0.6) / 0.05))),
])
def test_position_schedules(schedule, f):
    expected = by_hand(lambda b, t, pos, n: f(pos, n))
    torch.testing.assert_close(weights(wpkl.Weighting(position=schedule, normalize=False)), expected)
    torch.testing.assert_close(weights(wpkl.Weighting(position=schedule)), normalized(expected))


def test_positions_override():
    positions = torch.arange(6).expand(3, 6)
    got = weights(wpkl.Weighting(position=wpkl.ExpDecay(1.0), normalize=False), positions=positions)
    torch.testing.assert_close(got, by_hand(lambda b, t, pos, n: 2.0 ** -t))


def test_confidence_and_disagreement():
    got = weights(wpkl.Weighting(confidence=2.0, disagreement=0.5, normalize=False))
    expected = by_hand(lambda b, t, pos, n: CONF[b, t].item() ** 2 * abs(DIV[b, t].item()) ** 0.5)
    torch.testing.assert_close(got, expected)


def test_disagreement_zero_power_of_zero_is_one():
    got = weights(wpkl.Weighting(disagreement=0.0, normalize=False))
    torch.testing.assert_close(got, VALID.double())


def test_accumulated_matches_iw_opd_by_hand():
    gamma = 0.5

    def factor(b, t, pos, n):
        abs_d = [abs(DIV[b, k].item()) for k in range(VALID.shape[1]) if VALID[b, k]]
        prefix = sum(abs(DIV[b, k].item()) for k in range(t) if VALID[b, k])
        return 1 + gamma * (1 - prefix / max(sum(abs_d), 1e-8))

    got = weights(wpkl.Weighting(accumulated=gamma, normalize=False))
    torch.testing.assert_close(got, by_hand(factor))


def test_user_weights_and_combined():
    user = torch.rand(VALID.shape, dtype=torch.float64) + 0.5
    weighting = wpkl.Weighting(position=wpkl.ExpDecay(3.0), confidence=1.0, disagreement=1.0, accumulated=1.0)

    def factor(b, t, pos, n):
        abs_d = [abs(DIV[b, k].item()) for k in range(VALID.shape[1]) if VALID[b, k]]
        prefix = sum(abs(DIV[b, k].item()) for k in range(t) if VALID[b, k])
        acc = 1 + (1 - prefix / max(sum(abs_d), 1e-8))
        return user[b, t].item() * 2 ** (-pos / 3.0) * CONF[b, t].item() * abs(DIV[b, t].item()) * acc

    torch.testing.assert_close(weights(weighting, user_weights=user), normalized(by_hand(factor)))


def test_uniform_none_keeps_user_weights_raw():
    user = torch.rand(VALID.shape, dtype=torch.float64) + 0.5
    torch.testing.assert_close(weights(None, user_weights=user), torch.where(VALID, user, 0.0))


def test_normalize_all_zero_weights_stay_zero():
    """An empty window (no sequence here has 100 tokens): sum w = 0 gives all-zero weights, not NaN."""
    got = weights(wpkl.Weighting(position=wpkl.PositionWindow(0.99, 1.0)))
    assert torch.count_nonzero(got) == 0 and not torch.isnan(got).any()


def test_normalize_keeps_nan():
    div = DIV.double().clone()
    div[0, 1] = math.nan
    got = compute_weights(wpkl.Weighting(disagreement=1.0), valid=VALID, divergence=div, confidence=CONF.double())
    assert torch.isnan(got[VALID]).all()


def test_weighting_is_hashable_and_frozen():
    w = wpkl.Weighting(position=wpkl.PositionTable([1.0, 0.5]), accumulated=0.5)
    assert hash(w) == hash(wpkl.Weighting(position=wpkl.PositionTable((1.0, 0.5)), accumulated=0.5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.accumulated = 1.0


def test_stats_weights_through_api():
    """The API reports exactly these weights and uses them: loss = sum w * D / n_valid."""
    student, teacher = torch.randn(2, 7, 23), torch.randn(2, 7, 23)
    mask = torch.rand(2, 7) < 0.8
    weighting = wpkl.Weighting(position=wpkl.PowerDecay(1.0), disagreement=1.0, accumulated=0.3)
    loss, stats = wpkl.weighted_kl_loss(student, teacher, mask=mask, weighting=weighting, return_stats=True,
                                        backend="reference")
    expected = compute_weights(weighting, valid=mask, divergence=stats.divergence, confidence=stats.teacher_confidence)
    torch.testing.assert_close(stats.weight, expected)
    torch.testing.assert_close(loss, (stats.weight * stats.divergence).sum() / mask.sum())
    assert abs(stats.weight[mask].mean().item() - 1) < 1e-6


# The IW-OPD authors' variants: the windowed teacher prefix confidence and the weight cap w_max.

NLL = torch.tensor([[5.0, 0.5, 2.0, 0.1, 7.0, 3.0],
                    [0.2, 4.0, 6.0, 0.0, 1.0, 0.3],
                    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])


def prefix_confidence_by_hand(spec):
    """max(floor, exp(-alpha * Q)) with Q the mean of the k = max(1, floor(worst * n)) largest teacher NLLs among
    the n = min(window, pos) valid tokens just before each token (Q = 0 with none), in plain Python."""

    def factor(b, t, pos, n):
        before = [NLL[b, j].item() for j in range(t) if VALID[b, j]][-spec.window:] if spec.window else []
        if not before:
            return 1.0
        k = max(1, math.floor(spec.worst * len(before) + 1e-9))
        q = sum(sorted(before, reverse=True)[:k]) / k
        return max(spec.floor, math.exp(-spec.alpha * q))

    return by_hand(factor)


@pytest.mark.parametrize("spec", [
    wpkl.PrefixConfidence(),  # the authors' defaults: window 64, worst 10% (at least one), alpha 1, floor 0.01
    wpkl.PrefixConfidence(window=2, worst=0.5, alpha=0.5, floor=0.0),
    wpkl.PrefixConfidence(window=3, worst=1.0, alpha=0.3, floor=0.2),  # the mean of the whole window
    wpkl.PrefixConfidence(window=1, alpha=2.0, floor=0.05),  # the previous token only
])
def test_prefix_confidence_by_hand(spec):
    expected = prefix_confidence_by_hand(spec)
    got = weights(wpkl.Weighting(prefix_confidence=spec, normalize=False), teacher_token_logprobs=-NLL.double())
    torch.testing.assert_close(got, expected)
    got = weights(wpkl.Weighting(prefix_confidence=spec), teacher_token_logprobs=-NLL.double())
    torch.testing.assert_close(got, normalized(expected))


def test_prefix_confidence_worst_share_counts_tokens_exactly():
    """10% of 20 tokens is 2 (not 1 from 0.1 * 20 = 1.9999999999999996 in float64): the mean of the two largest."""
    valid = torch.ones(1, 21, dtype=torch.bool)
    nll = torch.zeros(1, 21, dtype=torch.float64)
    nll[0, 3], nll[0, 7] = 4.0, 2.0
    got = compute_weights(wpkl.Weighting(prefix_confidence=wpkl.PrefixConfidence(floor=0.0), normalize=False),
                          valid=valid, divergence=nll, confidence=nll, teacher_token_logprobs=-nll)
    assert got[0, 20].item() == pytest.approx(math.exp(-3.0))  # 20 tokens before: mean of 4 and 2
    assert got[0, 19].item() == pytest.approx(math.exp(-4.0))  # 19 before: k = 1, the largest


def test_w_max_caps_before_normalization():
    gamma, cap = 2.0, 1.5

    def factor(b, t, pos, n):
        abs_d = [abs(DIV[b, k].item()) for k in range(VALID.shape[1]) if VALID[b, k]]
        prefix = sum(abs(DIV[b, k].item()) for k in range(t) if VALID[b, k])
        return min(cap, 1 + gamma * (1 - prefix / max(sum(abs_d), 1e-8)))

    expected = by_hand(factor)
    got = weights(wpkl.Weighting(accumulated=gamma, w_max=cap, normalize=False))
    torch.testing.assert_close(got, expected)
    assert got.max().item() == cap and (got[VALID] < cap).any()
    torch.testing.assert_close(weights(wpkl.Weighting(accumulated=gamma, w_max=cap)), normalized(expected))


def _authors_weights(log_q, log_p, mask, *, iw_weight_max=None, conf=None):
    """The IW-OPD authors' two weights, transcribed loop by loop from their verl actor (dp_actor.py,
    ``iw_opd_weight_*`` with use_abs=True and ``teacher_prefix_conf_*``): for [B, L] responses whose mask is a
    prefix of each row."""
    log_q, log_p, mask = log_q.tolist(), log_p.tolist(), mask.double().tolist()
    B, L = len(mask), len(mask[0])
    out = torch.ones(B, L, dtype=torch.float64)
    for b in range(B):
        proxy = [abs(log_q[b][t] - log_p[b][t]) * mask[b][t] for t in range(L)]
        total = sum(proxy)
        for t in range(L):
            if not mask[b][t]:
                continue
            if iw_weight_max is not None:
                f_prev = sum(proxy[:t]) / (total + 1e-8)
                out[b, t] *= 1.0 + (iw_weight_max - 1.0) * min(1.0, max(0.0, 1.0 - f_prev))
            if conf is not None:
                window, quantile, alpha, weight_min = conf
                prev = [-log_q[b][j] for j in range(max(0, t - window), t) if mask[b][j]]
                k = max(1, int((1.0 - quantile) * len(prev)))
                q = sum(sorted(prev, reverse=True)[:k]) / k if prev else 0.0
                out[b, t] *= max(weight_min, math.exp(-alpha * q))
    return out


def test_matches_the_iw_opd_authors_weights():
    """Their IW-OPD weight with w_max = 1.5 is Weighting(accumulated=0.5, normalize=False) (w_max=1.5 does not
    bind), and their prefix confidence weight is PrefixConfidence with the same window, share, alpha and floor."""
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 9, 13, generator=gen).double(), torch.randn(3, 9, 13, generator=gen).double()
    tokens = torch.randint(0, 13, (3, 9), generator=gen)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, 2:] = False
    log_p = torch.log_softmax(student, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    log_q = torch.log_softmax(teacher, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    common = dict(mask=mask, tokens=tokens, divergence="sampled", return_stats=True, backend="reference")

    _, stats = wpkl.weighted_kl_loss(student, teacher, weighting=wpkl.Weighting(accumulated=0.5, w_max=1.5,
                                                                                 normalize=False), **common)
    expected = _authors_weights(log_q, log_p, mask, iw_weight_max=1.5)
    torch.testing.assert_close(stats.weight.double(), torch.where(mask, expected, 0.0), rtol=1e-6, atol=1e-6)

    # Quantile 0.8 with a window of 4 makes k = 1 (3 or fewer tokens before) and k = max(1, int(0.8)) = 1: the
    # worst token of the window; 0.5 gives the two worst of four.
    for window, quantile in ((4, 0.8), (4, 0.5), (64, 0.9)):
        spec = wpkl.PrefixConfidence(window=window, worst=round(1 - quantile, 12), alpha=0.7, floor=0.05)
        _, stats = wpkl.weighted_kl_loss(student, teacher, weighting=wpkl.Weighting(prefix_confidence=spec,
                                                                                     normalize=False), **common)
        expected = _authors_weights(log_q, log_p, mask,
                                    conf=(window, quantile, 0.7, 0.05))
        torch.testing.assert_close(stats.weight.double(), torch.where(mask, expected, 0.0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_teacher_token_logprobs_from_tokens_or_given(backend):
    """Without teacher_token_logprobs the torch backends compute log q(y) from the teacher logits and tokens;
    given, it is used as is; with "sampled" and teacher_logprobs, those are used."""
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 7, 11, generator=gen), torch.randn(2, 7, 13, generator=gen)
    tokens = torch.randint(0, 11, (2, 7), generator=gen)
    mask = torch.rand(2, 7, generator=gen) < 0.8
    temperature = 1.7
    weighting = wpkl.Weighting(prefix_confidence=wpkl.PrefixConfidence(window=3, worst=0.5, floor=0.0))
    log_q = torch.log_softmax(teacher[..., :11] / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    common = dict(mask=mask, weighting=weighting, temperature=temperature, return_stats=True, backend=backend)
    loss, stats = wpkl.weighted_kl_loss(student, teacher, tokens=tokens, **common)
    loss_given, stats_given = wpkl.weighted_kl_loss(student, teacher, teacher_token_logprobs=log_q, **common)
    torch.testing.assert_close(stats.weight, stats_given.weight)
    torch.testing.assert_close(loss, loss_given)
    torch.testing.assert_close(loss, (stats.weight * stats.divergence).sum() / mask.sum())
    expected = compute_weights(weighting, valid=mask, divergence=stats.divergence, confidence=stats.teacher_confidence,
                               teacher_token_logprobs=log_q)
    torch.testing.assert_close(stats.weight, expected)
    assert not torch.allclose(stats.weight[mask], torch.ones(()))  # the weighting did something
    _, stats_sampled = wpkl.weighted_kl_loss(student, None, tokens=tokens, divergence="sampled",
                                             teacher_logprobs=log_q, **common)
    torch.testing.assert_close(stats_sampled.weight, stats.weight)


def test_prefix_confidence_on_packed_input_uses_sequences():
    """[N, V] input with positions: the window never reaches into the previous sequence."""
    gen = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(2, 5, 9, generator=gen), torch.randn(2, 5, 9, generator=gen)
    tokens = torch.randint(0, 9, (2, 5), generator=gen)
    weighting = wpkl.Weighting(prefix_confidence=wpkl.PrefixConfidence(window=4, worst=1.0))
    _, rows = wpkl.weighted_kl_loss(student, teacher, tokens=tokens, weighting=weighting, return_stats=True)
    positions = torch.arange(5).repeat(2)
    _, packed = wpkl.weighted_kl_loss(student.reshape(10, 9), teacher.reshape(10, 9), tokens=tokens.reshape(10),
                                      positions=positions, weighting=weighting, return_stats=True)
    torch.testing.assert_close(packed.weight, rows.weight.reshape(10))
