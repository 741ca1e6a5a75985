"""Row addressing of the Triton kernels: rows that start anywhere relative to a 16-byte boundary.

The kernels split each row into a peel (up to the first 16-byte boundary), aligned unmasked blocks, an
aligned tail block and the edges (kernels/common.py: aligned_split). Under the interpreter every alignment
hint is checked (common.assume_multiple), so these tests fail if the GPU's 16-byte accesses would be
misaligned, as well as if any element were missed or counted twice.
"""

import math

import pytest
import torch

import wpkl
from utils import check_backend, logits_pair, random_mask, run

pytestmark = pytest.mark.usefixtures("small_blocks")  # BLOCK_V = 64: several blocks, peels, tails and edges


def _odd_rows(shape, dtype, offset, vocab_full=None, seed_scale=3.0):
    """[B, T, V] logits whose first element sits ``offset`` elements past a 16-byte boundary, in rows of
    ``vocab_full`` >= V elements (a vocabulary sliced from a wider one)."""
    B, T, V = shape
    full = vocab_full or V
    storage = torch.randn(offset + B * T * full, dtype=torch.float64) * seed_scale
    view = storage.to(dtype)[offset:].view(B, T, full)[..., :V]
    assert view.data_ptr() % 16 == (offset * view.element_size()) % 16
    return view


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.4),
                                             ("sampled", 0.5)])
@pytest.mark.parametrize("vocab", [151, 203])  # odd: consecutive rows start at every offset modulo 16 bytes
def test_odd_vocabulary_rows(dtype, divergence, beta, vocab, device):
    student, teacher = logits_pair((2, 5, vocab), dtype)
    mask = random_mask((2, 5), full_masked_row=False)
    tokens = torch.randint(0, vocab, (2, 5))
    check_backend("triton", student, teacher, dtype, device, mask=mask, tokens=tokens, divergence=divergence,
                  beta=beta, reduction="none", upstream=torch.randn(2, 5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("offset", [1, 3, 6])
def test_misaligned_first_element(dtype, offset, device):
    """Tensors whose data pointer is not 16-byte aligned (a view into a storage): the launch passes the
    aligned base and the shift, and the rows' 16-byte boundaries are found from there."""
    from wpkl.backends.triton_pass import aligned_base

    student = _odd_rows((2, 3, 149), dtype, offset)
    teacher = _odd_rows((2, 3, 149), dtype, offset)
    base, shift = aligned_base(student)
    assert base.data_ptr() % 16 == 0 and base.data_ptr() + shift * student.element_size() == student.data_ptr()
    for divergence in ("reverse_kl", "jsd"):
        check_backend("triton", student, teacher, dtype, device, divergence=divergence, reduction="none",
                      upstream=torch.randn(2, 3))


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd", "sampled"])
def test_sliced_vocabulary_and_sequence(divergence, device):
    """The issue's case: logits[:, p - 1:-1, :V] of an odd, tokenizer-sized V sliced from a padded one, with
    a teacher padded differently, so teacher rows do not share the student's misalignment."""
    from wpkl.backends.triton_pass import backward_launch, forward_launch

    B, L, V = 2, 7, 141
    full_student = _odd_rows((B, L, V), torch.bfloat16, 0, vocab_full=V + 2)
    full_teacher = _odd_rows((B, L, V + 6), torch.bfloat16, 0, vocab_full=V + 6)
    student, teacher = full_student[:, 2:-1], full_teacher[:, 2:-1]
    tokens = torch.randint(0, V, student.shape[:-1])
    check_backend("triton", student, teacher, torch.bfloat16, device, tokens=tokens, divergence=divergence,
                  reduction="none", upstream=torch.randn(student.shape[:-1]))
    # These rows exercise the kernels' unaligned-teacher and unaligned-gradient paths.
    N = student.shape[0] * student.shape[1]
    _, _, meta = forward_launch(student, teacher, torch.ones(N, dtype=torch.int8), None, None, None,
                                torch.empty(N), torch.empty(8, N), 0, 0.5, 1.0)
    assert meta["ALIGNED"] is False
    _, _, meta = backward_launch(student, teacher, torch.ones(N, dtype=torch.int8), None, torch.empty(N),
                                 torch.empty(8, N), torch.empty_like(student), 0, 0.5, 1.0)
    assert meta["TEACHER_ALIGNED"] is False and meta["GRAD_ALIGNED"] is False


@pytest.mark.parametrize("vocab", [1, 2, 3, 5, 7, 9])
@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3),
                                             ("sampled", 0.5)])
def test_vocabulary_shorter_than_the_peel(vocab, divergence, beta, device):
    """bf16 rows of fewer than 8 elements starting past a 16-byte boundary: everything is edges."""
    student = _odd_rows((1, 4, vocab), torch.bfloat16, 3)
    teacher = _odd_rows((1, 4, vocab), torch.bfloat16, 3)
    tokens = torch.randint(0, vocab, (1, 4))
    check_backend("triton", student, teacher, torch.bfloat16, device, tokens=tokens, divergence=divergence,
                  beta=beta, reduction="none", upstream=torch.randn(1, 4))


@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3),
                                             ("jsd", 0.7), ("sampled", 0.5)])
def test_single_support_rows_are_exact(divergence, beta, device):
    """V = 1, or every token but one banned by both: p = q = 1 there, D = 0 and the gradient is exactly 0
    (the kernels take logit differences in raw units, so nothing rounds; jsd's D rounds log2(m / p) = 0
    through its mixture formula, but the backward subtracts the same number)."""
    student, teacher = logits_pair((2, 3, 37))
    student[0], teacher[0] = -math.inf, -math.inf
    student[0, :, 11], teacher[0, :, 11] = 2.5, -1.25
    single = (student[..., 11:12].contiguous(), teacher[..., 11:12].contiguous(), 0)  # V = 1
    for s, t, token in ((student, teacher, 11), single):
        _, stats, grad = run(s.to(device), t.to(device), backend="triton", reduction="none", divergence=divergence,
                             beta=beta, tokens=torch.full((2, 3), token, device=device), upstream=torch.randn(2, 3))
        assert torch.count_nonzero(grad[0]) == 0
        if divergence == "jsd":
            assert stats.divergence[0].abs().max() < 1e-6
        else:
            assert torch.count_nonzero(stats.divergence[0]) == 0


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "sampled"])
def test_backward_splits_agree_bitwise(divergence, monkeypatch, device):
    """Each gradient element is computed by exactly one program, the same way however a row's blocks are
    split among programs: one program per row, two, three (ragged) or one per block all agree bitwise."""
    import wpkl.backends.launch

    student, teacher = logits_pair((3, 2, 1000), torch.bfloat16)
    mask = torch.ones(3, 2, dtype=torch.bool)
    mask[1, 1] = False
    tokens = torch.randint(0, 1000, (3, 2))
    grads = []
    for programs in (1, 6, 10, 10_000):
        monkeypatch.setattr(wpkl.backends.launch, "BACKWARD_PROGRAMS", programs)
        grads.append(run(student.to(device), teacher.to(device), backend="triton", mask=mask.to(device),
                         tokens=tokens.to(device), divergence=divergence)[2])
    assert all(torch.equal(g, grads[0]) for g in grads[1:])
    assert torch.count_nonzero(grads[0][1, 1]) == 0 and torch.count_nonzero(grads[0][0, 0]) > 0


@pytest.mark.parametrize("student_dtype,teacher_dtype", [(torch.bfloat16, torch.float32),
                                                         (torch.float32, torch.float16)])
def test_mixed_dtypes(student_dtype, teacher_dtype, device):
    """Student and teacher in different dtypes: VEC follows the wider one."""
    student = _odd_rows((2, 3, 157), student_dtype, 1)
    teacher = _odd_rows((2, 3, 157), teacher_dtype, 2)
    for divergence in ("reverse_kl", "forward_kl", "jsd"):
        check_backend("triton", student, teacher, student_dtype, device, divergence=divergence, reduction="none",
                      upstream=torch.randn(2, 3))


def test_inplace_backward_on_odd_rows(device):
    student, teacher = logits_pair((2, 4, 131), torch.bfloat16, device=device)
    expected = run(student, teacher, backend="triton")[2]
    leaf = student.clone().requires_grad_(True)
    logits = leaf * 1.0
    seen = {}

    def record(grad):
        seen["ptr"] = grad.data_ptr()

    logits.register_hook(record)
    wpkl.weighted_kl_loss(logits, teacher, backend="triton", inplace_backward=True).backward()
    assert seen["ptr"] == logits.data_ptr()
    assert torch.equal(leaf.grad, expected)


def test_co_alignment_rule():
    """Rows share their misalignment iff the element shifts, and the strides of dimensions with more than one
    row, agree modulo VEC."""
    from wpkl.backends.triton_pass import co_aligned

    assert co_aligned((3, 1000, 100), (3, 1000, 100), (2, 10), 8)
    assert co_aligned((3, 1000, 100), (3, 1001, 100), (1, 10), 8)  # one sequence: stride_b unused
    assert not co_aligned((3, 1000, 100), (3, 1001, 100), (2, 10), 8)
    assert not co_aligned((3, 1000, 100), (3, 1000, 101), (2, 10), 8)
    assert co_aligned((3, 1000, 100), (3, 1000, 108), (2, 10), 8)
    assert not co_aligned((3, 1000, 100), (4, 1000, 100), (1, 1), 8)
