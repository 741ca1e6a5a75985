"""Gradient accumulation and data parallelism: dividing every micro-batch by the global valid-token count
(num_items_in_batch) makes the accumulated gradient equal the full batch's."""

import pytest
import torch

import wpkl

BACKENDS = ("triton", "torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighting,divergence", [
    (None, "reverse_kl"),
    (wpkl.Weighting(position=wpkl.ExpDecay(3.0), confidence=1.0, disagreement=0.5, normalize=False), "jsd"),
    (wpkl.Weighting(accumulated=0.5, normalize=False), "sampled"),  # per-sequence weights: IW-OPD
])
def test_accumulated_gradient_equals_full_batch(backend, weighting, divergence, device):
    B, T, V = 6, 9, 70
    student = torch.randn(B, T, V, device=device) * 2
    teacher = torch.randn(B, T, V, device=device) * 2
    mask = torch.rand(B, T, device=device) < 0.75
    mask[4] = False  # a micro-batch row with nothing valid
    tokens = torch.randint(0, V, (B, T), device=device)
    common = dict(weighting=weighting, divergence=divergence, backend=backend)

    full = student.clone().requires_grad_(True)
    wpkl.weighted_kl_loss(full, teacher, mask=mask, tokens=tokens, **common).backward()

    accumulated = student.clone().requires_grad_(True)
    total_valid = mask.sum()  # what the trainer gathers over micro-batches (and ranks)
    for rows in (slice(0, 2), slice(2, 5), slice(5, 6)):  # uneven micro-batches
        micro = accumulated[rows]
        wpkl.weighted_kl_loss(micro, teacher[rows], mask=mask[rows], tokens=tokens[rows],
                              num_items_in_batch=total_valid, **common).backward()
    torch.testing.assert_close(accumulated.grad, full.grad, rtol=1e-5, atol=1e-8)

    # Dividing by the local count instead is what goes wrong without the option.
    local = student.clone().requires_grad_(True)
    for rows in (slice(0, 2), slice(2, 5), slice(5, 6)):
        wpkl.weighted_kl_loss(local[rows], teacher[rows], mask=mask[rows], tokens=tokens[rows], **common).backward()
    assert not torch.allclose(local.grad, full.grad, rtol=1e-3)
