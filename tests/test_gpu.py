"""The GPU suite (``python -m pytest -m gpu``): compiled kernels at realistic shapes.

Skipped, with the reason shown, where there is no CUDA GPU. Full batches run through the kernels; a random
subset of tokens is checked against the float64 reference (rows are independent under reduction="none"),
and whole-batch losses against the chunked torch path.
"""

import pytest
import torch

import wpkl

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CHECKED_ROWS = 48


def _pair(N, V, dtype, close=False):
    g = torch.Generator(device="cuda").manual_seed(N + V)
    student = torch.randn(N, V, device="cuda", dtype=torch.float32, generator=g).mul_(2.5)
    teacher = torch.randn(N, V, device="cuda", dtype=torch.float32, generator=g).mul_(2.5)
    if close:
        teacher = student + 0.1 * teacher
    return student.to(dtype), teacher.to(dtype)


def _check_rows(student, teacher, loss, stats, grad, upstream, rows, **kwargs):
    """Per-token loss, stats and gradient rows against the float64 reference, on the chosen rows."""
    s = student[rows].double().requires_grad_(True)
    sub = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    ref, ref_stats = wpkl.weighted_kl_loss(s, teacher[rows].double(), backend="reference", reduction="none",
                                           return_stats=True, **sub)
    (ref * upstream[rows].double()).sum().backward()
    torch.testing.assert_close(loss[rows].double(), ref, rtol=1e-4, atol=1e-4)
    for name in ("divergence", "teacher_confidence", "teacher_entropy", "student_entropy"):
        torch.testing.assert_close(getattr(stats, name)[rows].double(), getattr(ref_stats, name).double(),
                                   rtol=1e-4, atol=1e-4)
    expected = s.grad
    tol = 1e-2 if student.dtype != torch.float32 else 1e-4
    torch.testing.assert_close(grad[rows].double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("sampled", 0.5)])
@pytest.mark.parametrize("vocab", [128256, 262144])
def test_realistic_bf16(divergence, beta, vocab):
    N = 2048
    student, teacher = _pair(N, vocab, torch.bfloat16)
    tokens = torch.randint(0, vocab, (N,), device="cuda")
    mask = torch.rand(N, device="cuda") < 0.9
    upstream = torch.randn(N, device="cuda")
    leaf = student.clone().requires_grad_(True)
    kwargs = dict(mask=mask, tokens=tokens, divergence=divergence, beta=beta)
    loss, stats = wpkl.weighted_kl_loss(leaf, teacher, reduction="none", return_stats=True, backend="triton", **kwargs)
    (loss * upstream).sum().backward()
    rows = torch.randperm(N, device="cuda")[:CHECKED_ROWS]
    _check_rows(student, teacher, loss.detach(), stats, leaf.grad, upstream, rows, **kwargs)
    assert torch.count_nonzero(leaf.grad[~mask]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_dtypes(dtype):
    N, V = 1024, 151936
    student, teacher = _pair(N, V, dtype, close=True)
    upstream = torch.randn(N, device="cuda")
    leaf = student.clone().requires_grad_(True)
    loss, stats = wpkl.weighted_kl_loss(leaf, teacher, reduction="none", return_stats=True, backend="triton")
    (loss * upstream).sum().backward()
    _check_rows(student, teacher, loss.detach(), stats, leaf.grad, upstream, torch.arange(0, N, N // CHECKED_ROWS))


def test_weighted_losses_match_torch_path():
    B, T, V = 4, 1024, 128256
    student, teacher = _pair(B * T, V, torch.bfloat16)
    student, teacher = student.view(B, T, V), teacher.view(B, T, V)
    mask = torch.rand(B, T, device="cuda") < 0.9
    weighting = wpkl.Weighting(position=wpkl.ExpDecay(256.0), confidence=1.0, disagreement=1.0, accumulated=0.5)
    out = {}
    for backend in ("triton", "torch"):
        leaf = student.clone().requires_grad_(True)
        for reduction in ("mean", "seq_mean"):
            loss = wpkl.weighted_kl_loss(leaf, teacher, mask=mask, weighting=weighting, reduction=reduction,
                                         backend=backend)
            loss.backward()
        out[backend] = (loss.detach(), leaf.grad.float())
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["triton"][1], out["torch"][1], rtol=2e-2, atol=1e-2 * out["torch"][1].abs().max())


def test_int64_offsets_past_2_pow_31():
    """N * V > 2**31 elements: the last tokens live past int32 offsets."""
    N, V = 8448, 262144
    assert N * V > 2**31
    student, teacher = _pair(N, V, torch.bfloat16)
    tokens = torch.randint(0, V, (N,), device="cuda")
    upstream = torch.randn(N, device="cuda")
    for divergence in ("reverse_kl", "sampled"):
        leaf = student.clone().requires_grad_(True)
        loss, stats = wpkl.weighted_kl_loss(leaf, teacher, tokens=tokens, divergence=divergence, reduction="none",
                                            return_stats=True, backend="triton")
        (loss * upstream).sum().backward()
        rows = torch.arange(N - 16, N, device="cuda")  # the far end of the buffers
        _check_rows(student, teacher, loss.detach(), stats, leaf.grad, upstream, rows, tokens=tokens,
                    divergence=divergence)
        del leaf


def test_deterministic_on_gpu():
    student, teacher = _pair(4096, 128256, torch.bfloat16)
    weighting = wpkl.Weighting(position=wpkl.ExpDecay(64.0), disagreement=1.0)
    runs = []
    for _ in range(2):
        leaf = student.view(4, 1024, -1).clone().requires_grad_(True)
        loss = wpkl.weighted_kl_loss(leaf, teacher.view(4, 1024, -1), weighting=weighting)
        loss.backward()
        runs.append((loss.detach(), leaf.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_inplace_backward_saves_the_gradient_buffer():
    N, V = 4096, 128256
    student, teacher = _pair(N, V, torch.bfloat16)
    expected_leaf = student.clone().requires_grad_(True)
    wpkl.weighted_kl_loss(expected_leaf * 1.0, teacher).backward()
    leaf = student.clone().requires_grad_(True)
    logits = leaf * 1.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    wpkl.weighted_kl_loss(logits, teacher, inplace_backward=True).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    # leaf.grad (one [N, V] buffer, owned by the caller's leaf) is the only [N, V] allocation.
    assert extra <= N * V * 2 * 1.05, extra
    torch.testing.assert_close(leaf.grad, expected_leaf.grad)


@pytest.mark.parametrize("mode", ["tail", "renormalize", "raw"])
def test_top_k_teacher_bf16(mode):
    """A top-k teacher (K = 64) at V = 151936 on the kernels, checked row by row against the float64 reference."""
    N, V, K = 1024, 151936, 64
    student, teacher = _pair(N, V, torch.bfloat16)
    log_q = torch.log_softmax(teacher.float(), dim=-1)
    logprobs, ids = log_q.topk(K, dim=-1)
    ids[::7, K // 2:] = -1  # some shorter lists
    logprobs[::7, K // 2:] = float("-inf")
    mask = torch.rand(N, device="cuda") < 0.9
    upstream = torch.randn(N, device="cuda")
    leaf = student.clone().requires_grad_(True)
    kwargs = dict(mask=mask, teacher_topk_ids=ids, teacher_topk_logprobs=logprobs, topk_mode=mode,
                  divergence="forward_kl", temperature=0.9)
    loss, stats = wpkl.weighted_kl_loss(leaf, None, reduction="none", return_stats=True, backend="triton", **kwargs)
    (loss * upstream).sum().backward()
    rows = torch.randperm(N, device="cuda")[:CHECKED_ROWS]
    s = student[rows].double().requires_grad_(True)
    sub = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    ref, ref_stats = wpkl.weighted_kl_loss(s, None, backend="reference", reduction="none", return_stats=True, **sub)
    (ref * upstream[rows].double()).sum().backward()
    torch.testing.assert_close(loss.detach()[rows].double(), ref, rtol=1e-4, atol=1e-4)
    for name in ("divergence", "teacher_confidence", "teacher_entropy", "student_entropy"):
        torch.testing.assert_close(getattr(stats, name)[rows].double(), getattr(ref_stats, name).double(),
                                   rtol=1e-4, atol=1e-4, equal_nan=True)
    torch.testing.assert_close(leaf.grad[rows].double(), s.grad, rtol=1e-2, atol=1e-2 * s.grad.abs().max().item())
    assert torch.count_nonzero(leaf.grad[~mask]) == 0


@pytest.mark.parametrize("divergence,K", [("reverse_kl", 2), ("forward_kl", 4), ("jsd", 3), ("sampled", 3),
                                          ("top-k", 3), ("logits+top-k", 3)])
def test_several_teachers_share_passes_bf16(divergence, K):
    """wpkl.multi_teacher_loss on the shared passes (kernels/token_mixture.py and token_mixture_bwd.py, the
    sampled-token and top-k passes: wpkl/engine/mixture.py), compiled, at a realistic vocabulary: checked rows
    against the float64 reference, loss and gradient."""
    N, V = 1024, 128256
    student, _ = _pair(N, V, torch.bfloat16)
    teachers = [(student.float() + (0.5 + k) * torch.randn_like(student, dtype=torch.float32)).bfloat16()
                for k in range(K)]
    tokens = torch.randint(0, V, (N,), device="cuda")
    mask = torch.rand(N, device="cuda") < 0.9
    upstream = torch.randn(N, device="cuda")
    mixing = [0.1 + 0.2 * k for k in range(K)]
    if divergence in ("top-k", "logits+top-k"):  # (logits+top-k: the first teacher's logits beside two top-k)
        given = []
        for t in teachers:
            values, ids = torch.log_softmax(t.float(), -1).topk(64, -1)
            given.append(dict(teacher_topk_ids=ids, teacher_topk_logprobs=values))
        if divergence == "logits+top-k":
            given[0] = teachers[0]
        options = dict(divergence="forward_kl", topk_mode="tail")
    else:
        given = list(teachers)
        if divergence == "sampled":  # a teacher server's log q(y) beside the logits teachers
            log_q = torch.log_softmax(teachers[-1].float(), -1).gather(-1, tokens[:, None])[:, 0]
            given[-1] = dict(teacher_logits=None, teacher_logprobs=log_q)
        options = dict(divergence=divergence, beta=0.3, tokens=tokens)
    leaf = student.clone().requires_grad_(True)
    loss = wpkl.multi_teacher_loss(leaf, teachers=given, mixing=mixing, mask=mask, reduction="none",
                                   backend="triton", **options)
    (loss * upstream).sum().backward()
    rows = torch.randperm(N, device="cuda")[:CHECKED_ROWS]

    def sub(x):
        return {k: (v[rows].double() if v.is_floating_point() else v[rows]) if isinstance(v, torch.Tensor) else v
                for k, v in x.items()} if isinstance(x, dict) else x[rows].double()

    s = student[rows].double().requires_grad_(True)
    ref = wpkl.multi_teacher_loss(s, teachers=[sub(t) for t in given], mixing=mixing, mask=mask[rows],
                                  reduction="none", backend="reference",
                                  **{k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in options.items()})
    (ref * upstream[rows].double()).sum().backward()
    torch.testing.assert_close(loss.detach()[rows].double(), ref, rtol=1e-4, atol=1e-4)
    tol = 1e-2
    torch.testing.assert_close(leaf.grad[rows].double(), s.grad, rtol=tol, atol=tol * s.grad.abs().max().item())
    assert torch.count_nonzero(leaf.grad[~mask]) == 0
