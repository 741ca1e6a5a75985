"""The Triton weights kernel (kernels/token_weights.py) against the specification (wpkl/weighting.py and
wpkl/reduction.py, run by the reference backend): loss, weights, positions and gradients on the same logits,
over a sweep of every weighting option, reduction, count and layout."""

import itertools
import random

import pytest
import torch

import wpkl

SCHEDULES = [None, wpkl.ExpDecay(2.5), wpkl.PowerDecay(0.7), wpkl.PositionTable([2.0, 1.0, 0.5, 0.0, 0.25]),
             wpkl.PositionWindow(0.25, 0.75), wpkl.PositionSigmoid(0.2, 0.4, 0.15)]
LAYOUTS = ["rows", "packed_positions", "packed"]


def _configs(n=48, seed=0):
    grid = list(itertools.product(LAYOUTS, range(len(SCHEDULES)), [0.0, 1.5], [0.0, 0.5], [0.0, 1.0], [True, False],
                                  ["mean", "sum", "seq_mean", "none"], [None, "number", "tensor"], [False, True]))
    rng = random.Random(seed)
    picked = []
    for layout, schedule, conf, dis, acc, normalize, reduction, count, user in rng.sample(grid, len(grid)):
        if layout != "rows" and acc:  # accumulated needs [B, T] input
            continue
        if layout == "packed" and (reduction == "seq_mean" or SCHEDULES[schedule] is not None):
            continue  # these need sequences: positions
        if count is not None and reduction != "mean":
            continue
        picked.append((layout, schedule, conf, dis, acc, normalize, reduction, count, user))
        if len(picked) == n:
            break
    return picked


def _run(backend, student, teacher, **kwargs):
    leaf = student.detach().clone().requires_grad_(True)
    loss, stats = wpkl.weighted_kl_loss(leaf, teacher, backend=backend, return_stats=True, **kwargs)
    g = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape) if loss.dim() else torch.tensor(1.3)
    (loss * g.to(loss.dtype)).sum().backward()
    return loss.detach(), stats, leaf.grad


@pytest.mark.parametrize("layout,schedule,conf,dis,acc,normalize,reduction,count,user", _configs())
def test_weights_kernel_matches_the_specification(layout, schedule, conf, dis, acc, normalize, reduction, count,
                                                  user):
    B, T, V = 3, 7, 24
    student, teacher = torch.randn(B, T, V) * 2, torch.randn(B, T, V) * 2
    mask = torch.rand(B, T) < 0.75
    mask[1] = False  # a fully masked sequence
    kwargs = dict(mask=mask, reduction=reduction,
                  weighting=wpkl.Weighting(position=SCHEDULES[schedule], confidence=conf, disagreement=dis,
                                           accumulated=acc, normalize=normalize))
    if user:
        kwargs["token_weights"] = torch.rand(B, T) + 0.25
    if count == "number":
        kwargs["num_items_in_batch"] = 17
    elif count == "tensor":
        kwargs["num_items_in_batch"] = torch.tensor(23.0)
    if layout != "rows":
        student, teacher = student.reshape(B * T, V), teacher.reshape(B * T, V)
        kwargs = {k: (v.reshape(-1) if isinstance(v, torch.Tensor) and v.dim() == 2 else v) for k, v in kwargs.items()}
        if layout == "packed_positions":  # three packed sequences of 5, 9 and 7 tokens
            kwargs["positions"] = torch.cat([torch.arange(5), torch.arange(9), torch.arange(7)])
    got = _run("triton", student, teacher, **kwargs)
    expected = _run("reference", student.double(), teacher.double(), **kwargs)
    torch.testing.assert_close(got[0].double(), expected[0], rtol=2e-5, atol=2e-6)
    for name in ("weight", "position", "divergence"):
        torch.testing.assert_close(getattr(got[1], name).double(), getattr(expected[1], name).double(), rtol=2e-5,
                                   atol=2e-6, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(got[2].double(), expected[2], rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_w_max_in_the_kernel(normalize):
    """The cap on the raw weight, before normalization (the IW-OPD authors' bound), as the specification."""
    student, teacher = torch.randn(3, 7, 24) * 2, torch.randn(3, 7, 24) * 2
    kwargs = dict(weighting=wpkl.Weighting(accumulated=2.0, disagreement=1.0, w_max=1.5, normalize=normalize),
                  mask=torch.rand(3, 7) < 0.8)
    got = _run("triton", student, teacher, **kwargs)
    expected = _run("reference", student.double(), teacher.double(), **kwargs)
    assert (got[1].weight.max() <= 1.5 + 1e-6) or normalize
    torch.testing.assert_close(got[0].double(), expected[0], rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(got[1].weight.double(), expected[1].weight.double(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(got[2].double(), expected[2], rtol=2e-4, atol=1e-6)


def test_all_masked_and_zero_weights():
    student, teacher = torch.randn(2, 4, 10), torch.randn(2, 4, 10)
    for mask, weighting in [(torch.zeros(2, 4, dtype=torch.bool), wpkl.Weighting(accumulated=0.5)),
                            (torch.ones(2, 4, dtype=torch.bool), wpkl.Weighting(position=wpkl.PositionWindow(0.99, 1.0)))]:
        for reduction in ("mean", "sum", "seq_mean"):
            loss, stats, grad = _run("triton", student, teacher, mask=mask, weighting=weighting, reduction=reduction,
                                     num_items_in_batch=0 if reduction == "mean" and not mask.any() else None)
            assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0 and torch.count_nonzero(stats.weight) == 0


def test_nan_propagates_through_the_weights():
    """A NaN logit in a valid token makes its divergence NaN: with normalization every weight and the loss are NaN,
    as in the specification."""
    student, teacher = torch.randn(2, 4, 10), torch.randn(2, 4, 10)
    student[0, 1, 3] = float("nan")
    for backend in ("triton", "reference"):
        loss, stats, _ = _run(backend, student, teacher, weighting=wpkl.Weighting(disagreement=1.0))
        assert torch.isnan(loss) and torch.isnan(stats.weight).all()


@pytest.mark.parametrize("bad,words", [
    (dict(token_weights=-torch.ones(2, 4)), "token_weights must be finite and >= 0"),
    (dict(token_weights=torch.full((2, 4), float("inf"))), "token_weights must be finite and >= 0"),
    (dict(positions=-torch.ones(2, 4, dtype=torch.long)), "positions must be >= 0"),
    (dict(tokens=torch.full((2, 4), 10), divergence="sampled"), "tokens must lie in [0, V) = [0, 10)"),
    (dict(tokens=torch.full((2, 4), -1), divergence="sampled"), "tokens must lie in [0, V)"),
    (dict(tokens=torch.zeros(2, 4, dtype=torch.long), divergence="sampled", rollout_logprobs=torch.rand(2, 4) + 0.1),
     "rollout_logprobs must be log-probabilities"),
    (dict(tokens=torch.zeros(2, 4, dtype=torch.long), divergence="sampled",
          rollout_logprobs=torch.full((2, 4), float("nan"))), "rollout_logprobs must be finite"),
    (dict(num_items_in_batch=torch.tensor(0)), "num_items_in_batch must be finite and > 0"),
    (dict(num_items_in_batch=-3), "num_items_in_batch must be finite and > 0"),
])
def test_value_checks_in_the_kernel(bad, words):
    """The Triton path checks values inside its weights kernel (no host sync on CUDA); on the CPU it raises at once,
    with the messages of the torch checks."""
    student, teacher = torch.randn(2, 4, 10), torch.randn(2, 4, 10)
    for backend in ("triton", "torch"):
        with pytest.raises(ValueError) as info:
            wpkl.weighted_kl_loss(student, teacher, backend=backend, **bad)
        assert words in str(info.value), (backend, str(info.value))
    # Bad values on masked tokens are ignored.
    mask = torch.zeros(2, 4, dtype=torch.bool)
    wpkl.weighted_kl_loss(student, teacher, mask=mask, backend="triton", **bad)
