"""The weighting formula, checked against values computed by hand (plain Python loops)."""

import dataclasses
import math

import pytest
import torch

import wpkl
from wpkl.weighting import compute_weights

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
