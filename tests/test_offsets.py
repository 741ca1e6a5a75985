"""int64 addressing: a row whose element offset passes 2**31 must be read and written correctly.

On the CPU interpreter a strided view reaches such offsets without 4 GiB of data: the storage is
allocated but only three rows are touched. An int32 overflow reads out of bounds and may crash the
process, so the check runs in a child process. (The GPU suite repeats this with N * V > 2**31 for real.)
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

CHILD = textwrap.dedent("""
    import torch, wpkl
    torch.manual_seed(0)
    V = 100

    def far_rows(dtype):
        # 3 rows, 2**30 elements apart: row 2 starts at element 2**31, past int32.
        view = torch.empty(2**31 + V, dtype=dtype).as_strided((1, 3, V), (0, 2**30, 1))
        view.copy_(torch.randn(1, 3, V) * 3)
        return view

    student, teacher = far_rows(torch.bfloat16), far_rows(torch.bfloat16)
    for divergence in ("reverse_kl", "sampled"):
        tokens = torch.tensor([[3, 50, 99]])
        leaf = student.detach().requires_grad_(True)
        loss = wpkl.weighted_kl_loss(leaf, teacher, backend="{backend}", reduction="none", divergence=divergence,
                                     tokens=tokens)
        loss.sum().backward()
        dense = student.float().clone().requires_grad_(True)
        ref = wpkl.weighted_kl_loss(dense, teacher.float().clone(), backend="reference", reduction="none",
                                    divergence=divergence, tokens=tokens)
        ref.sum().backward()
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(leaf.grad.float(), dense.grad, rtol=1e-2, atol=1e-4)
    print("OK")
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU suite covers int64 offsets with real N * V > 2**31")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_offsets_past_int32(backend):
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", CHILD.replace("{backend}", backend)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, (
        f"child exited {result.returncode} (a negative code is a crash):\n{result.stdout}\n{result.stderr[-3000:]}"
    )
