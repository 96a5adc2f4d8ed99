"""What a base model folder offers LoRA: its architecture, the names of its linear projections, its chat template.

Projection names differ by architecture (Llama/Qwen2/Mistral: `q_proj`...`down_proj`; Phi-3: fused `qkv_proj`
and `gate_up_proj`; GPT-NeoX: `query_key_value`, `dense`, `dense_h_to_4h`, `dense_4h_to_h`), so target modules
are read from the model itself: it is built on PyTorch's meta device (no weights are read, no memory is used)
and its linear layers are listed. The result is cached beside the model, keyed by its config.json, so serving and
`task check` do not need to build it again.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tuneloop.errors import BaseModelError, TrainingError

CACHE_FILE = "tuneloop-modules.json"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# Parent-module names that mark a projection as part of attention (Llama `self_attn`, NeoX `attention`,
# Falcon `self_attention`, GPT-2 `attn`); the default LoRA targets are these, as the embedded recipe uses.
ATTENTION_PARENTS = ("self_attn", "attention", "self_attention", "attn")


@dataclass(frozen=True)
class ModelModules:
    """The LoRA-relevant facts of one base model."""

    architecture: str
    model_type: str
    linear: tuple[str, ...]  # leaf names of every linear projection in the decoder layers, in model order
    attention: tuple[str, ...]  # the subset inside attention blocks: the default LoRA targets
    has_chat_template: bool

    def check_targets(self, targets: list[str], *, where: str) -> None:
        """Raise TrainingError naming the model's real projections unless every target is one of them."""
        unknown = [t for t in targets if t not in self.linear]
        if not unknown:
            return
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, self.linear, n=1, cutoff=0.5)
            hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
        raise TrainingError(f"{where}: {', '.join(hints)} not in {self.architecture}; its projections are "
                            f"{', '.join(self.linear)} (attention: {', '.join(self.attention)})")


def model_modules(model_dir: Path) -> ModelModules:
    """The projections of the model in `model_dir`, from the cache beside it or by building it on meta."""
    config_file = model_dir / "config.json"
    try:
        config_text = config_file.read_text()
    except OSError as exc:
        raise BaseModelError(f"{model_dir} is not a Hugging Face model folder (no readable config.json: "
                             f"{exc})") from None
    key = hashlib.sha256(config_text.encode()).hexdigest()
    cache = model_dir / CACHE_FILE
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        record = json.loads(cache.read_text())
        if record["config_sha256"] == key:
            return ModelModules(architecture=str(record["architecture"]), model_type=str(record["model_type"]),
                                linear=tuple(record["linear"]), attention=tuple(record["attention"]),
                                has_chat_template=bool(record["has_chat_template"]))
    modules = _introspect(model_dir)
    with contextlib.suppress(OSError):
        cache.write_text(json.dumps({"config_sha256": key, **asdict(modules)}, indent=2))
    return modules


def resolve_targets(model_dir: Path, configured: list[str] | None, *, where: str) -> list[str]:
    """The LoRA targets a run uses: the configured ones, checked against the model, or its attention ones."""
    modules = model_modules(model_dir)
    if configured is None:
        if not modules.attention:
            raise TrainingError(f"{where}: {modules.architecture} has no projections inside an attention block "
                                f"that tuneloop recognises; set it explicitly from {', '.join(modules.linear)}")
        return list(modules.attention)
    modules.check_targets(configured, where=where)
    return list(configured)


def has_chat_template(model_dir: Path) -> bool:
    if any((model_dir / name).exists() for name in CHAT_TEMPLATE_FILES):
        return True
    try:
        tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(tokenizer_config.get("chat_template"))


def meta_model(model_dir: Path) -> Any:
    """The causal LM of `model_dir` built on the meta device: its module tree and shapes, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # arbitrary modelling code runs here; any failure means the folder is unusable
        raise BaseModelError(f"{model_dir}: transformers cannot build a causal LM from its config.json "
                             f"({exc})") from None


def linear_layers(model: Any) -> dict[str, tuple[int, int]]:
    """Module path -> (in_features, out_features) of every projection LoRA can adapt: nn.Linear, and GPT-2's
    Conv1D (a transposed linear layer, weight (in, out)); the vocabulary head is not one."""
    import torch

    output = model.get_output_embeddings()
    found: dict[str, tuple[int, int]] = {}
    for path, module in model.named_modules():
        if module is output:
            continue
        if isinstance(module, torch.nn.Linear):
            found[path] = (module.in_features, module.out_features)
        elif type(module).__name__ == "Conv1D":
            found[path] = (int(module.weight.shape[0]), int(module.weight.shape[1]))
    return found


def _introspect(model_dir: Path) -> ModelModules:
    model = meta_model(model_dir)
    linear: list[str] = []
    attention: list[str] = []
    for path in linear_layers(model):
        *parents, leaf = path.split(".")
        if leaf not in linear:
            linear.append(leaf)
        if parents and parents[-1] in ATTENTION_PARENTS and leaf not in attention:
            attention.append(leaf)
    architecture = (model.config.architectures or [type(model).__name__])[0]
    return ModelModules(architecture=architecture, model_type=str(model.config.model_type), linear=tuple(linear),
                        attention=tuple(attention), has_chat_template=has_chat_template(model_dir))
