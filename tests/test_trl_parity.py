"""Equality with TRL's own losses (trl is a test extra): values and gradients, fused."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import wpkl

iw_opd = pytest.importorskip("trl.experimental.iw_opd.iw_opd_trainer", reason="trl is not installed")
gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer", reason="trl is not installed")

BACKENDS = ("triton", "torch")


def _batch(B=3, T=9, V=61, prompt_masked=2):
    student = torch.randn(B, T, V) * 2
    teacher = torch.randn(B, T, V) * 2
    tokens = torch.randint(0, V, (B, T))
    labels = tokens.clone()
    labels[:, :prompt_masked] = -100
    labels[1, 5:] = -100  # a short completion
    labels[2] = -100  # a fully truncated one
    return student, teacher, tokens, labels


def _trl_iw_opd(student, teacher, tokens, labels, gamma, temperature, num_items_in_batch=None, rollout=None):
    trainer = SimpleNamespace(temperature=temperature, iw_opd_gamma=gamma, iw_opd_epsilon=1e-8,
                              model=SimpleNamespace(training=True),
                              _metrics=defaultdict(lambda: defaultdict(list)))
    teacher_logprobs = torch.log_softmax(teacher / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return iw_opd.IWOPDTrainer._compute_iw_opd_loss(
        trainer, student_logits=student, completion_tokens=tokens, labels=labels,
        teacher_actual_logprobs=teacher_logprobs, rollout_logprobs=rollout, num_items_in_batch=num_items_in_batch)


def _grad(fn, student):
    leaf = student.clone().requires_grad_(True)
    loss = fn(leaf)
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_iw_opd_loss_and_gradient(backend, gamma, temperature, device):
    student, teacher, tokens, labels = _batch()
    expected_loss, expected_grad = _grad(lambda s: _trl_iw_opd(s, teacher, tokens, labels, gamma, temperature), student)
    weighting = wpkl.Weighting(accumulated=gamma, normalize=False)
    loss, grad = _grad(lambda s: wpkl.weighted_kl_loss(
        s.to(device), teacher.to(device), mask=(labels != -100).to(device), tokens=tokens.to(device),
        divergence="sampled", weighting=weighting, temperature=temperature, backend=backend).cpu(), student)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher_side", ["logits", "logprobs"])
def test_iw_opd_with_rollout_logprobs(backend, teacher_side, device):
    """TRL's vLLM path (rollout log-probs in the advantage) and its teacher-server path (log q(y) only)."""
    student, teacher, tokens, labels = _batch()
    rollout = torch.log_softmax(student, -1).gather(-1, tokens[..., None]).squeeze(-1) + 0.2 * torch.randn(3, 9)
    expected_loss, expected_grad = _grad(
        lambda s: _trl_iw_opd(s, teacher, tokens, labels, 0.5, 1.0, rollout=rollout), student)
    teacher_logprobs = torch.log_softmax(teacher, -1).gather(-1, tokens[..., None]).squeeze(-1)
    given = dict(teacher_logits=teacher.to(device)) if teacher_side == "logits" else dict(
        teacher_logits=None, teacher_logprobs=teacher_logprobs.to(device))
    loss, grad = _grad(lambda s: wpkl.weighted_kl_loss(
        s.to(device), mask=(labels != -100).to(device), tokens=tokens.to(device), rollout_logprobs=rollout.to(device),
        divergence="sampled", weighting=wpkl.Weighting(accumulated=0.5, normalize=False), backend=backend,
        **given).cpu(), student)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_iw_opd_num_items_in_batch(backend, device):
    student, teacher, tokens, labels = _batch()
    expected = _trl_iw_opd(student, teacher, tokens, labels, 0.5, 1.0, num_items_in_batch=torch.tensor(40))
    loss = wpkl.weighted_kl_loss(student.to(device), teacher.to(device), mask=(labels != -100).to(device),
                                 tokens=tokens.to(device), divergence="sampled", backend=backend,
                                 weighting=wpkl.Weighting(accumulated=0.5, normalize=False),
                                 num_items_in_batch=torch.tensor(40)).cpu()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gkd_generalized_jsd(backend, beta, temperature, device):
    student, teacher, _, labels = _batch()
    divergence = "jsd"
    expected_loss, expected_grad = _grad(lambda s: gkd.GKDTrainer.generalized_jsd_loss(
        s, teacher, labels=labels, beta=beta, temperature=temperature), student)
    loss, grad = _grad(lambda s: wpkl.weighted_kl_loss(
        s.to(device), teacher.to(device), mask=(labels != -100).to(device), divergence=divergence, beta=beta,
        temperature=temperature, backend=backend).cpu(), student)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7)
