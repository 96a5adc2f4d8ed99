"""Reading and checking a PEFT LoRA folder: the adapter_config.json and the weights beside it.

Used for every folder that comes from outside a tuneloop training run (`adapters import`) and for the shape a
retrain continues from. Weights are read with `safetensors`, or `torch.load(weights_only=True)` for a legacy
`adapter_model.bin`, never unpickled otherwise: an adapter folder is untrusted input. The checks are the ones vLLM
would otherwise fail on much later, at load time inside the engine: a LoRA that is not plain LoRA (DoRA, extra
trained modules, biases), tensors that name modules the base model lacks or do not fit their shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.errors import AdapterError
from tuneloop.modelinfo import linear_layers, meta_model

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
LEGACY_FILE = "adapter_model.bin"
MAX_CONFIG_BYTES = 1_000_000
MAX_WEIGHTS_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class LoraShape:
    """The LoRA hyperparameters that decide whether and how an adapter can be loaded."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]  # leaf module names, from the weights
    base_model_name_or_path: str | None


def read_lora_config(folder: Path) -> dict[str, Any]:
    """adapter_config.json of `folder`, parsed and checked to be a plain LoRA vLLM can serve."""
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise AdapterError(f"{folder} is not a folder")
    if not path.is_file():
        raise AdapterError(f"{folder} holds no {CONFIG_FILE}: not a PEFT adapter folder")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterError(f"{path} is {path.stat().st_size:,} bytes; an adapter config is a few hundred")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path} is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{path} holds a JSON {type(raw).__name__}, not an object")
    problems = []
    if raw.get("peft_type") != "LORA":
        problems.append(f"peft_type is {raw.get('peft_type')!r}, not 'LORA'")
    rank = raw.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        problems.append(f"r is {rank!r}, not a positive integer")
    alpha = raw.get("lora_alpha", 8)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0:
        problems.append(f"lora_alpha is {alpha!r}, not a positive number")
    if raw.get("use_dora"):
        problems.append("use_dora is true (vLLM serves plain LoRA only)")
    if raw.get("modules_to_save"):
        problems.append(f"modules_to_save {raw['modules_to_save']} trains whole modules vLLM cannot load per adapter")
    if raw.get("bias", "none") != "none":
        problems.append(f"bias is {raw['bias']!r} (vLLM's LoRA has no bias terms)")
    for key in ("rank_pattern", "alpha_pattern"):
        if raw.get(key):
            problems.append(f"{key} gives modules their own shapes (vLLM needs one rank per adapter)")
    if problems:
        raise AdapterError(f"{path}: " + "; ".join(problems))
    return raw


def weights_file(folder: Path) -> Path:
    for name in (SAFETENSORS_FILE, LEGACY_FILE):
        path = folder / name
        if path.is_file():
            if path.stat().st_size > MAX_WEIGHTS_BYTES:
                raise AdapterError(f"{path} is {path.stat().st_size / 1024**3:.1f} GiB, above the "
                                   f"{MAX_WEIGHTS_BYTES // 1024**3} GiB an adapter may have")
            return path
    raise AdapterError(f"{folder} holds neither {SAFETENSORS_FILE} nor {LEGACY_FILE}")


def load_weights(path: Path) -> dict[str, Any]:
    """The tensors of an adapter weights file, read without executing anything it contains."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        import torch

        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch raise their own types for truncated or foreign files
        raise AdapterError(f"{path} cannot be read as adapter weights ({type(exc).__name__}: {exc})") from None
    if not isinstance(loaded, dict):
        raise AdapterError(f"{path} holds a {type(loaded).__name__}, not a dict of tensors")
    return dict(loaded)


def lora_shape(folder: Path, tensors: dict[str, Any] | None = None,
               config: dict[str, Any] | None = None) -> LoraShape:
    """Rank, alpha and targets of a LoRA folder, targets read from its weights (the truth PEFT loads)."""
    config = read_lora_config(folder) if config is None else config
    tensors = load_weights(weights_file(folder)) if tensors is None else tensors
    targets = _targets(tensors, folder)
    return LoraShape(rank=int(config["r"]), alpha=float(config.get("lora_alpha", 8)),
                     dropout=float(config.get("lora_dropout", 0.0)), target_modules=tuple(targets),
                     base_model_name_or_path=config.get("base_model_name_or_path"))


def check_fits_base(folder: Path, base_path: Path) -> LoraShape:
    """Every LoRA tensor in `folder` names a linear module of the base model and fits its shape."""
    config = read_lora_config(folder)  # the folder and its config first: their errors say more than the weights'
    tensors = load_weights(weights_file(folder))
    shape = lora_shape(folder, tensors, config)
    linear = base_linear_shapes(base_path)
    for key, tensor in tensors.items():
        module, part = _split_key(key, folder)
        if module not in linear:
            raise AdapterError(f"{folder}: tensor {key} adapts {module}, which the base model at {base_path} does "
                               "not have (an adapter of another base model?)")
        in_features, out_features = linear[module]
        expected = (shape.rank, in_features) if part == "lora_A" else (out_features, shape.rank)
        if tuple(tensor.shape) != expected:
            raise AdapterError(f"{folder}: tensor {key} has shape {tuple(tensor.shape)}, the base model's {module} "
                               f"needs {expected} at r={shape.rank} (an adapter of another base model?)")
    return shape


def base_linear_shapes(base_path: Path) -> dict[str, tuple[int, int]]:
    """Module path -> (in_features, out_features) of every linear layer of the base model, built on meta."""
    return linear_layers(meta_model(base_path))


def _targets(tensors: dict[str, Any], folder: Path) -> list[str]:
    if not tensors:
        raise AdapterError(f"{folder}: the weights file holds no tensors")
    targets: list[str] = []
    for key in tensors:
        module, _part = _split_key(key, folder)
        leaf = module.rsplit(".", 1)[-1]
        if leaf not in targets:
            targets.append(leaf)
    return targets


def _split_key(key: str, folder: Path) -> tuple[str, str]:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> ('model.layers.0.self_attn.q_proj',
    'lora_A'); anything else in a LoRA file (embeddings, biases, DoRA magnitudes) is refused."""
    parts = key.split(".")
    if len(parts) < 3 or parts[-1] != "weight" or parts[-2] not in ("lora_A", "lora_B"):
        raise AdapterError(f"{folder}: tensor {key!r} is not a LoRA A/B matrix (vLLM serves plain LoRA only)")
    module = ".".join(parts[:-2])
    if module.startswith("base_model.model."):
        module = module[len("base_model.model."):]
    return module, parts[-2]
