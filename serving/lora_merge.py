"""Single-adapter steps at the base model's speed: the adapter merged into each wrapped layer's weight.

On vLLM's CPU backend a LoRA-enabled engine pays, per wrapped linear layer and per forward, several shrink/expand
calls of Python and small ATen ops whatever the batch holds (issue 25 counted 240 per forward for r=8 q/k/v/o
adapters on the 30-layer base model, and measured adapters at 0.35-0.84x of the base model's speed: least beside
an AVX2 GEMM, most beside an AMX one). The arithmetic of an adapter is under 3 % of the base model's, so the cost
is the calls, not the work.

A task's traffic mostly arrives one adapter at a time, so a step's tokens usually all use one adapter slot, or
none. This module classifies each step once (in the punica wrapper's `update_metadata`, which vLLM calls every
step) and, per wrapped layer:

- no token uses an adapter: the base layer alone (no LoRA calls at all);
- every token uses one slot: one GEMM against `W + B @ A` for that slot, merged in float32 and cast to the
  model's dtype, then packed by vLLM's own CPU GEMM dispatch (oneDNN, sgl-kernel or zentorch, as the base layer
  is), so it runs on the same kernel as the base layer;
- anything else (several slots in one step, shapes not handled here): vLLM's LoRA path, with the grouped ops of
  `serving/lora_ops.py`.

The cost is memory: the unpacked weight of each wrapped layer is kept (vLLM frees it once packed), plus one merged
copy of each wrapped layer per adapter slot that has been active, made on the first step that uses it (that
step pays for the merge and the packing; not timed separately yet) and dropped when the slot is reset. Weights of layers
that no adapter wraps are released after the first step. A merged weight rounds once in the model's dtype where
the LoRA path rounds the delta separately: the answers agree with PEFT within the same tolerance
(tests/serving/test_lora_merge.py).

`install()` runs in vLLM's processes through the plugin (`serving/vllm_plugin.py`) when TUNELOOP_LORA_OPS=merged.
"""

from __future__ import annotations

import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch

INSTALLED_MESSAGE = "tuneloop: merged single-adapter steps installed for vLLM's CPU backend"
MERGED_RAN_MESSAGE = "tuneloop: merged-ops step: single adapter (merged weight)"
NO_ADAPTER = -1
MIXED = -2


@dataclass(frozen=True)
class StepPlan:
    """What one step's tokens need: `slot` is the one adapter slot they all use, NO_ADAPTER, or MIXED."""

    tokens: int
    slot: int


_lock = threading.Lock()
_installed = False
_stashed: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()  # base layers whose unpacked weight is kept
_swept = False
_announced: set[str] = set()
_steps = {"one adapter": 0, "no adapter": 0, "mixed": 0, "layer calls not matching the plan": 0}
STEPS_REPORT_EVERY = 500


def _count_step(plan: StepPlan) -> None:
    """Count steps by plan and log the tally every STEPS_REPORT_EVERY steps: how often the fast paths apply is
    what decides whether they matter for a workload."""
    kind = "mixed" if plan.slot == MIXED else "no adapter" if plan.slot == NO_ADAPTER else "one adapter"
    _steps[kind] += 1
    if (_steps["one adapter"] + _steps["no adapter"] + _steps["mixed"]) % STEPS_REPORT_EVERY == 0:
        print(f"tuneloop: merged-ops steps so far: {_steps}", file=sys.stderr, flush=True)


def _announce(path: str) -> None:
    """Say once per path (in vLLM's log) that it ran, so a fast path that never runs shows up."""
    if path not in _announced:
        _announced.add(path)
        print(f"tuneloop: merged-ops step: {path}", file=sys.stderr, flush=True)  # MERGED_RAN_MESSAGE is one


def plan_step(token_slots: torch.Tensor) -> StepPlan:
    """One reduction per step, shared by every layer of the forward."""
    tokens = int(token_slots.numel())
    if tokens == 0:
        return StepPlan(0, NO_ADAPTER)
    low, high = (int(v) for v in torch.aminmax(token_slots))
    if low != high:
        return StepPlan(tokens, MIXED)
    return StepPlan(tokens, low if low >= 0 else NO_ADAPTER)


def merged_weight(base: torch.Tensor, lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...],
                  output_slices: tuple[int, ...], slot: int) -> torch.Tensor | None:
    """`W + B @ A` for one slot, computed in float32 and cast to W's dtype; None when the slot adds nothing to
    this layer (the adapter does not target it), so the base layer's own packed weight serves it.

    vLLM stacks A as (slots, 1, r, in) and B as (slots, 1, out_slice, r) per output slice, with the adapter's
    scaling already folded into B when it was loaded."""
    deltas = []
    for a_stacked, b_stacked, size in zip(lora_a, lora_b, output_slices, strict=True):
        a = a_stacked[slot, 0].to(torch.float32)
        b = b_stacked[slot, 0, :size].to(torch.float32)
        deltas.append(b @ a[:, : base.shape[1]])
    delta = torch.cat(deltas, dim=0)
    if not torch.any(delta):
        return None
    if delta.shape != base.shape:
        raise ValueError(f"merged delta {tuple(delta.shape)} does not match the layer's weight {tuple(base.shape)}")
    return (base.to(torch.float32) + delta).to(base.dtype)


class PackedLinear(torch.nn.Module):
    """A merged weight packed by vLLM's CPU GEMM dispatch, so it runs on the base layer's kernel."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        dispatch_cpu_unquantized_gemm(self, remove_weight=True)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.cpu_linear(x, self.weight, bias)  # type: ignore[no-any-return,operator]


_NOTHING = object()  # cached: this slot adds nothing to this layer


def _merged_for(layer: Any, slot: int) -> PackedLinear | None:
    """The packed merged layer for `slot`, made on first use; None where the base layer alone is right."""
    cache: dict[int, object] = layer.__dict__.setdefault("_tuneloop_merged", {})
    found = cache.get(slot)
    if found is None:
        base = getattr(layer.base_layer, "_tuneloop_weight", None)
        if base is None:
            return None
        weight = merged_weight(base, layer.lora_a_stacked, layer.lora_b_stacked, tuple(layer.output_slices), slot)
        found = _NOTHING if weight is None else PackedLinear(weight)
        cache[slot] = found
    return None if found is _NOTHING else found  # type: ignore[return-value]


def _sweep_unwrapped() -> None:
    """Release the kept weights of layers no adapter wraps (known once the LoRA manager has wrapped the model)."""
    global _swept
    with _lock:
        if _swept:
            return
        for layer in list(_stashed):
            if not getattr(layer, "_tuneloop_wrapped", False):
                layer.__dict__.pop("_tuneloop_weight", None)
        _swept = True


def install() -> bool:
    """Patch vLLM's CPU LoRA layers and the base linear method; True if installed. Idempotent."""
    global _installed
    try:
        from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
        from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    except ImportError:
        return False
    with _lock:
        if _installed:
            return True
        _installed = True

    stock_process = UnquantizedLinearMethod.process_weights_after_loading
    stock_update = PunicaWrapperCPU.update_metadata
    stock_init = BaseLinearLayerWithLoRA.__init__
    stock_reset = BaseLinearLayerWithLoRA.reset_lora
    stock_apply = BaseLinearLayerWithLoRA._apply_sync

    def process_weights_after_loading(self: Any, layer: torch.nn.Module) -> None:
        weight = getattr(layer, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and not weight.is_meta:
            layer.__dict__["_tuneloop_weight"] = weight.detach()  # a reference: vLLM packs a copy and drops this
            _stashed.add(layer)
        stock_process(self, layer)

    def update_metadata(self: Any, mapping: Any, *args: Any, **kwargs: Any) -> None:
        stock_update(self, mapping, *args, **kwargs)
        self._tuneloop_plan = plan_step(self.token_lora_indices)
        _count_step(self._tuneloop_plan)
        if not _swept:
            _sweep_unwrapped()

    def init(self: Any, base_layer: Any, *args: Any, **kwargs: Any) -> None:
        # Every wrapper class calls this __init__ (several override create_lora_weights without calling it).
        base_layer._tuneloop_wrapped = True
        stock_init(self, base_layer, *args, **kwargs)

    def reset_lora(self: Any, index: int) -> None:
        self.__dict__.get("_tuneloop_merged", {}).pop(index, None)
        stock_reset(self, index)

    def apply_sync(self: Any, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        plan: StepPlan | None = getattr(self.punica_wrapper, "_tuneloop_plan", None)
        rows = x.shape[0] if x.dim() == 2 else -1
        if plan is None or rows != plan.tokens or plan.slot == MIXED:
            if plan is not None and rows != plan.tokens:
                _steps["layer calls not matching the plan"] += 1
            _announce("mixed or unplanned (vLLM's LoRA path)")
            return stock_apply(self, x, bias)
        if plan.slot == NO_ADAPTER:
            _announce("no adapter (base layer alone)")
            return self._get_quant_method().apply(self.base_layer, x, bias)  # type: ignore[no-any-return]
        if getattr(self.base_layer, "_tuneloop_weight", None) is None:
            _announce("single adapter, base weight not kept (vLLM's LoRA path)")
            return stock_apply(self, x, bias)
        merged = _merged_for(self, plan.slot)
        if merged is None:
            return self._get_quant_method().apply(self.base_layer, x, bias)  # type: ignore[no-any-return]
        _announce("single adapter (merged weight)")
        out: torch.Tensor = merged(x, bias)
        return out

    UnquantizedLinearMethod.process_weights_after_loading = process_weights_after_loading  # type: ignore[method-assign]
    PunicaWrapperCPU.update_metadata = update_metadata  # type: ignore[method-assign]
    BaseLinearLayerWithLoRA.__init__ = init  # type: ignore[method-assign]
    BaseLinearLayerWithLoRA.reset_lora = reset_lora  # type: ignore[method-assign]
    BaseLinearLayerWithLoRA._apply_sync = apply_sync  # type: ignore[method-assign]
    print(INSTALLED_MESSAGE, file=sys.stderr, flush=True)
    return True
