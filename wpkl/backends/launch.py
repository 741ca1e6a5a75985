"""Launch configuration for the kernels: BLOCK_V and num_warps from a small heuristic keyed on V.

The kernels loop over the vocabulary in BLOCK_V chunks, so BLOCK_V bounds the registers a program
holds (a few fp32 values per element per thread) rather than the vocabulary it can handle; any V works.
A chunk is capped at MAX_BLOCK_BYTES per input tensor (4096 bf16/fp16 or 2048 fp32 logits, 32 bytes per
thread at 8 warps) so that no specialization spills: ``python -m wpkl.tools.kernel_report`` checks it, with the
instructions per element, registers and occupancy.
VEC is the number of logits in 16 bytes (of the wider dtype): the kernels' unit of alignment and of a load.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_BLOCK_BYTES = 8192
MAX_BLOCK_V = 4096  # tests lower it to force many blocks at small V
BYTES_PER_WARP = 1024  # 32 bytes (two 16-byte vectors) per thread per loaded tensor: 16 bf16/fp16 or 8 fp32


# The backward kernel splits each row's blocks over enough programs to fill the GPU a few waves deep
# (132 SMs x 8 resident 256-thread programs ~ 1000 per wave); each program loops over its share.
BACKWARD_PROGRAMS = 4096


@dataclass(frozen=True)
class LaunchConfig:
    block_v: int
    num_warps: int
    vec: int


def launch_config(vocab: int, element_size: int = 2) -> LaunchConfig:
    """BLOCK_V: the vocabulary rounded up to a power of two, at least 16 bytes per thread of one warp (so that
    every thread owns whole 16-byte vectors), capped; num_warps grows with it (1 to 8)."""
    vec = 16 // element_size
    cap = min(MAX_BLOCK_V, MAX_BLOCK_BYTES // element_size)
    block_v = min(cap, max(1 << (max(vocab, 1) - 1).bit_length(), 32 * vec))
    num_warps = max(1, min(8, block_v * element_size // BYTES_PER_WARP))
    return LaunchConfig(block_v=block_v, num_warps=num_warps, vec=vec)


def backward_splits(tokens: int, vocab: int, block_v: int) -> int:
    """How many programs share one row in the backward kernel: 1 when there are enough tokens."""
    blocks = -(-vocab // block_v)
    return max(1, min(blocks, -(-BACKWARD_PROGRAMS // max(tokens, 1))))


# The vocabulary sizes whose configurations the resource report and its test compile ahead of time.
REPRESENTATIVE_VOCABS = (1, 97, 1000, 32000, 128256, 151665, 151936, 262144)
