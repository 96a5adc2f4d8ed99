"""Facts about this machine that change how models should run on it."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path


@cache
def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX).

    Elsewhere PyTorch emulates bf16: on the AVX2 machines measured here a bf16 matmul was 135x slower than fp32,
    so training autocasts and vLLM serves in fp32 there.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def usable_cpu_cores() -> int:
    """Cores this process may run on: the affinity mask where there is one (a container's or taskset's limit,
    which is also what vLLM's CPU backend divides), else every core of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API outside Linux
        return os.cpu_count() or 1
