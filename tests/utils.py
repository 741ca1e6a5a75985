"""Shared test helpers: input generators and the tolerance table (one place for every dtype)."""

from __future__ import annotations

import torch

import wpkl

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The tolerance rule is the public harness's (wpkl/testing/judge.py): one place for every dtype, for wpkl's tests
# and for users checking their own losses.
from wpkl.testing.judge import GRAD_TOL, VALUE_TOL, judge_grad  # noqa: E402,F401


def logits_pair(shape, dtype=torch.float32, vocab_teacher=None, close=False, scale=3.0, device="cpu"):
    """Random student and teacher logits (never zeros). ``close``: the teacher is a perturbed student."""
    student = torch.randn(shape, dtype=torch.float64) * scale
    v_t = shape[-1] if vocab_teacher is None else vocab_teacher
    teacher = torch.randn(*shape[:-1], v_t, dtype=torch.float64) * scale
    if close:
        teacher[..., : shape[-1]] = student + 0.1 * torch.randn(shape, dtype=torch.float64)
    return student.to(dtype).to(device), teacher.to(dtype).to(device)


def random_mask(leading, p_valid=0.7, full_masked_row=True):
    mask = torch.rand(leading) < p_valid
    if full_masked_row and len(leading) == 2 and leading[0] > 1:
        mask[1] = False  # one fully masked sequence
    return mask


def run(student, teacher, *, backend, upstream=None, **kwargs):
    """Loss, stats and d(upstream . loss)/d student for one backend, on a fresh leaf copy of the logits."""
    leaf = student.detach().clone().requires_grad_(True)
    loss, stats = wpkl.weighted_kl_loss(leaf, teacher, backend=backend, return_stats=True, **kwargs)
    g = torch.ones_like(loss) if upstream is None else upstream.to(loss.dtype)
    (loss * g).sum().backward()
    return loss.detach(), stats, leaf.grad


def reference(student, teacher, **kwargs):
    """The float64 truth on the same (already rounded) logits."""
    return run(student.double().cpu(), teacher.double().cpu(), backend="reference", **{
        k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})


def assert_values_close(actual, expected, **tol):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), equal_nan=True, **(tol or VALUE_TOL))


def assert_grad_close(actual, truth, same_dtype_torch, dtype):
    """wpkl.testing's gradient rule: elementwise within twice plain torch's error in the same dtype (row-wise)."""
    j = judge_grad(actual, truth, same_dtype_torch, dtype)
    if not j.passed:
        i = j.index
        raise AssertionError(
            f"gradient off at flat index {i}: got {actual.flatten()[i].item():.6e}, truth "
            f"{truth.flatten()[i].item():.6e}, same-dtype torch {same_dtype_torch.flatten()[i].item():.6e} "
            f"({j.ratio:.2f}x the limit {j.limit:.3e}{'; non-finite where the truth is finite' if j.finite_mismatch else ''})")


def assert_stats_close(actual, expected):
    for name in ("divergence", "weight", "teacher_confidence", "teacher_entropy", "student_entropy", "position"):
        assert_values_close(getattr(actual, name), getattr(expected, name))
    assert torch.equal(actual.mask.cpu(), expected.mask.cpu())


def check_backend(backend, student, teacher, dtype, device, **kwargs):
    """Loss, stats and gradient of one backend (inputs moved to ``device``) against the float64 reference,
    the gradient judged against plain torch's error in the same dtype. Returns the backend's results."""
    upstream = kwargs.pop("upstream", None)
    to_dev = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    loss, stats, grad = run(student.to(device), teacher.to(device), backend=backend,
                            upstream=None if upstream is None else upstream.to(device), **to_dev)
    ref_loss, ref_stats, ref_grad = reference(student, teacher, upstream=upstream, **kwargs)
    torch_grad = run(student, teacher, backend="reference", upstream=upstream, **kwargs)[2]
    assert_values_close(loss, ref_loss)
    assert_stats_close(stats, ref_stats)
    assert_grad_close(grad, ref_grad, torch_grad, dtype)
    return loss, stats, grad


def run_torchrun(script: str, *args: str, nproc: int = 2):
    """``python -m torch.distributed.run --standalone --nproc_per_node nproc ROOT/script args`` with this checkout's
    wpkl first on PYTHONPATH (whatever the venv's editable install points at), OMP_NUM_THREADS=1; skips the test
    where torch.distributed is unavailable. Returns the CompletedProcess."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest
    import torch.distributed as dist

    if not dist.is_available() or importlib.util.find_spec("torch.distributed.run") is None:
        pytest.skip("torch.distributed is not available")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(root / script), *args],
                          capture_output=True, text=True, timeout=300, env=env, cwd=root)


def poison_new_buffers() -> None:
    """Every buffer the Triton backend allocates starts as NaN (-1 for integers), in this process: conftest.py's
    ``poisoned_outputs`` fixture for spawned workers."""
    import wpkl.backends.common

    def full_nan(*shape, dtype=None, device=None):
        return torch.full(shape, float("nan") if dtype is None or dtype.is_floating_point else -1, dtype=dtype,
                          device=device)

    wpkl.backends.common.new_buffer = full_nan
    wpkl.backends.common.new_buffer_like = lambda t: torch.full_like(t, float("nan"))


def leave_worker() -> None:
    """End a spawned gloo worker whose results are written: flush and leave without the interpreter's teardown.
    gloo's threads may still be releasing the last collectives' tensors then, which aborts the process
    ("terminate called without an active exception", SIGABRT: torch 2.13, now and then on a busy CPU), as
    examples/tp_distill.py notes."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a gloo group's store."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_worlds(worker, worlds: dict, timeout_s: float, at_once: bool = True) -> dict:
    """Spawn ``worker(rank, world, port, out_dir)`` for each world size ({world: out_dir}), all at once or one world
    after another; a world not done in ``timeout_s`` is a hang (its processes are killed). Returns each world's
    ranks' results: the JSON each rank wrote to ``out_dir/rank{r}.json``."""
    import json
    import os
    import time

    import torch.multiprocessing as mp

    def start(world, out_dir):
        return mp.start_processes(worker, args=(world, free_port(), out_dir), nprocs=world, join=False,
                                  start_method="spawn")

    def wait(contexts):
        deadline = time.monotonic() + timeout_s
        try:
            for world, context in contexts.items():
                while not context.join(timeout=2):
                    if time.monotonic() > deadline:
                        raise AssertionError(f"the world of {world} did not finish in {timeout_s} s (a hang?)")
        finally:
            for context in contexts.values():
                for process in context.processes:
                    if process.is_alive():
                        process.kill()

    if at_once:
        wait({world: start(world, out_dir) for world, out_dir in worlds.items()})
    else:
        for world, out_dir in worlds.items():
            wait({world: start(world, out_dir)})
    out = {}
    for world, out_dir in worlds.items():
        out[world] = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                out[world].append(json.load(f))
    return out


def assert_ranks_passed(results: list, skip_prefix: str | None = None) -> None:
    """Every rank's case results (name -> None or a traceback) are None; cases named ``skip_prefix...`` aside."""
    failures = {f"rank {rank}: {name}": error for rank, result in enumerate(results)
                for name, error in result["results"].items()
                if error is not None and not (skip_prefix and name.startswith(skip_prefix))}
    assert not failures, "\n".join(f"{k}\n{v}" for k, v in list(failures.items())[:6]) + f"\n({len(failures)} failed)"


def assert_bad_inputs_raised(results: list, count: int) -> None:
    """Every rank ran ``count`` bad-input cases ("bad: ..."), each raising as it should (None)."""
    for rank, result in enumerate(results):
        bad = {k: v for k, v in result["results"].items() if k.startswith("bad: ")}
        assert len(bad) == count, (rank, bad)
        assert all(v is None for v in bad.values()), (rank, {k: v for k, v in bad.items() if v is not None})
