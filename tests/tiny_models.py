"""Small Hugging Face causal LMs of other architectures than the embedded SmolLM2, made by the tests.

Random weights (seeded): what the bring-your-own tests check is the path (module names, shapes, chat template,
serving, import), not what the model says. The tokenizer is the embedded model's, so texts tokenize as in every
other test and vLLM finds a chat template with a system role.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def make_tiny_model(target: Path, architecture: str, tokenizer_from: Path, *, seed: int = 0,
                    chat_template: bool = True) -> Path:
    """A 2-layer model of `architecture` ("qwen2", "gpt_neox", "phi3") saved as safetensors in `target`."""
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, Phi3Config, Qwen2Config

    # vLLM's CPU attention needs a supported head size: 128 / 2 heads = 64.
    common: dict[str, Any] = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "vocab_size": 49152, "max_position_embeddings": 1024,
                              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": False}
    configs = {"qwen2": lambda: Qwen2Config(num_key_value_heads=1, **common),
               "phi3": lambda: Phi3Config(num_key_value_heads=1, **common),
               "gpt_neox": lambda: GPTNeoXConfig(**common)}
    config = configs[architecture]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if name == "chat_template.jinja" and not chat_template:
            continue
        if (tokenizer_from / name).exists():
            shutil.copyfile(tokenizer_from / name, target / name)
    return target
