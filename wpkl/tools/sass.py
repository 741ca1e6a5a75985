"""Reading compiled kernels: cuobjdump (shipped in the triton wheel) for a cubin's resources and SASS, the SASS
parsed into instructions, its vocabulary loops measured (kernel_report.py's module docstring defines them), and
the resident CTAs per SM that registers, warps and shared memory allow."""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Per-SM limits for the occupancy estimate.
REGISTERS_PER_SUBPARTITION = 16384
SUBPARTITIONS = 4
REGISTER_UNIT = 256  # registers are allocated per warp in units of 256
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
SHARED_RESERVED_PER_CTA = 1024


@dataclass
class Loop:
    instructions: int
    per_element: float  # instructions / (BLOCK_V / threads)
    bar: int
    shfl: int
    mufu: int
    loads: int
    loads_16b: int
    stores: int
    stores_16b: int


def tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool("cuobjdump"), *flags, f.name], capture_output=True, text=True, check=True).stdout


def resources(cubin: bytes) -> dict[str, int]:
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", cuobjdump(cubin, "--dump-resource-usage")))
    return {k: int(v) for k, v in fields.items()}


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_GUARD = re.compile(r"^@!?U?P[0-9T]+\s+")


def parse_sass(sass: str) -> list[tuple[int, bool, str, str]]:
    """(address, guarded, opcode, text) of every instruction of a cuobjdump -sass listing."""
    out = []
    for line in sass.splitlines():
        match = _SASS_LINE.match(line)
        if match:
            text = match.group(2)
            guard = _GUARD.match(text)
            body = text[guard.end():] if guard else text
            out.append((int(match.group(1), 16), bool(guard), body.split()[0], text))
    return out


def vocabulary_loops(sass: str, elements_per_iteration: int) -> list[Loop]:
    """The vocabulary loops of a kernel (see the module docstring), in address order, measured."""
    instructions = parse_sass(sass)
    candidates = []
    for address, _, opcode, text in instructions:
        target = re.search(r"\bBRA\b.*?\b0x([0-9a-f]+)\b", text) if opcode.startswith("BRA") else None
        if target and int(target.group(1), 16) <= address:
            body = [i for i in instructions if int(target.group(1), 16) <= i[0] <= address]
            if any(op.startswith("LDG") and not guarded for _, guarded, op, _ in body):
                candidates.append((int(target.group(1), 16), address, body))
    innermost = [c for c in candidates if not any(o is not c and c[0] <= o[0] and o[1] <= c[1] for o in candidates)]
    loops = []
    for _, _, body in sorted(innermost, key=lambda c: c[0]):
        ops = [op for _, _, op, _ in body]
        loads = [op for op in ops if op.startswith("LDG")]
        stores = [op for op in ops if op.startswith("STG")]
        loops.append(Loop(instructions=len(body), per_element=round(len(body) / elements_per_iteration, 2),
                          bar=sum(op.startswith("BAR") for op in ops), shfl=sum(op.startswith("SHFL") for op in ops),
                          mufu=sum(op.startswith("MUFU") for op in ops), loads=len(loads),
                          loads_16b=sum(".128" in op for op in loads), stores=len(stores),
                          stores_16b=sum(".128" in op for op in stores)))
    return loops


def ctas_per_sm(registers: int, num_warps: int, shared_bytes: int, arch: int) -> int:
    """Resident CTAs per SM allowed by registers, warps and shared memory (see the module docstring)."""
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    warps_by_registers = SUBPARTITIONS * (REGISTERS_PER_SUBPARTITION // per_warp)
    by_shared = SHARED_PER_SM[arch] // (shared_bytes + SHARED_RESERVED_PER_CTA)
    return min(MAX_CTAS_PER_SM, warps_by_registers // num_warps, MAX_WARPS_PER_SM // num_warps, by_shared)
