"""Timing and memory, on CUDA and on CPU, measured the same way for every provider.

CUDA: ``triton.testing.do_bench`` (warm-up excluded, the L2 cache flushed before every run so inputs do not
just sit in it), median and 20/80% quantiles in ms; peak extra memory = ``torch.cuda.max_memory_allocated``
over the call minus what was allocated before it.
CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` (median); peak extra memory = the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs before the call) minus its resident set before
the call. For that one call free heap pages are returned to the OS (malloc_trim) and glibc's mmap
threshold is lowered to 1 MiB, so every large buffer is mapped fresh and counted; timing runs with glibc's usual behaviour (buffers up to 32 MiB reuse the heap), which
would otherwise charge page faults to chunked code.
"""

from __future__ import annotations

import ctypes
import gc
import platform
import re
from pathlib import Path

import torch

CPU_MEMORY_METHOD = "peak RSS delta (VmHWM reset via /proc/self/clear_refs)"
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated delta"


def _set_mmap_threshold(size: int) -> bool:
    try:
        M_MMAP_THRESHOLD = -3
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, size))
    except OSError:
        return False


def _release_free_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def peak_extra_bytes(fn, device: str) -> int | None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    if platform.system() != "Linux":
        fn()
        return None
    _set_mmap_threshold(1 << 20)  # every buffer of 1 MiB or more is mapped on allocation, unmapped on free
    _release_free_heap()  # and chunks the heap kept from earlier runs come back without their pages
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set to the current one
        before = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - before) * 1024
    finally:
        _set_mmap_threshold(32 << 20)  # glibc's default ceiling for its dynamic threshold


def time_ms(fn, device: str, grad_to_none=None, min_run_time: float = 0.5) -> tuple[float, float, float]:
    """(median, 20% quantile, 80% quantile) in milliseconds."""
    if device == "cuda":
        from triton.testing import do_bench

        median, low, high = do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
        return median, low, high
    from torch.utils.benchmark import Timer

    def step():
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        fn()

    fn()  # warm-up, excluded
    measurement = Timer(stmt="step()", globals={"step": step}).blocked_autorange(min_run_time=min_run_time)
    times = sorted(measurement.times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1e3  # noqa: E731
    return measurement.median * 1e3, pick(0.2), pick(0.8)


def copy_bandwidth_gbps(device: str) -> float:
    """The device's copy bandwidth in this run: (read + write bytes) / time for a large buffer copy."""
    size = (1 << 30) if device == "cuda" else (1 << 28)
    src = torch.empty(size, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    median, _, _ = time_ms(lambda: dst.copy_(src), device)
    return 2 * size / (median * 1e-3) / 1e9


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
