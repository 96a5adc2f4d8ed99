"""Many random LoRA adapters for one base model, made in seconds: the engine-side tests and `bench adapters` serve
a hundred of them from one vLLM.

The first adapter is made by PEFT (so its config and tensor names are exactly what PEFT writes and vLLM reads);
each further one is the same file with fresh random tensors of the same shape and spread, seeded by its index.
Building a hundred PEFT models instead would take minutes of model loading for nothing.

PEFT's random initialisation (`init_lora_weights=False`) gives a delta about 600 times the size of a trained
adapter's (Frobenius norm of the scaled B @ A of q_proj: about 16 against 0.025 for the sentiment adapter after a
short training). Such an adapter wrecks the model: under the label constraint it spells "negative" in three to
five sub-word tokens where the base model and a trained adapter use one, so its requests do two to three times the
decode steps and a speed comparison against the base model compares different work. Benchmarks therefore scale B
by TRAINED_LIKE_B_SCALE (answers keep the base model's length; the work per step does not depend on the values);
the correctness tests keep the full-size delta, so an adapter that is ignored changes their answers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
WEIGHTS = "adapter_model.safetensors"
TRAINED_LIKE_B_SCALE = 0.1


def scale_lora_b(model: torch.nn.Module, scale: float) -> None:
    """Multiply every LoRA B matrix of a PEFT model in place (see the module docstring for why)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(scale)


def write_adapters(base: Path, root: Path, count: int, *, rank: int = 8,
                   targets: tuple[str, ...] = TARGETS, b_scale: float = 1.0) -> dict[str, Path]:
    """`count` adapters named a000, a001, ... under `root`: random, non-zero A and B, so each answers differently
    from the base model and from the others (at b_scale 1; smaller scales make trained-size deltas)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    template = root / "a000"
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                      init_lora_weights=False))
    scale_lora_b(model, b_scale)
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
