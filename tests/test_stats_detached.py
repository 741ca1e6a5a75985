"""Every TokenStats tensor is detached, on every backend and input form: logging the stats must neither raise
(``.numpy()``) nor keep the step's autograd graph alive."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

import wpkl

B, T, V, H, K = 2, 5, 11, 6, 3


def _inputs(device):
    student = torch.randn(B, T, V, device=device, requires_grad=True)
    teacher = torch.randn(B, T, V, device=device)
    mask = torch.rand(B, T, device=device) > 0.3
    return student, teacher, mask


def _topk(device):
    ids = torch.stack([torch.randperm(V, device=device)[:K] for _ in range(B * T)]).view(B, T, K)
    logprobs = torch.randn(B, T, V, device=device).log_softmax(-1).gather(-1, ids)
    return ids, logprobs


def _forms(device):
    weighting = wpkl.Weighting(confidence=1.0, accumulated=0.5)

    def materialized(backend, **kw):
        student, teacher, mask = _inputs(device)
        return student, wpkl.weighted_kl_loss(student, teacher, mask=mask, weighting=weighting, backend=backend,
                                              return_stats=True, **kw)

    def topk(backend, **kw):
        student, _, mask = _inputs(device)
        ids, logprobs = _topk(device)
        return student, wpkl.weighted_kl_loss(student, None, mask=mask, teacher_topk_ids=ids,
                                              teacher_topk_logprobs=logprobs, backend=backend, return_stats=True,
                                              weighting=wpkl.Weighting(accumulated=0.5), **kw)

    def fused_linear(backend, **kw):
        hidden = torch.randn(B, T, H, device=device, requires_grad=True)
        weight = torch.randn(V, H, device=device, requires_grad=True)
        _, _, mask = _inputs(device)
        return hidden, wpkl.fused_linear_kl_loss(hidden, weight, torch.randn(B, T, H, device=device),
                                                 torch.randn(V, H, device=device), mask=mask, weighting=weighting,
                                                 backend=backend, return_stats=True, **kw)

    return {"materialized": materialized, "topk": topk, "fused_linear": fused_linear}


def _assert_detached(stats, loss, leaf):
    for name, x in stats.as_dict().items():
        assert not x.requires_grad and x.grad_fn is None, (name, x.grad_fn)
        x.cpu().numpy()  # raises for a tensor that requires grad
    loss.backward()
    assert leaf.grad is not None


@pytest.mark.parametrize("form", ["materialized", "topk", "fused_linear"])
@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_stats_are_detached(form, backend, device):
    if form == "topk" and backend == "reference":
        backend = "torch"
    leaf, (loss, stats) = _forms(device)[form](backend)
    _assert_detached(stats, loss, leaf)


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("form", ["materialized", "topk", "fused_linear"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_vocabulary_parallel_stats_are_detached(form, backend, one_rank_group):
    leaf, (loss, stats) = _forms("cpu")[form](backend, process_group=one_rank_group)
    _assert_detached(stats, loss, leaf)
