"""Grouped LoRA matmuls for vLLM's CPU backend: one dense GEMM per adapter instead of a per-token weight gather.

vLLM's CPU LoRA path (`vllm.lora.ops.torch_ops`) computes `x @ A.T` by first indexing the stacked adapter
weights with the per-token adapter index (`weights[indices]`), which materialises a copy of A and B for *every
token* and then runs a batched einsum of 1-row matrices. For 32 decode tokens and an r=8 adapter on a 576-wide
layer that copy moves about as many bytes as the base weight itself, so LoRA cost ~0.6x of the base throughput
on this machine although an r=8 adapter adds under 2 % of the multiply-adds (bench/bench_lora.py measures both).

Tokens in one step almost always share one adapter (or a handful), so here each adapter's rows get a single
dense GEMM against its unpadded-in-place weight slice: the same arithmetic, no per-token copies. Rows whose index
is negative (no adapter) get no LoRA delta. Stock vLLM would index slot -1, i.e. the *last* adapter slot, which is
harmless only while that slot is empty (zeros).

Anything outside the shapes and dtypes handled here falls back to the stock function, so the patch can only
change speed, never coverage. `install()` is called in vLLM's processes by the `vllm.general_plugins` entry point
(`serving.vllm_plugin`); set TUNELOOP_LORA_OPS=stock to keep vLLM's own ops (the benchmark's baseline).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch

INSTALLED_MESSAGE = "tuneloop: grouped LoRA ops installed for vLLM's CPU backend"

_STOCK: dict[str, Callable[..., Any]] = {}
_installed = False


def _stock(name: str) -> Callable[..., Any]:
    """vLLM's own op, captured before install() replaced it."""
    if name not in _STOCK:
        from vllm.lora.ops.torch_ops import lora_ops

        _STOCK[name] = getattr(lora_ops, name)
    return _STOCK[name]


def _adapter_groups(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """(adapter slot, row indices or None for all rows) per adapter used; slot -1 means no adapter."""
    if indices.numel() == 0:
        return []
    low, high = (int(v) for v in torch.aminmax(indices))
    if low == high:
        return [(low, None)]
    return [(int(slot), (indices == slot).nonzero().squeeze(1)) for slot in torch.unique(indices).tolist()]


def _slot_weight(weights: torch.Tensor, slot: int) -> torch.Tensor:
    return weights[slot, 0] if weights.dim() == 4 else weights[slot]


def _simple(inputs: torch.Tensor, weights: torch.Tensor, output: torch.Tensor, indices: torch.Tensor) -> bool:
    return (inputs.dim() == 2 and output.dim() == 2 and weights.dim() in (3, 4)
            and inputs.shape[0] == output.shape[0] == indices.shape[0]
            and inputs.dtype == weights.dtype == output.dtype and inputs.shape[1] == weights.shape[-1])


def bgmv_shrink(inputs: torch.Tensor, lora_a_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, scaling: float = 1.0) -> None:
    """output[:, :r] = scaling * inputs @ A[slot].T, per adapter slot."""
    if not _simple(inputs, lora_a_weights, output_tensor, lora_indices_tensor):
        _stock("bgmv_shrink")(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
        return
    rank = lora_a_weights.shape[-2]
    target = output_tensor[:, :rank]
    groups = _adapter_groups(lora_indices_tensor)
    if len(groups) != 1 or groups[0][0] < 0:
        target.zero_()
    for slot, rows in groups:
        if slot < 0:
            continue
        weight = _slot_weight(lora_a_weights, slot)
        if rows is None:
            torch.mm(inputs, weight.t(), out=target) if target.is_contiguous() else target.copy_(inputs @ weight.t())
            if scaling != 1.0:
                target.mul_(scaling)
        else:
            target[rows] = scaling * (inputs[rows] @ weight.t())


def _expand_into(inputs: torch.Tensor, weights: torch.Tensor, target: torch.Tensor, indices: torch.Tensor,
                 add_inputs: bool) -> None:
    width = min(weights.shape[-2], target.shape[1])
    target = target[:, :width]
    groups = _adapter_groups(indices)
    if not add_inputs and (len(groups) != 1 or groups[0][0] < 0):
        target.zero_()
    for slot, rows in groups:
        if slot < 0:
            continue
        weight = _slot_weight(weights, slot)[:width]
        if rows is None:
            if add_inputs:
                target.addmm_(inputs, weight.t())
            else:
                target.copy_(inputs @ weight.t())
        elif add_inputs:
            target[rows] += inputs[rows] @ weight.t()
        else:
            target[rows] = inputs[rows] @ weight.t()


def bgmv_expand(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, add_inputs: bool = True) -> None:
    """output[:, :out] (+)= inputs @ B[slot].T, per adapter slot."""
    if not _simple(inputs, lora_b_weights, output_tensor, lora_indices_tensor):
        _stock("bgmv_expand")(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
        return
    _expand_into(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)


def bgmv_expand_slice(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                      lora_indices_tensor: torch.Tensor, slice_offset: int, slice_size: int,
                      add_inputs: bool = True) -> None:
    """output[:, offset:offset+size] (+)= inputs @ B[slot].T, per adapter slot (one slice of a fused qkv)."""
    target = output_tensor[:, slice_offset:slice_offset + slice_size]
    if not _simple(inputs, lora_b_weights, target, lora_indices_tensor) or lora_b_weights.shape[-2] != slice_size:
        _stock("bgmv_expand_slice")(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset,
                                    slice_size, add_inputs)
        return
    _expand_into(inputs, lora_b_weights, target, lora_indices_tensor, add_inputs)


def sgmv_shrink(inputs: torch.Tensor, lora_a_weights: torch.Tensor, output_tensor: torch.Tensor,
                b_seq_start_loc: torch.Tensor, seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor,
                batches: int, max_seq_length: int, token_nums: int, scaling: float) -> None:
    bgmv_shrink(inputs, lora_a_weights, output_tensor,
                torch.repeat_interleave(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                b_seq_start_loc: torch.Tensor, seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor,
                batches: int, max_seq_length: int, token_nums: int, add_inputs: bool = False) -> None:
    bgmv_expand(inputs, lora_b_weights, output_tensor,
                torch.repeat_interleave(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                      b_seq_start_loc: torch.Tensor, seq_len_tensor: torch.Tensor,
                      lora_indices_tensor: torch.Tensor, batches: int, max_seq_length: int, token_nums: int,
                      slice_offset: int, slice_size: int, add_inputs: bool = False) -> None:
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor,
                      torch.repeat_interleave(lora_indices_tensor, seq_len_tensor), slice_offset, slice_size,
                      add_inputs)


REPLACEMENTS: dict[str, Callable[..., None]] = {
    "bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice,
    "sgmv_shrink": sgmv_shrink, "sgmv_expand": sgmv_expand, "sgmv_expand_slice": sgmv_expand_slice,
}


def install() -> bool:
    """Swap the grouped ops into vLLM's CPU LoRA modules; True if installed. Idempotent."""
    from serving.engine import LORA_OPS_ENV

    if os.environ.get(LORA_OPS_ENV, "grouped") == "stock":
        return False
    try:
        from vllm.lora.ops import torch_ops
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # a vLLM without the CPU LoRA path: nothing to replace
        return False
    global _installed
    if _installed:
        return True
    for name, replacement in REPLACEMENTS.items():
        _stock(name)
        for module in (lora_ops, torch_ops, punica_cpu):
            if hasattr(module, name):
                setattr(module, name, replacement)
    _installed = True
    # vLLM configures logging for its own loggers only; stderr lands in the engine log the supervisor keeps.
    print(f"{INSTALLED_MESSAGE} (pid {os.getpid()})", file=sys.stderr, flush=True)
    return True
