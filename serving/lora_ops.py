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

A step that mixes three or more adapters (many tasks' traffic on one engine) would pay one gather, GEMM and
scatter per adapter per call; there the adapters' weights are stacked instead, so a call is two GEMMs whatever the
number of adapters: shrink multiplies every token by all used A's at once (T x k*r, r = 8, so k*r stays small) and
keeps each token's own r columns; expand places each token's r values in its adapter's block of a zero T x k*r
matrix and multiplies it by the B's stacked (a block-diagonal product). The extra multiply-adds are (k - 1) times
the adapter's own, which at r = 8 is still small beside the base layer.

Mixed precision is handled, not refused: in a bf16 model vLLM's CPU wrapper multiplies bf16 activations by bf16
weights into a float32 buffer and back; each GEMM here runs in `compute_dtype` (bf16 with float32 accumulation
where the CPU has native bf16, float32 elsewhere) and writes into the caller's dtype. Anything outside the shapes
handled here falls back to the stock function, so the patch can only change speed, never coverage.

`install()` is called in vLLM's processes by the `vllm.general_plugins` entry point (`serving.vllm_plugin`); set
TUNELOOP_LORA_OPS=stock to keep vLLM's own ops (the benchmark's baseline).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

INSTALLED_MESSAGE = "tuneloop: grouped LoRA ops installed for vLLM's CPU backend"
GROUPED_RAN_MESSAGE = "tuneloop: bgmv_shrink grouped"  # start of the line the first grouped shrink prints
FELL_BACK_MESSAGE = "fell back to vLLM's op"
FLOAT_TYPES = (torch.float32, torch.bfloat16, torch.float16)

_STOCK: dict[str, Callable[..., Any]] = {}
_installed = False
_announced: set[tuple[str, ...]] = set()


def _announce(op: str, path: str, *tensors: torch.Tensor) -> None:
    """Say once per op, path and dtypes which path ran (in vLLM's log), so a fast path that never runs in the
    served precision shows up instead of hiding behind a silent fallback."""
    key = (op, path, *(str(t.dtype).removeprefix("torch.") for t in tensors))
    if _installed and key not in _announced:
        _announced.add(key)
        print(f"tuneloop: {op} {path} ({' / '.join(key[2:])})", file=sys.stderr, flush=True)


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


STACK_FROM = 3  # adapters in one call from which the stacked two-GEMM path replaces the per-adapter loop


@dataclass(frozen=True)
class _Stacked:
    """The adapters a call uses, and where each token's adapter sits among them (-1: none)."""

    slots: torch.Tensor  # the used slots, ascending
    position: torch.Tensor  # per token: index into `slots`, or -1
    has_adapter: torch.Tensor  # per token: bool


def _stacked(indices: torch.Tensor) -> _Stacked | None:
    """The stacked plan when STACK_FROM or more adapters share this call, else None (the per-adapter loop)."""
    if indices.numel() == 0:
        return None
    slots = torch.unique(indices)
    slots = slots[slots >= 0]
    if slots.numel() < STACK_FROM:
        return None
    has_adapter = indices >= 0
    position = torch.where(has_adapter, torch.searchsorted(slots, indices.clamp(min=0)), -1)
    return _Stacked(slots, position, has_adapter)


def _stacked_weights(weights: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(k, rows, cols) of the used slots."""
    return weights[slots, 0] if weights.dim() == 4 else weights[slots]


def _slot_weight(weights: torch.Tensor, slot: int) -> torch.Tensor:
    return weights[slot, 0] if weights.dim() == 4 else weights[slot]


def _simple(inputs: torch.Tensor, weights: torch.Tensor, output: torch.Tensor, indices: torch.Tensor) -> bool:
    return (inputs.dim() == 2 and output.dim() == 2 and weights.dim() in (3, 4)
            and inputs.shape[0] == output.shape[0] == indices.shape[0]
            and all(t.dtype in FLOAT_TYPES for t in (inputs, weights, output))
            and inputs.shape[1] == weights.shape[-1])


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype to multiply in. One dtype for all: that one. Mixed (vLLM's CPU wrapper keeps its shrink buffer
    in float32 while activations and weights are bf16): the low precision where the CPU multiplies it natively
    (AVX512-BF16/AMX; the GEMM still accumulates in float32), else float32, since emulated bf16 was ~100x slower
    than float32 on AVX2 machines."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1:
        return dtypes.pop()
    low = [d for d in dtypes if d != torch.float32]
    return low[0] if len(low) == 1 and _native_low_precision() else torch.float32


def _native_low_precision() -> bool:
    from tuneloop.hardware import cpu_has_fast_bf16

    return cpu_has_fast_bf16()


def bgmv_shrink(inputs: torch.Tensor, lora_a_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, scaling: float = 1.0) -> None:
    """output[:, :r] = scaling * inputs @ A[slot].T, per adapter slot."""
    if not _simple(inputs, lora_a_weights, output_tensor, lora_indices_tensor):
        _announce("bgmv_shrink", FELL_BACK_MESSAGE, inputs, lora_a_weights, output_tensor)
        _stock("bgmv_shrink")(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
        return
    dtype = compute_dtype(inputs, lora_a_weights, output_tensor)
    _announce("bgmv_shrink", f"grouped, computed in {str(dtype).removeprefix('torch.')}", inputs, lora_a_weights,
              output_tensor)
    rank = lora_a_weights.shape[-2]
    target = output_tensor[:, :rank]
    plan = _stacked(lora_indices_tensor)
    if plan is not None:
        _announce("bgmv_shrink", f"stacked, computed in {str(dtype).removeprefix('torch.')}", inputs,
                  lora_a_weights, output_tensor)
        stacked = _stacked_weights(lora_a_weights, plan.slots).to(dtype)  # (k, r, in)
        every = (inputs.to(dtype) @ stacked.reshape(-1, stacked.shape[-1]).t()).view(-1, stacked.shape[0], rank)
        own = every[torch.arange(every.shape[0]), plan.position.clamp(min=0)]  # (T, r)
        own = torch.where(plan.has_adapter.unsqueeze(1), own * scaling, torch.zeros((), dtype=own.dtype))
        target.copy_(own)
        return
    groups = _adapter_groups(lora_indices_tensor)
    if len(groups) != 1 or groups[0][0] < 0:
        target.zero_()
    for slot, rows in groups:
        if slot < 0:
            continue
        weight = _slot_weight(lora_a_weights, slot).to(dtype)
        if rows is None and dtype == target.dtype == inputs.dtype and target.is_contiguous():
            torch.mm(inputs, weight.t(), out=target)
            if scaling != 1.0:
                target.mul_(scaling)
            continue
        product = (inputs if rows is None else inputs[rows]).to(dtype) @ weight.t()
        if scaling != 1.0:
            product.mul_(scaling)
        if rows is None:
            target.copy_(product)
        else:
            target[rows] = product.to(target.dtype)


def _expand_into(inputs: torch.Tensor, weights: torch.Tensor, target: torch.Tensor, indices: torch.Tensor,
                 add_inputs: bool) -> None:
    width = min(weights.shape[-2], target.shape[1])
    target = target[:, :width]
    dtype = compute_dtype(inputs, weights, target)
    plan = _stacked(indices)
    if plan is not None:
        _announce("bgmv_expand", f"stacked, computed in {str(dtype).removeprefix('torch.')}", inputs, weights,
                  target)
        stacked = _stacked_weights(weights, plan.slots)[:, :width].to(dtype)  # (k, out, r)
        k, rank = stacked.shape[0], stacked.shape[-1]
        blocks = torch.zeros(inputs.shape[0], k, rank, dtype=dtype)
        adapted = plan.has_adapter.nonzero().squeeze(1)
        blocks[adapted, plan.position[adapted]] = inputs[adapted, :rank].to(dtype)
        product = (blocks.view(-1, k * rank) @ stacked.permute(0, 2, 1).reshape(k * rank, -1)).to(target.dtype)
        target.add_(product) if add_inputs else target.copy_(product)
        return
    _announce("bgmv_expand", f"grouped, computed in {str(dtype).removeprefix('torch.')}", inputs, weights, target)
    groups = _adapter_groups(indices)
    if not add_inputs and (len(groups) != 1 or groups[0][0] < 0):
        target.zero_()
    for slot, rows in groups:
        if slot < 0:
            continue
        weight = _slot_weight(weights, slot)[:width].to(dtype)
        if rows is None and add_inputs and dtype == target.dtype == inputs.dtype:
            target.addmm_(inputs, weight.t())
            continue
        product = ((inputs if rows is None else inputs[rows]).to(dtype) @ weight.t()).to(target.dtype)
        if rows is None:
            target.add_(product) if add_inputs else target.copy_(product)
        elif add_inputs:
            target[rows] += product
        else:
            target[rows] = product


def bgmv_expand(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, add_inputs: bool = True) -> None:
    """output[:, :out] (+)= inputs @ B[slot].T, per adapter slot."""
    if not _simple(inputs, lora_b_weights, output_tensor, lora_indices_tensor):
        _announce("bgmv_expand", FELL_BACK_MESSAGE, inputs, lora_b_weights, output_tensor)
        _stock("bgmv_expand")(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
        return
    _expand_into(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)


def bgmv_expand_slice(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                      lora_indices_tensor: torch.Tensor, slice_offset: int, slice_size: int,
                      add_inputs: bool = True) -> None:
    """output[:, offset:offset+size] (+)= inputs @ B[slot].T, per adapter slot (one slice of a fused qkv)."""
    target = output_tensor[:, slice_offset:slice_offset + slice_size]
    if not _simple(inputs, lora_b_weights, target, lora_indices_tensor) or lora_b_weights.shape[-2] != slice_size:
        _announce("bgmv_expand_slice", FELL_BACK_MESSAGE, inputs, lora_b_weights, output_tensor)
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
    from tuneloop.serving.engine import LORA_OPS_ENV

    mode = os.environ.get(LORA_OPS_ENV, "grouped")
    if mode == "stock":
        return False
    if mode == "merged":
        from tuneloop.serving.lora_merge import install as install_merged

        install_merged()
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
