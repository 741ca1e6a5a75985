"""Top-k teachers (a teacher server's answer): every mode x divergence x weighting x reduction against the float64
specification, parity with TRL's IW-OPD sparse loss and verl's top-k forward KL, K = V against the dense
divergence, padding, -inf, and bad input."""

import math

import pytest
import torch

import wpkl
from utils import DTYPES, assert_grad_close

BACKENDS = ("torch", "triton")
MODES = ("tail", "renormalize", "raw")
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]


def topk_teacher(teacher_logits, K, temperature=1.0, pad=True, seed=0):
    """The teacher server's answer: its top-K ids and full-vocabulary log-probs (some rows padded with -1/-inf)."""
    log_q = torch.log_softmax(teacher_logits.double() / temperature, dim=-1)
    top = log_q.topk(K, dim=-1)
    ids, logprobs = top.indices.clone(), top.values.clone()
    if pad and K > 1:
        g = torch.Generator().manual_seed(seed)
        short = torch.rand(ids.shape[:-1], generator=g) < 0.3  # some lists are shorter
        keep = torch.randint(1, K, ids.shape[:-1], generator=g)
        cut = short.unsqueeze(-1) & (torch.arange(K) >= keep.unsqueeze(-1))
        ids[cut], logprobs[cut] = -1, -math.inf
    # Servers return the list in any order: shuffle the atoms.
    perm = torch.argsort(torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed + 1)), dim=-1)
    return ids.gather(-1, perm), logprobs.gather(-1, perm)


def run(student, ids, logprobs, backend, upstream=None, **kwargs):
    leaf = student.detach().clone().requires_grad_(True)
    loss, stats = wpkl.weighted_kl_loss(leaf, None, teacher_topk_ids=ids, teacher_topk_logprobs=logprobs,
                                        backend=backend, return_stats=True, **kwargs)
    g = torch.ones_like(loss) if upstream is None else upstream.to(loss.dtype)
    (loss * g).sum().backward()
    return loss.detach(), stats, leaf.grad


def check(student, ids, logprobs, backend, upstream=None, **kwargs):
    got = run(student, ids, logprobs, backend, upstream, **kwargs)
    truth = run(student.double(), ids, logprobs.double(), "reference", upstream, **kwargs)
    same_dtype = run(student.float(), ids, logprobs.float(), "reference", upstream, **kwargs)
    torch.testing.assert_close(got[0].double(), truth[0], rtol=2e-5, atol=2e-6)
    for name in ("divergence", "weight", "teacher_confidence", "teacher_entropy", "student_entropy", "position"):
        torch.testing.assert_close(getattr(got[1], name).double(), getattr(truth[1], name).double(), rtol=2e-5,
                                   atol=2e-6, equal_nan=True, msg=lambda m, name=name: f"{name}: {m}")
    assert_grad_close(got[2], truth[2], same_dtype[2].to(student.dtype), student.dtype)
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("K", [1, 5, 64])
def test_modes_and_divergences(backend, mode, divergence, beta, K, small_blocks):
    V = 97 if K < 64 else 131
    student, teacher = torch.randn(3, 5, V) * 2, torch.randn(3, 5, V) * 2
    ids, logprobs = topk_teacher(teacher, K)
    mask = torch.rand(3, 5) < 0.8
    mask[1] = False
    extra = dict(topk_logprob_floor=-8.0, topk_loss_max=1.5) if mode == "raw" and K == 5 else {}
    # (disagreement exponent 1: a fractional one magnifies the float32 rounding of a near-zero divergence)
    check(student, ids, logprobs, backend, mask=mask, topk_mode=mode, divergence=divergence, beta=beta,
          temperature=0.8, weighting=wpkl.Weighting(confidence=1.0, disagreement=1.0, position=wpkl.ExpDecay(3.0)),
          **extra)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighting", [None, wpkl.Weighting(accumulated=0.5), wpkl.Weighting(normalize=False,
                                                                                            disagreement=1.0)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "seq_mean", "none"])
def test_weightings_and_reductions(backend, weighting, reduction):
    student, teacher = torch.randn(2, 6, 50) * 2, torch.randn(2, 6, 50) * 2
    ids, logprobs = topk_teacher(teacher, 8)
    upstream = torch.randn(2, 6) if reduction == "none" else None
    check(student, ids, logprobs, backend, upstream=upstream, weighting=weighting, reduction=reduction,
          mask=torch.rand(2, 6) < 0.8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(backend, dtype):
    student, teacher = (torch.randn(2, 4, 300) * 3).to(dtype), torch.randn(2, 4, 300) * 3
    ids, logprobs = topk_teacher(teacher, 16)
    for mode in MODES:
        check(student, ids, logprobs.to(dtype), backend, topk_mode=mode, divergence="forward_kl")


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_and_padding(backend):
    """A teacher that bans a listed token (-inf), lists shorter than K, a token with no list at all."""
    student, teacher = torch.randn(2, 3, 40), torch.randn(2, 3, 40)
    ids, logprobs = topk_teacher(teacher, 6, pad=False)
    logprobs[0, 0, 2] = -math.inf  # banned by the teacher
    ids[1, 1, 3:], logprobs[1, 1, 3:] = -1, -math.inf
    ids[1, 2], logprobs[1, 2] = -1, -math.inf  # nothing listed
    for mode in MODES:
        for divergence in ("forward_kl", "jsd"):
            loss, stats, grad = check(student, ids, logprobs, backend, topk_mode=mode, divergence=divergence,
                                      reduction="none")
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
            assert loss[1, 2] == 0 and torch.count_nonzero(grad[1, 2]) == 0
    # Reverse KL where the teacher bans a token the student allows is +inf, as on the full vocabulary.
    rev = wpkl.weighted_kl_loss(student, None, teacher_topk_ids=ids, teacher_topk_logprobs=logprobs,
                                divergence="reverse_kl", topk_mode="renormalize", reduction="none", backend=backend)
    assert rev[0, 0] == math.inf and torch.isfinite(rev[0, 1])


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("mode", ["tail", "renormalize"])
def test_k_equals_v_is_the_dense_divergence(divergence, beta, mode):
    student, teacher = torch.randn(2, 4, 23, dtype=torch.float64) * 2, torch.randn(2, 4, 23, dtype=torch.float64) * 2
    ids, logprobs = topk_teacher(teacher, 23, pad=False)
    leaf = student.clone().requires_grad_(True)
    expected = wpkl.weighted_kl_loss(leaf, teacher, divergence=divergence, beta=beta, backend="reference",
                                     reduction="none")
    expected.sum().backward()
    got = run(student, ids, logprobs, "reference", topk_mode=mode, divergence=divergence, beta=beta,
              reduction="none")
    torch.testing.assert_close(got[0], expected.detach())
    torch.testing.assert_close(got[2], leaf.grad)


trl_iw_opd = pytest.importorskip("trl.experimental.iw_opd.iw_opd_trainer", reason="trl is not installed")


@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("K", [2, 5])
def test_matches_trl_iw_opd_sparse_top_k(add_tail, K):
    """TRL 1.16's IWOPDTrainer.generalized_jsd_loss with top_k = K, beta = 0 (forward KL over the teacher's top-k
    support), loss_add_tail True (wpkl "tail") and False ("renormalize"): same loss and gradient."""
    B, T, V = 3, 7, 40
    student, teacher = torch.randn(B, T, V) * 2, torch.randn(B, T, V) * 2
    labels = torch.randint(0, V, (B, T))
    labels[:, :2] = -100
    labels[2, 4:] = -100
    temperature = 0.9
    leaf = student.clone().requires_grad_(True)
    expected = trl_iw_opd.IWOPDTrainer.generalized_jsd_loss(leaf, teacher, labels=labels, beta=0.0,
                                                            temperature=temperature, top_k=K, add_tail=add_tail)
    expected.backward()
    # The teacher's side as a server would send it: its top-K ids and log-probs at the same temperature.
    log_q = torch.log_softmax(teacher / temperature, dim=-1)
    top = log_q.topk(K, dim=-1)
    mine = student.clone().requires_grad_(True)
    got = wpkl.weighted_kl_loss(mine, None, teacher_topk_ids=top.indices, teacher_topk_logprobs=top.values,
                                topk_mode="tail" if add_tail else "renormalize", divergence="forward_kl",
                                temperature=temperature, mask=labels != -100)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine.grad, leaf.grad, rtol=1e-4, atol=1e-7)


def _verl_forward_kl_topk(student_logits, teacher_topk_log_probs, teacher_topk_ids, log_prob_min_clamp,
                          loss_max_clamp):
    """verl's top-k forward KL, restated from its published formula (verl/trainer/distillation/fsdp/losses.py,
    compute_forward_kl_topk and kl_divergence; loss_max_clamp from DistillationLossConfig): the student's
    log-softmax gathered at the teacher's ids, both clamped from below, sum_j q_j (log q_j - log p_j), then the
    per-token loss clamped from above."""
    student_log_probs = torch.log_softmax(student_logits, dim=-1)
    student_topk = student_log_probs.gather(-1, teacher_topk_ids)
    teacher_topk = teacher_topk_log_probs
    if log_prob_min_clamp is not None:
        student_topk = student_topk.clamp_min(log_prob_min_clamp)
        teacher_topk = teacher_topk.clamp_min(log_prob_min_clamp)
    loss = (teacher_topk.exp() * (teacher_topk - student_topk)).sum(-1)
    return loss if loss_max_clamp is None else loss.clamp(max=loss_max_clamp)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clamps", [(None, None), (-10.0, 10.0), (-3.0, 0.5)])
def test_matches_verl_top_k_forward_kl(backend, clamps):
    floor, loss_max = clamps
    student, teacher = torch.randn(2, 6, 70) * 3, torch.randn(2, 6, 70) * 3
    ids, logprobs = topk_teacher(teacher, 32, pad=False)
    leaf = student.clone().requires_grad_(True)
    expected = _verl_forward_kl_topk(leaf, logprobs.float(), ids, floor, loss_max)
    expected.sum().backward()
    got = run(student, ids, logprobs.float(), backend, divergence="forward_kl", topk_mode="raw", reduction="none",
              topk_logprob_floor=floor, topk_loss_max=loss_max)
    torch.testing.assert_close(got[0], expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], leaf.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_top_k(backend):
    """The same teacher atoms with the student from hidden states and an lm_head weight."""
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 5, 16, generator=g), torch.randn(61, 16, generator=g) / 2
    ids, logprobs = topk_teacher(torch.randn(2, 5, 61, generator=g) * 2, 8)
    kwargs = dict(teacher_topk_ids=ids, teacher_topk_logprobs=logprobs, topk_mode="tail", divergence="jsd",
                  weighting=wpkl.Weighting(accumulated=0.5))
    grads = []
    for fn in ("fused", "materialized"):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if fn == "fused":
            loss = wpkl.fused_linear_kl_loss(h, w, None, None, backend=backend, chunk_size=4, **kwargs)
        else:
            loss = wpkl.weighted_kl_loss(h @ w.T, None, backend="reference", **kwargs)
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    for got, expected in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-5, atol=1e-6)


S, T_ = torch.randn(2, 3, 10), torch.randn(2, 3, 10)
IDS = torch.tensor([[[1, 2], [3, -1], [0, 9]], [[4, 5], [6, 7], [8, 1]]])
LP = -torch.rand(2, 3, 2)


def _call(**overrides):
    kwargs = dict(teacher_topk_ids=IDS, teacher_topk_logprobs=LP, divergence="forward_kl")
    kwargs.update(overrides)
    return wpkl.weighted_kl_loss(S, kwargs.pop("teacher_logits", None), **kwargs)


@pytest.mark.parametrize("overrides,error,words", [
    (dict(teacher_topk_ids=IDS.clone().index_put_((torch.tensor(0), torch.tensor(0), torch.tensor(1)),
                                                  torch.tensor(1))),
     ValueError, "teacher_topk_ids must not repeat an id"),
    (dict(teacher_topk_ids=torch.where(IDS == 9, 10, IDS)), ValueError, "teacher_topk_ids must lie in [0, V) = [0, 10)"),
    (dict(teacher_topk_ids=torch.where(IDS == 9, -2, IDS)), ValueError, "teacher_topk_ids must lie in [0, V)"),
    (dict(teacher_topk_logprobs=torch.rand(2, 3, 2) + 0.1), ValueError, "teacher_topk_logprobs must be log-probabilities"),
    (dict(teacher_topk_logprobs=torch.full((2, 3, 2), math.nan)), ValueError, "teacher_topk_logprobs must not be NaN"),
    (dict(teacher_topk_logprobs=None), ValueError, "give teacher_topk_ids and teacher_topk_logprobs together"),
    (dict(teacher_topk_ids=IDS.float()), TypeError, "teacher_topk_ids must be an integer tensor"),
    (dict(teacher_topk_logprobs=LP.long()), TypeError, "teacher_topk_logprobs must be a floating-point tensor"),
    (dict(teacher_topk_ids=IDS[..., :1]), ValueError, "must have the same shape"),
    (dict(teacher_topk_ids=IDS[0]), ValueError, "teacher_topk_ids must have shape (2, 3) + (K,)"),
    (dict(teacher_logits=T_), ValueError, "give teacher_logits or teacher_topk_ids/teacher_topk_logprobs, not both"),
    (dict(divergence="sampled", tokens=torch.zeros(2, 3, dtype=torch.long)), ValueError,
     'a top-k teacher takes divergence "forward_kl"'),
    (dict(topk_mode="top"), ValueError, "topk_mode must be one of"),
    (dict(topk_logprob_floor=-10.0), ValueError, 'topk_logprob_floor applies to topk_mode="raw"'),
    (dict(topk_mode="raw", topk_loss_max=math.inf), ValueError, "topk_loss_max must be finite"),
    (dict(teacher_topk_ids=None, teacher_topk_logprobs=None, topk_mode="raw", teacher_logits=T_), ValueError,
     "topk_mode, topk_logprob_floor and topk_loss_max need teacher_topk_ids"),
])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input(overrides, error, words, backend):
    with pytest.raises(error) as info:
        _call(backend=backend, **overrides)
    assert words in str(info.value), str(info.value)


def test_bad_values_on_masked_tokens_are_ignored():
    ids = torch.where(IDS == 9, 10, IDS)  # out of range, but only on a masked token
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 2] = False
    assert torch.isfinite(_call(teacher_topk_ids=ids, mask=mask))


def test_inplace_backward_on_the_triton_path():
    """inplace_backward with a top-k teacher: the gradient reuses the logits' storage and equals the new-buffer
    one bit for bit (the atoms' fix-up reads saved [N, K] values, never the overwritten logits)."""
    pytest.importorskip("triton")
    student = (torch.randn(2, 4, 53) * 2).to(torch.bfloat16)
    ids, logprobs = topk_teacher(torch.randn(2, 4, 53), 5)
    kwargs = dict(teacher_topk_ids=ids, teacher_topk_logprobs=logprobs, divergence="forward_kl", backend="triton",
                  weighting=wpkl.Weighting(confidence=1.0))
    expected = run(student, ids, logprobs, "triton", **{k: v for k, v in kwargs.items()
                                                        if k not in ("teacher_topk_ids", "teacher_topk_logprobs",
                                                                     "backend")})[2]
    leaf = student.clone().requires_grad_(True)
    logits = leaf * 1.0
    seen = {}
    logits.register_hook(lambda grad: seen.update(ptr=grad.data_ptr()))
    wpkl.weighted_kl_loss(logits, None, inplace_backward=True, **kwargs).backward()
    assert seen["ptr"] == logits.data_ptr(), "the gradient must reuse the logits' storage"
    assert torch.equal(leaf.grad, expected)


@pytest.mark.parametrize("inplace", [False, True])
def test_triton_path_allocates_no_n_by_v_tensor_but_the_gradient(inplace):
    """Forward and backward with a top-k teacher on the kernels: every tensor of N * V elements or more that an aten
    op returns is the gradient (one buffer, none with inplace_backward), the rest [N, K] atoms and [N] rows."""
    pytest.importorskip("triton")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.big = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in out if isinstance(out, (tuple, list)) else (out,):
                # (a new storage only: the interpreter's launches view and copy the kernels' arguments)
                if isinstance(x, torch.Tensor) and x.numel() >= N * V and x.untyped_storage().data_ptr() not in seen_ptrs:
                    seen_ptrs.add(x.untyped_storage().data_ptr())
                    self.big.append((str(func), tuple(x.shape)))
            return out

    B, T, V, K = 2, 4, 61, 5
    N = B * T
    student = torch.randn(B, T, V) * 2
    ids, logprobs = topk_teacher(torch.randn(B, T, V), K)
    leaf = student.clone().requires_grad_(True)
    logits = leaf * 1.0  # (allocated before recording: the lm_head's output)
    seen_ptrs = {logits.untyped_storage().data_ptr()}
    with Allocations() as mode:
        loss = wpkl.weighted_kl_loss(logits, None, teacher_topk_ids=ids, teacher_topk_logprobs=logprobs,
                                     weighting=wpkl.Weighting(confidence=1.0, accumulated=0.5), backend="triton",
                                     inplace_backward=inplace)
        torch.autograd.grad(loss, logits)
    grads = [op for op, _ in mode.big]
    assert len(grads) == (0 if inplace else 1), mode.big
    assert all("empty" in op for op in grads), mode.big


@pytest.mark.parametrize("layout", ["sliced", "expanded"])
def test_non_contiguous_ids(layout):
    """A server's top-8 cut to its top-3 (a strided view), or one list broadcast to every token (stride 0): the
    kernels index the ids as a contiguous [N, K] table, so they must get one."""
    pytest.importorskip("triton")
    student = torch.randn(2, 3, 41) * 2
    if layout == "sliced":
        ids_full, logprobs_full = topk_teacher(torch.randn(2, 3, 41), 8, pad=False)
        ids, logprobs = ids_full[..., :3], logprobs_full[..., :3]
    else:
        base = torch.randperm(41)[:4]
        ids = base.expand(2, 3, 4)
        logprobs = torch.log_softmax(torch.randn(41), -1)[base].expand(2, 3, 4)
    assert not ids.is_contiguous()
    for mode in ("tail", "raw"):
        check(student, ids, logprobs, "triton", topk_mode=mode, divergence="forward_kl", temperature=0.7)
