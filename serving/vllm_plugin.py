"""vLLM general plugin (entry point `vllm.general_plugins`): vLLM calls `register()` in each of its processes.

It is how the grouped CPU LoRA ops (serving/lora_ops.py) and compilation for LoRA engines
(serving/lora_compile.py) reach the engine-core process, which vLLM spawns itself. Installed with the project
(`pip install -e .`); VLLM_PLUGINS or TUNELOOP_LORA_OPS=stock turn it off.
"""

from __future__ import annotations

import os


def register() -> None:
    from tuneloop.serving.engine import COMPILE_ENV
    from tuneloop.serving.lora_ops import install

    if install() and os.environ.get(COMPILE_ENV) == "1":
        from tuneloop.serving.lora_compile import install as install_compile

        install_compile()
