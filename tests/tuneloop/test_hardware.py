"""Where torch work runs: the GPU when torch sees one, else the CPU; a GPU asked for and absent is a clear error;
bf16 only where the device multiplies it natively unless forced. (No GPU is lent to these machines: the CUDA
branch is exercised where one exists, and its absence here is itself checked.)"""

from __future__ import annotations

import pytest
import torch

from tuneloop.errors import HardwareError
from tuneloop.hardware import cpu_has_fast_bf16, torch_placement


def test_auto_follows_what_torch_sees() -> None:
    placed = torch_placement("auto", "auto")
    assert placed.device == ("cuda" if torch.cuda.is_available() else "cpu")
    if placed.device == "cpu":
        assert placed.bf16 == cpu_has_fast_bf16()
    assert placed.precision == ("bf16-autocast" if placed.bf16 else "fp32")


def test_forced_precision_and_cpu_are_honoured() -> None:
    assert torch_placement("cpu", True).precision == "bf16-autocast"
    assert torch_placement("cpu", False).precision == "fp32"
    assert torch_placement("cpu", "auto").device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_asked_for_on_a_machine_without_one_is_refused() -> None:
    with pytest.raises(HardwareError, match="device 'cuda' was asked for, but torch sees no CUDA device"):
        torch_placement("cuda", "auto")
