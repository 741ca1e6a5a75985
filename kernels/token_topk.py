"""The top-k teacher's gradient at its atoms: one small program per token, after the dense backward kernel.

With x_j the student's scaled logits s_j / T at the K given ids and lse its log-normalizer, every top-k mode's
loss is a function F(x, lse) (wpkl/reference/topk.py: topk_atom_terms), so

    d F / d s_v = ([v in S] A_v + p_v Lambda) / T,      A = dF/dx,  Lambda = dF/dlse   (autograd on [N, K] atoms)

The dense part p_v Lambda / T is the "sampled" backward kernel's with no sampled token (token -1) and the
divergence slot holding -Lambda (wpkl/backends/triton_topk.py arranges both); this kernel then overwrites the K atom
columns with their full value g / T (A_j + p_j Lambda), so every gradient element is rounded once. It reads
K ids, K atom gradients and K gathered logits per token and writes K elements: O(K) bytes per token against the
dense pass's 2 V elements.
"""

import triton
import triton.language as tl

from .common import STAT_AUX, STAT_STUDENT_LSE


@triton.jit
def topk_atoms_bwd_kernel(
    # pointers
    ids_ptr,  # [N, K] int64 (-1 pads)
    atom_grad_ptr,  # [N, K] fp32 A = dF/dx
    x_ptr,  # [N, K] fp32 the scaled student logits s_j / T at the ids
    stats_ptr,  # [NUM_STATS, N] fp32: the student's T lse (STAT_STUDENT_LSE) and -Lambda (STAT_AUX)
    grad_loss_ptr,  # [N] fp32 d loss / d L_i
    valid_ptr,  # [N] int8
    grad_ptr,  # [B, T, V] out (already holding the dense part), student dtype
    # sizes and strides
    N,
    K,
    T,
    V,
    stride_grad_b,
    stride_grad_t,
    # meta
    inv_temperature,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    if tl.load(valid_ptr + row) != 0:
        ks = tl.arange(0, BLOCK_K)
        offs = row.to(tl.int64) * K + ks
        ids = tl.load(ids_ptr + offs, mask=ks < K, other=-1)
        atom = (ids >= 0) & (ids < V)  # out-of-range ids (reported by the value checks) are never written
        a = tl.load(atom_grad_ptr + offs, mask=atom, other=0.0)
        x = tl.load(x_ptr + offs, mask=atom, other=0.0)
        lse = tl.load(stats_ptr + STAT_STUDENT_LSE * N + row) * inv_temperature
        lam = -tl.load(stats_ptr + STAT_AUX * N + row)
        coef = tl.load(grad_loss_ptr + row) * inv_temperature
        p = tl.exp(x - lse)
        b = row // T
        grad_row = grad_ptr + b.to(tl.int64) * stride_grad_b + (row - b * T).to(tl.int64) * stride_grad_t
        value = coef * (a + p * lam)
        tl.store(grad_row + ids, value.to(grad_ptr.dtype.element_ty), mask=atom)
