"""Properties that hold for any inputs (hypothesis, bounded examples), on the kernels and the torch path."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import wpkl
from wpkl.reference import token_terms
from wpkl.testing import strategies as opd

BACKENDS = ("triton", "torch")
FULL_VOCAB = ("reverse_kl", "forward_kl", "jsd")


@st.composite
def problems(draw, max_vocab=90):
    """float32 [2, rows, V] pairs from the public strategies (wpkl.testing.strategies)."""
    leading = (2, draw(st.integers(1, 4)))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    student, teacher = draw(opd.logits_pairs(leading, max_vocab=max_vocab, max_teacher_pad=0, scale=scale,
                                             close=False))
    return student.float(), teacher.float()


def _terms(student, teacher, backend, **kwargs):
    loss, stats = wpkl.weighted_kl_loss(student, teacher, backend=backend, reduction="none", return_stats=True,
                                        **kwargs)
    return loss, stats


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", FULL_VOCAB)
@given(pair=problems(), beta=st.floats(0.0, 1.0), temperature=st.floats(0.25, 4.0))
def test_divergence_nonnegative_and_zero_on_self(backend, divergence, pair, beta, temperature):
    student, teacher = pair
    loss, stats = _terms(student, teacher, backend, divergence=divergence, beta=beta, temperature=temperature)
    assert (stats.divergence >= -1e-5).all()
    same, same_stats = _terms(student, student.clone(), backend, divergence=divergence, beta=beta,
                              temperature=temperature)
    assert same_stats.divergence.abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", FULL_VOCAB + ("sampled",))
@given(pair=problems(), shift_s=st.floats(-50, 50), shift_t=st.floats(-50, 50))
def test_invariant_to_row_shifts(backend, divergence, pair, shift_s, shift_t):
    student, teacher = pair
    tokens = torch.zeros(student.shape[:-1], dtype=torch.long)
    base, _ = _terms(student, teacher, backend, divergence=divergence, tokens=tokens)
    shifted, _ = _terms(student + shift_s, teacher + shift_t, backend, divergence=divergence, tokens=tokens)
    torch.testing.assert_close(shifted, base, atol=1e-4 * (1 + abs(shift_s) + abs(shift_t)), rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", FULL_VOCAB + ("sampled",))
@given(pair=problems(), beta=st.floats(0.01, 0.99))
def test_gradient_rows_sum_to_zero(backend, divergence, pair, beta):
    """Softmax is shift-invariant, so every row of d loss / d logits sums to 0.

    Up to float32 rounding of terms of size (1 / n_tokens) * |log-ratio| before they cancel (a saturated
    JSD has a tiny gradient made of O(1) pieces), hence the tolerance's scale.
    """
    student, teacher = pair
    leaf = student.clone().requires_grad_(True)
    tokens = torch.zeros(student.shape[:-1], dtype=torch.long)
    wpkl.weighted_kl_loss(leaf, teacher, divergence=divergence, beta=beta, tokens=tokens, backend=backend).backward()
    per_token = 1.0 / tokens.numel()
    spread = 1.0 + (student.abs().max() + teacher.abs().max()).item()
    assert leaf.grad.sum(-1).abs().max().item() <= 1e-5 * per_token * spread


@given(pair=problems(), weighting=st.builds(
    wpkl.Weighting,
    position=st.one_of(st.none(), st.builds(wpkl.ExpDecay, st.floats(0.5, 10)), st.builds(wpkl.PowerDecay, st.floats(0, 2))),
    confidence=st.floats(0, 3), disagreement=st.floats(0, 2), accumulated=st.floats(0, 3)),
    p_valid=st.floats(0.2, 1.0))
def test_normalized_weights_have_mean_one(pair, weighting, p_valid):
    student, teacher = pair
    mask = torch.rand(student.shape[:-1]) < p_valid
    mask[0, 0] = True
    _, stats = wpkl.weighted_kl_loss(student, teacher, mask=mask, weighting=weighting, return_stats=True)
    total = stats.weight.sum()
    if total > 0:
        assert abs(stats.weight[mask].mean().item() - 1.0) < 1e-5
    assert (stats.weight[~mask] == 0).all()


@given(pair=problems(max_vocab=12))
def test_reference_entropy_bounds(pair):
    """0 <= H <= log V and 1 / V <= confidence <= 1 in the specification itself."""
    student, teacher = pair
    terms = token_terms(student.double(), teacher.double())
    vocab = student.shape[-1]
    for h in (terms.student_entropy, terms.teacher_entropy):
        assert (h >= -1e-12).all() and (h <= torch.log(torch.tensor(float(vocab))) + 1e-9).all()
    assert (terms.confidence >= 1 / vocab - 1e-12).all() and (terms.confidence <= 1 + 1e-12).all()
