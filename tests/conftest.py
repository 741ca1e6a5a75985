"""Test setup: the Triton interpreter on CPU-only machines, seeding, the kernel device."""

import os
import zlib

import pytest
import torch

# Decided when the kernels are decorated, so before anything imports wpkl.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests build tiny models from configs: nothing is downloaded

from hypothesis import settings  # noqa: E402

settings.register_profile("wpkl", max_examples=15, deadline=None, derandomize=True)
settings.load_profile("wpkl")


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh inputs per test, reproducible per test id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def device() -> str:
    """Where the Triton backend runs: the GPU when there is one, else the CPU interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the Triton backend allocates for its outputs starts as NaN: an element a kernel fails to
    write shows up as NaN against the reference, never as a lucky zero."""
    import wpkl.backends.common

    def full_nan(*shape, dtype=None, device=None):
        # Integer buffers (the weights kernel's flags and sequence ids) get -1: an unwritten flag reads as a failure.
        poison = float("nan") if dtype is None or dtype.is_floating_point else -1
        return torch.full(shape, poison, dtype=dtype, device=device)

    monkeypatch.setattr(wpkl.backends.common, "new_buffer", full_nan)
    monkeypatch.setattr(wpkl.backends.common, "new_buffer_like", lambda t: torch.full_like(t, float("nan")))


@pytest.fixture
def small_blocks(monkeypatch):
    """Force BLOCK_V = 64 so small vocabularies take several blocks (online rescaling, ragged tails), and few
    backward programs per row so that each loops over several blocks."""
    import wpkl.backends.launch

    monkeypatch.setattr(wpkl.backends.launch, "MAX_BLOCK_V", 64)
    monkeypatch.setattr(wpkl.backends.launch, "BACKWARD_PROGRAMS", 40)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
