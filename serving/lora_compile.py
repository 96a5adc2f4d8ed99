"""torch.compile for LoRA-enabled engines on CPU: each wrapped layer becomes one opaque op in the compiled graph.

vLLM's CPU platform turns compilation off for any engine started with `--enable-lora` (`vllm/platforms/cpu.py`:
`if vllm_config.lora_config is not None: compilation_config.mode = NONE`), because its CPU LoRA path is Python
with data-dependent shapes that Dynamo cannot trace once and reuse. So a LoRA engine runs the whole model eagerly
even for requests that use no adapter, and loses what Inductor fuses around the GEMMs (norms, rotary, activations,
residual adds): bench lora_paths measured base-model requests in a LoRA engine at 0.80-0.94x of a LoRA-free one.

The LoRA work itself needs no tracing. vLLM's GPU path already hides it behind a custom op keyed by layer name
(`lora_linear_async`); this module does the same on CPU: `BaseLinearLayerWithLoRA.apply` calls
`torch.ops.tuneloop.lora_linear(layer_name, output_size, x, bias)`, whose real implementation looks the layer up
and runs the eager LoRA path (merged, base-only or grouped, `serving/lora_merge.py`) and whose fake
implementation only gives the output's shape. Dynamo traces the rest of the model once; every step's LoRA choice
is still made eagerly inside the op.

`install()` runs in every vLLM process through the plugin when TUNELOOP_LORA_COMPILE=1 (set by the engine
launcher when `serving.lora_compile` is on): the API server process needs the platform patch (it builds the
config), the engine-core process the op.
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import Any

import torch

INSTALLED_MESSAGE = "tuneloop: LoRA layers as one compiled-graph op each; compilation kept on for LoRA engines"

_lock = threading.Lock()
_installed = False
_library: torch.library.Library | None = None  # held for the process's life: a Library unregisters when collected
_layers: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def _lora_linear(layer_name: str, output_size: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    layer = _layers.get(layer_name)
    if layer is None:
        raise RuntimeError(f"tuneloop.lora_linear: no LoRA layer named {layer_name!r} in this process")
    out: torch.Tensor = layer._apply_sync(x, bias)
    return out


def _lora_linear_fake(layer_name: str, output_size: int, x: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], output_size))


def _register_op() -> None:
    global _library
    _library = torch.library.Library("tuneloop", "FRAGMENT")
    _library.define("lora_linear(str layer_name, int output_size, Tensor x, Tensor? bias) -> Tensor")
    _library.impl("lora_linear", _lora_linear, "CPU")
    torch.library.register_fake("tuneloop::lora_linear", _lora_linear_fake, lib=_library)


def _keep_compilation_for_lora() -> None:
    """Run the CPU platform's config check as if no LoRA were configured, then put the LoRA config back: the one
    line of that check that reads it is the one that turns compilation off."""
    from vllm.platforms.cpu import CpuPlatform

    stock = CpuPlatform.check_and_update_config.__func__  # type: ignore[attr-defined]

    def check_and_update_config(cls: Any, vllm_config: Any) -> None:
        lora_config = vllm_config.lora_config
        object.__setattr__(vllm_config, "lora_config", None)
        try:
            stock(cls, vllm_config)
        finally:
            object.__setattr__(vllm_config, "lora_config", lora_config)

    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)  # type: ignore[method-assign,assignment]


def install() -> bool:
    """Patch the platform check and vLLM's LoRA linear layers; True if installed. Idempotent."""
    global _installed
    try:
        from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    except ImportError:
        return False
    with _lock:
        if _installed:
            return True
        _installed = True
    _register_op()
    _keep_compilation_for_lora()
    stock_init = BaseLinearLayerWithLoRA.__init__

    def init(self: Any, base_layer: Any, *args: Any, **kwargs: Any) -> None:
        stock_init(self, base_layer, *args, **kwargs)
        name = f"{base_layer.prefix or id(base_layer)}.tuneloop_lora"
        self._tuneloop_name = name
        _layers[name] = self

    def apply(self: Any, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out: torch.Tensor = torch.ops.tuneloop.lora_linear(self._tuneloop_name, sum(self.output_slices), x, bias)
        return out

    BaseLinearLayerWithLoRA.__init__ = init  # type: ignore[method-assign]
    BaseLinearLayerWithLoRA.apply = apply  # type: ignore[method-assign]
    print(INSTALLED_MESSAGE, file=sys.stderr, flush=True)
    return True
