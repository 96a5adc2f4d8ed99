"""Facts about this machine that change how models should run on it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from tuneloop.errors import HardwareError


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


@dataclass(frozen=True)
class Placement:
    """Where a torch workload runs and in which precision: recorded on adapter cards and eval runs."""

    device: str  # "cuda" or "cpu"
    bf16: bool  # autocast matmuls to bf16 (weights stay fp32)

    @property
    def precision(self) -> str:
        return "bf16-autocast" if self.bf16 else "fp32"


def torch_placement(device: str = "auto", bf16: bool | str = "auto") -> Placement:
    """A GPU when torch sees one (and `device` allows it), else the CPU; bf16 where that device multiplies it
    natively (`torch.cuda.is_bf16_supported()`, or the CPU flags above) unless `bf16` forces it on or off."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise HardwareError("device 'cuda' was asked for, but torch sees no CUDA device "
                            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None})")
    chosen = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    if bf16 == "auto":
        native = torch.cuda.is_bf16_supported() if chosen == "cuda" else cpu_has_fast_bf16()
        return Placement(chosen, native)
    return Placement(chosen, bool(bf16))
