"""The specification itself: autograd gradients checked numerically (float64), and its bounded-memory twin."""

import pytest
import torch

import wpkl
import wpkl.backends.torch_pass
from wpkl.reference import token_terms


@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)])
def test_gradcheck_token_terms(divergence, beta):
    student = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 9, dtype=torch.float64)

    def loss(s):
        return token_terms(s, teacher, divergence=divergence, beta=beta, temperature=1.3).loss

    assert torch.autograd.gradcheck(loss, (student,))


def test_sampled_gradient_is_the_policy_gradient_surrogate():
    """sampled: d L / d s = -a * d log p(y) / d s with a = log q(y) - log p(y) held constant."""
    student = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 9, dtype=torch.float64)
    tokens = torch.randint(0, 7, (4,))
    terms = token_terms(student, teacher, divergence="sampled", temperature=1.3, tokens=tokens)
    advantage = -terms.divergence  # a, frozen

    def surrogate(s):
        log_p_y = torch.log_softmax(s / 1.3, -1).gather(-1, tokens[:, None]).squeeze(-1)
        return -advantage * log_p_y

    torch.testing.assert_close(terms.loss, surrogate(student))
    grad = torch.autograd.grad(terms.loss.sum(), student)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(surrogate(student).sum(), student)[0])
    assert torch.autograd.gradcheck(surrogate, (student,))


@pytest.mark.parametrize("reduction", ["mean", "sum", "seq_mean", "none"])
def test_gradcheck_weighted_loss(reduction):
    student = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    weighting = wpkl.Weighting(position=wpkl.ExpDecay(2.0), confidence=1.0, disagreement=1.0, accumulated=0.5)

    def loss(s):
        return wpkl.weighted_kl_loss(s, teacher, mask=mask, weighting=weighting, reduction=reduction,
                                     backend="reference")

    # Weights are constants (detached): gradcheck perturbs the logits, and the weights move with them,
    # so check against a loss whose weights are frozen at the unperturbed values.
    _, stats = wpkl.weighted_kl_loss(student, teacher, mask=mask, weighting=weighting, return_stats=True,
                                     backend="reference")
    frozen = stats.weight.double()

    def frozen_loss(s):
        per_token = wpkl.weighted_kl_loss(s, teacher, mask=mask, reduction="none", backend="reference")
        weighted = frozen * per_token
        if reduction == "none":
            return weighted
        if reduction == "sum":
            return weighted.sum()
        if reduction == "mean":
            return weighted.sum() / mask.sum()
        return ((weighted.sum(1) / mask.sum(1)).sum()) / 2

    torch.testing.assert_close(loss(student), frozen_loss(student))
    grad = torch.autograd.grad(loss(student).sum(), student)[0]
    expected = torch.autograd.grad(frozen_loss(student).sum(), student)[0]
    torch.testing.assert_close(grad, expected)
    assert torch.autograd.gradcheck(frozen_loss, (student,))


@pytest.mark.parametrize("dtype,passes", [(torch.float32, 1), (torch.bfloat16, 2)], ids=str)
def test_torch_path_holds_only_chunks(monkeypatch, dtype, passes):
    """The torch path never hands more than CHUNK_ELEMENTS // V rows to the [rows, V] math at once. float32 logits
    get their gradient in the forward pass (one pass over the rows); half-precision ones recompute in backward."""
    monkeypatch.setattr(wpkl.backends.torch_pass, "CHUNK_ELEMENTS", 64 * 4)
    seen = []
    original = wpkl.backends.torch_pass.token_terms

    def spy(student, **kwargs):
        seen.append(student.shape[0])
        return original(student, **kwargs)

    monkeypatch.setattr(wpkl.backends.torch_pass, "token_terms", spy)
    student = torch.randn(3, 10, 64).to(dtype).requires_grad_(True)
    teacher = torch.randn(3, 10, 64).to(dtype)
    mask = torch.rand(3, 10) < 0.7
    mask[0, 2:9] = True  # a run of consecutive rows: read as a view
    loss = wpkl.weighted_kl_loss(student, teacher, mask=mask, backend="torch", return_stats=True)[0]
    loss.backward()
    n_valid = int(mask.sum())
    assert seen and max(seen) <= 4 and sum(seen) == passes * n_valid
    leaf = student.detach().requires_grad_(True)
    expected = torch.autograd.grad(wpkl.weighted_kl_loss(leaf, teacher, mask=mask, backend="reference"), leaf)[0]
    torch.testing.assert_close(student.grad, expected)
    assert torch.count_nonzero(student.grad[~mask]) == 0


def test_torch_path_skips_stats_it_is_not_asked_for(monkeypatch):
    """Without return_stats (or a confidence weighting) the torch path computes no entropies; with them, it does."""
    calls = []
    original = wpkl.backends.torch_pass.token_terms
    monkeypatch.setattr(wpkl.backends.torch_pass, "token_terms", lambda *a, **k: calls.append(k["stats"]) or original(*a, **k))
    student, teacher = torch.randn(2, 5, 30, requires_grad=True), torch.randn(2, 5, 30)
    wpkl.weighted_kl_loss(student, teacher, backend="torch")
    wpkl.weighted_kl_loss(student, teacher, backend="torch", weighting=wpkl.Weighting(confidence=1.0))
    _, stats = wpkl.weighted_kl_loss(student, teacher, backend="torch", return_stats=True)
    assert calls == [False, True, True] and torch.isfinite(stats.student_entropy).all()
