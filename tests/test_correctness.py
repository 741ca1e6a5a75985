"""Triton kernels (interpreter on CPU) and the chunked torch path against the float64 reference."""

import math

import pytest
import torch

import wpkl
from utils import (
    DTYPES,
    assert_values_close,
    logits_pair,
    random_mask,
    reference,
    run,
)
from utils import check_backend as _check

# The interpreter's numpy evaluates masked-off lanes (-inf - -inf): wpkl's launches silence those warnings
# (wpkl/backends/common.py: launch), so any RuntimeWarning here is a real one.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

BACKENDS = ("triton", "torch")
DIVERGENCES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.0), ("jsd", 1.0), ("sampled", 0.5)]
# With BLOCK_V forced to 64: one block, two blocks, a ragged tail, many blocks.
VOCABS = (1, 97, 300, 1000)


def _sampled_tokens(leading, vocab, mask):
    tokens = torch.randint(0, vocab, leading)
    return tokens.masked_fill(~mask, -100)  # TRL's ignore index on masked tokens must not matter


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(backend, divergence, beta, vocab, dtype, small_blocks, device):
    leading = (3, 7)
    student, teacher = logits_pair((*leading, vocab), dtype)
    mask = random_mask(leading)
    tokens = _sampled_tokens(leading, vocab, mask)
    _check(backend, student, teacher, dtype, device, mask=mask, tokens=tokens, divergence=divergence, beta=beta,
           reduction="none", upstream=torch.randn(leading))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("jsd", 0.3), ("sampled", 0.5)])
@pytest.mark.parametrize("temperature", [0.5, 2.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_temperature(backend, divergence, beta, temperature, dtype, small_blocks, device):
    """Temperature divides the logits after the fp32 upcast (dividing bf16 logits first is a peer's bug)."""
    student, teacher = logits_pair((2, 5, 200), dtype, close=True)
    tokens = torch.randint(0, 200, (2, 5))
    loss, _, _ = _check(backend, student, teacher, dtype, device, tokens=tokens, divergence=divergence,
                        beta=beta, temperature=temperature)
    # Temperature is applied, not ignored.
    plain, _, _ = reference(student, teacher, tokens=tokens, divergence=divergence, beta=beta)
    assert not torch.allclose(loss.double(), plain)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_close_distributions(backend, dtype, small_blocks, device):
    """Student close to teacher: D is small, the regime where cancellation would show."""
    student, teacher = logits_pair((4, 6, 500), dtype, close=True)
    _check(backend, student, teacher, dtype, device, reduction="sum")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "sampled"])
def test_padded_teacher_vocab_and_strided_views(backend, divergence, small_blocks, device):
    """V_t > V with huge values in the padding (must be ignored); logits sliced from a longer sequence."""
    B, L, V = 3, 9, 150
    full_student, full_teacher = logits_pair((B, L, V), vocab_teacher=V + 17)
    full_teacher[..., V:] = 1e4
    student, teacher = full_student[:, 2:-1], full_teacher[:, 2:-1]  # no copy: non-contiguous leading dims
    assert not student.is_contiguous() and not teacher.is_contiguous()
    tokens = torch.randint(0, V, student.shape[:-1])
    _check(backend, student, teacher, torch.float32, device, tokens=tokens, divergence=divergence,
           reduction="none", upstream=torch.randn(student.shape[:-1]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "seq_mean", "none"])
@pytest.mark.parametrize("mask_kind", ["none", "partial", "all_masked"])
def test_masks_and_reductions(backend, reduction, mask_kind, device):
    leading = (4, 6)
    student, teacher = logits_pair((*leading, 33))
    mask = {"none": None, "partial": random_mask(leading), "all_masked": torch.zeros(leading, dtype=torch.bool)}[mask_kind]
    loss, stats, grad = _check(backend, student, teacher, torch.float32, device, mask=mask, reduction=reduction,
                               weighting=wpkl.Weighting(confidence=1.0))
    if mask_kind == "all_masked":
        assert torch.count_nonzero(loss) == 0 and torch.count_nonzero(grad) == 0
        assert torch.count_nonzero(stats.weight) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_input(backend, device):
    """[N, V] input: positions give the sequences (0 starts one) for seq_mean and position weighting."""
    student, teacher = logits_pair((11, 40))
    positions = torch.tensor([0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3])
    mask = torch.tensor([0, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1], dtype=torch.bool)
    kwargs = dict(mask=mask, positions=positions, weighting=wpkl.Weighting(position=wpkl.PositionWindow(0.0, 0.5)))
    for reduction in ("mean", "seq_mean", "none"):
        _check(backend, student, teacher, torch.float32, device, reduction=reduction, **kwargs)
    # seq_mean by hand: sequences [1..3], [4..6], [9..10] (positions 2, 3 of the third are valid).
    per_token = wpkl.weighted_kl_loss(student, teacher, reduction="none", backend="reference", **kwargs)
    by_hand = (per_token[1:4].sum() / 3 + per_token[4:7].sum() / 3 + per_token[9:11].sum() / 2) / 3
    seq_mean = wpkl.weighted_kl_loss(student, teacher, reduction="seq_mean", backend="reference", **kwargs)
    torch.testing.assert_close(seq_mean, by_hand)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighting", [
    wpkl.Weighting(position=wpkl.ExpDecay(3.0)),
    wpkl.Weighting(position=wpkl.PowerDecay(0.7), normalize=False),
    wpkl.Weighting(position=wpkl.PositionTable([2.0, 1.0, 0.5])),
    wpkl.Weighting(position=wpkl.PositionWindow(0.0, 0.3)),
    wpkl.Weighting(position=wpkl.PositionWindow(0.7, 1.0)),
    wpkl.Weighting(confidence=2.0),
    wpkl.Weighting(disagreement=0.5),
    wpkl.Weighting(accumulated=0.5, normalize=False),
    wpkl.Weighting(position=wpkl.ExpDecay(4.0), confidence=1.0, disagreement=1.0, accumulated=1.0),
], ids=lambda w: repr(w).replace(" ", ""))
@pytest.mark.parametrize("divergence", ["reverse_kl", "sampled"])
def test_weightings(backend, weighting, divergence, device):
    leading = (3, 8)
    student, teacher = logits_pair((*leading, 50))
    mask = random_mask(leading)
    tokens = _sampled_tokens(leading, 50, mask)
    _check(backend, student, teacher, torch.float32, device, mask=mask, tokens=tokens, divergence=divergence,
           weighting=weighting, token_weights=torch.rand(leading) + 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_logits(backend, small_blocks, device):
    """-inf is a legal logit: 0 log 0 = 0, no NaN; a teacher-banned token the student allows gives +inf."""
    V = 130
    student, teacher = logits_pair((2, 4, V))
    banned = torch.rand(V) < 0.3
    student[..., banned] = -math.inf
    teacher[..., banned] = -math.inf
    teacher[1, 1, 200 % V:] = -math.inf  # a whole tail banned by the teacher only ...
    student[1, 1, 200 % V:] = -math.inf  # ... and by the student: still finite
    student[0, 3] = -math.inf  # a padding row of -inf, masked out
    teacher[0, 3] = -math.inf
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, 3] = False
    for divergence, beta in [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.9)]:
        loss, stats, grad = _check(backend, student, teacher, torch.float32, device, mask=mask,
                                   divergence=divergence, beta=beta, reduction="none", upstream=torch.randn(2, 4))
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        assert torch.isfinite(stats.teacher_entropy).all()

    # The teacher bans a token the student allows: reverse KL is +inf (the math), forward KL stays finite.
    teacher[0, 0, 5] = -math.inf
    student[0, 0, 5] = 1.0
    rev = wpkl.weighted_kl_loss(student.to(device), teacher.to(device), mask=mask.to(device), backend=backend,
                                reduction="none")
    assert rev[0, 0].item() == math.inf and torch.isfinite(rev[1]).all()
    fwd = wpkl.weighted_kl_loss(student.to(device), teacher.to(device), mask=mask.to(device), backend=backend,
                                divergence="forward_kl", reduction="none")
    assert torch.isfinite(fwd).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_logits_propagate(backend, where, device):
    student, teacher = logits_pair((2, 3, 20))
    target = student if where == "student" else teacher
    target[0, 1, 7] = math.nan
    mask = torch.ones(2, 3, dtype=torch.bool)
    for divergence in ("reverse_kl", "forward_kl", "jsd", "sampled"):
        kwargs = dict(divergence=divergence, tokens=torch.full((2, 3), 7, device=device), backend=backend)
        loss = wpkl.weighted_kl_loss(student.to(device), teacher.to(device), mask=mask.to(device), **kwargs)
        assert torch.isnan(loss), f"{divergence}: NaN logits in a valid token must give a NaN loss"
        mask[0, 1] = False  # the same NaN in a masked token is ignored
        loss = wpkl.weighted_kl_loss(student.to(device), teacher.to(device), mask=mask.to(device), **kwargs)
        assert torch.isfinite(loss)
        mask[0, 1] = True


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend, device):
    student, teacher = logits_pair((3, 5, 257), torch.bfloat16, device=device)
    weighting = wpkl.Weighting(position=wpkl.ExpDecay(2.0), disagreement=1.0, accumulated=0.5)
    first = run(student, teacher, backend=backend, weighting=weighting)
    second = run(student, teacher, backend=backend, weighting=weighting)
    assert torch.equal(first[0], second[0]) and torch.equal(first[2], second[2])


def test_empty_batch(device):
    for backend in BACKENDS:
        student, teacher = logits_pair((0, 16), device=device)
        loss, stats, grad = run(student, teacher, backend=backend)
        assert loss.item() == 0 and grad.shape == (0, 16) and stats.divergence.shape == (0,)


def test_backends_agree_on_sequence_stats(device):
    """Positions in TokenStats count valid tokens: the first response token is 0."""
    student, teacher = logits_pair((2, 6, 12))
    mask = torch.tensor([[0, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    _, stats = wpkl.weighted_kl_loss(student.to(device), teacher.to(device), mask=mask.to(device),
                                     backend="triton", return_stats=True)
    expected = torch.tensor([[0, 0, 0, 1, 0, 2], [0, 1, 2, 3, 4, 5]], dtype=torch.float32)
    assert torch.equal(stats.position.cpu(), expected)
    assert stats.divergence.dtype == torch.float32 and not stats.divergence.requires_grad


def test_inplace_backward(device):
    student, teacher = logits_pair((2, 4, 100), torch.bfloat16, device=device)
    expected = run(student, teacher, backend="triton")[2]
    leaf = student.clone().requires_grad_(True)
    logits = leaf * 1.0  # a non-leaf, like an lm_head output
    seen = {}

    def record(grad):
        seen["ptr"] = grad.data_ptr()

    logits.register_hook(record)
    wpkl.weighted_kl_loss(logits, teacher, backend="triton", inplace_backward=True).backward()
    assert seen["ptr"] == logits.data_ptr(), "the gradient must reuse the logits' storage"
    assert torch.equal(leaf.grad, expected)


def test_module_matches_function(device):
    student, teacher = logits_pair((2, 5, 30), device=device)
    weighting = wpkl.Weighting(confidence=1.0)
    module = wpkl.WeightedKLLoss(weighting=weighting, divergence="jsd", beta=0.3, temperature=1.5)
    expected = wpkl.weighted_kl_loss(student, teacher, weighting=weighting, divergence="jsd", beta=0.3,
                                     temperature=1.5)
    assert torch.equal(module(student, teacher), expected)
    assert "jsd" in repr(module)


def test_auto_backend_on_cpu_uses_torch_path(monkeypatch):
    """auto never launches kernels on CPU tensors, even under the interpreter."""
    import wpkl.backends.torch_pass

    calls = []
    original = wpkl.backends.torch_pass.TorchPass.forward
    monkeypatch.setattr(wpkl.backends.torch_pass.TorchPass, "forward",
                        staticmethod(lambda *a, **k: calls.append(1) or original(*a, **k)))
    student, teacher = logits_pair((2, 3, 10))
    wpkl.weighted_kl_loss(student, teacher)
    assert calls == [1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_rollout", [False, True])
def test_sampled_with_teacher_logprobs_and_rollout(backend, with_rollout, small_blocks, device):
    """log q(y) given directly (no teacher logits read) and behaviour log-probs from the sampler."""
    leading, V = (3, 6), 150
    student, teacher = logits_pair((*leading, V))
    mask = random_mask(leading)
    tokens = _sampled_tokens(leading, V, mask)
    safe = tokens.clamp_min(0)
    teacher_logprobs = torch.log_softmax(teacher.double(), -1).gather(-1, safe[..., None]).squeeze(-1).float()
    rollout = (torch.log_softmax(student.double(), -1).gather(-1, safe[..., None]).squeeze(-1)
               + 0.3 * torch.randn(leading, dtype=torch.float64)).float() if with_rollout else None
    common = dict(mask=mask, tokens=tokens, divergence="sampled", rollout_logprobs=rollout,
                  weighting=wpkl.Weighting(accumulated=0.7, disagreement=0.5))
    upstream = torch.randn(leading)
    # The reference with teacher logits is the truth; the teacher-logprobs run must match it.
    truth_loss, truth_stats, truth_grad = reference(student, teacher, upstream=upstream, reduction="none", **common)
    dev = lambda x: None if x is None else x.to(device)  # noqa: E731
    loss, stats, grad = run(student.to(device), None, backend=backend, upstream=upstream.to(device),
                            teacher_logprobs=teacher_logprobs.to(device), reduction="none",
                            **{k: (dev(v) if isinstance(v, torch.Tensor) else v) for k, v in common.items()})
    assert_values_close(loss, truth_loss)
    assert_values_close(stats.divergence, truth_stats.divergence)
    assert_values_close(stats.weight, truth_stats.weight)
    assert_values_close(stats.student_entropy, truth_stats.student_entropy)
    torch.testing.assert_close(grad.double().cpu(), truth_grad, rtol=1e-4, atol=1e-7)
    # Without teacher logits the teacher's confidence and entropy are unknown: NaN, never a made-up number.
    valid = mask.to(device)
    assert torch.isnan(stats.teacher_confidence[valid]).all() and torch.isnan(stats.teacher_entropy[valid]).all()
    if with_rollout:  # the divergence uses the behaviour log-probs
        assert_values_close(stats.divergence[valid].cpu(), (rollout - teacher_logprobs)[mask])
    # And the same problem through teacher logits on this backend agrees too.
    _check(backend, student, teacher, torch.float32, device, upstream=upstream, reduction="none", **common)
