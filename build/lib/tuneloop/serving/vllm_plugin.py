"""vLLM general plugin (entry point `vllm.general_plugins`): vLLM calls `register()` in each of its processes.

It is how the grouped CPU LoRA ops (serving/lora_ops.py) reach the engine-core process, which vLLM spawns itself.
Installed with the project (`pip install -e .`); VLLM_PLUGINS or TUNELOOP_LORA_OPS=stock turn it off.
"""

from __future__ import annotations


def register() -> None:
    from tuneloop.serving.lora_ops import install

    install()
