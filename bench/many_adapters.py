"""Many random LoRA adapters for one base model, made in seconds: the engine-side tests and `bench adapters` serve
a hundred of them from one vLLM.

The first adapter is made by PEFT (so its config and tensor names are exactly what PEFT writes and vLLM reads);
each further one is the same file with fresh random tensors of the same shape and spread, seeded by its index.
Building a hundred PEFT models instead would take minutes of model loading for nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
WEIGHTS = "adapter_model.safetensors"


def write_adapters(base: Path, root: Path, count: int, *, rank: int = 8,
                   targets: tuple[str, ...] = TARGETS) -> dict[str, Path]:
    """`count` adapters named a000, a001, ... under `root`: random, non-zero A and B, so each answers differently
    from the base model and from the others."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    template = root / "a000"
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                      init_lora_weights=False))
    model.save_pretrained(str(template))
    tensors = load_file(str(template / WEIGHTS))
    folders = {"a000": template}
    for index in range(1, count):
        folder = root / f"a{index:03d}"
        folder.mkdir(exist_ok=True)
        shutil.copy(template / "adapter_config.json", folder / "adapter_config.json")
        generator = torch.Generator().manual_seed(index)
        save_file({name: torch.randn(t.shape, generator=generator) * t.float().std() + t.float().mean()
                   for name, t in tensors.items()}, str(folder / WEIGHTS))
        folders[folder.name] = folder
    return folders


def peft_first_tokens(base: Path, adapters: dict[str, Path], prompts: dict[str, str]) -> dict[str, tuple[str, float]]:
    """Each adapter's greedy first token and its log-probability for its prompt, by PEFT in float32: one base model,
    the adapter weights swapped in place (same shapes), so a hundred references take seconds."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    first = next(iter(adapters.values()))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                      str(first)).eval()
    out = {}
    for name, folder in adapters.items():
        set_peft_model_state_dict(model, load_file(str(folder / WEIGHTS)))
        ids = tokenizer(prompts[name], return_tensors="pt")
        with torch.inference_mode():
            log_probs = torch.log_softmax(model(**ids).logits[0, -1].float(), dim=-1)
        top = int(log_probs.argmax())
        out[name] = (str(tokenizer.decode([top])), float(log_probs[top]))
    return out
