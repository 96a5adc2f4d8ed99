"""`adapters import`: a PEFT LoRA folder from elsewhere is registered only when every check passes; its weights are
never unpickled; the card says where it came from; a refused folder registers nothing."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tuneloop.adapter_import import import_adapter
from tuneloop.config import Config
from tuneloop.errors import AdapterError
from tuneloop.lora_files import base_linear_shapes, lora_shape
from tuneloop.registry import get_adapter, list_adapters, verify_adapter
from tuneloop.store import Store


def write_adapter(folder: Path, base: Path, *, rank: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj"),
                  config: dict[str, object] | None = None, legacy_bin: bool = False,
                  shapes: dict[str, tuple[int, int]] | None = None) -> Path:
    """A LoRA folder as PEFT saves one: adapter_config.json and A/B matrices under PEFT's key names."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = shapes or base_linear_shapes(base)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (n_in, n_out) in shapes.items():
        if module.rsplit(".", 1)[-1] in targets:
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, n_in, generator=generator)
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(n_out, rank, generator=generator)
    if legacy_bin:
        torch.save(tensors, folder / "adapter_model.bin")
    else:
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    values = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
              "target_modules": list(targets), "bias": "none", "task_type": "CAUSAL_LM",
              "base_model_name_or_path": "someone/SmolLM2-135M-Instruct"}
    values.update(config or {})
    (folder / "adapter_config.json").write_text(json.dumps(values))
    return folder


def test_a_peft_folder_is_imported_with_a_card_that_says_so(config_with_base: Config, store: Store,
                                                            base_model_dir: Path, tmp_path: Path) -> None:
    source = write_adapter(tmp_path / "from-elsewhere", base_model_dir)
    version = import_adapter(config_with_base, store, source, "sentiment")
    assert version.ref == "sentiment@1" and version.aliases == ["champion"], "a task's first LoRA is champion"
    card = version.card
    assert card.origin == "imported" and card.imported_from is not None
    assert card.imported_from.path == str(source.resolve())
    assert card.hyperparameters["rank"] == 4 and card.hyperparameters["target_modules"] == ["q_proj", "v_proj"]
    assert card.datasets == [] and card.device is None
    assert version.path != source and (source / "adapter_model.safetensors").exists(), "a copy, source untouched"
    verify_adapter(version)  # the registered copy matches the checksum the card holds
    second = import_adapter(config_with_base, store, source, "sentiment")
    assert second.ref == "sentiment@2" and second.aliases == [] and second.card.parent_version == 1


def test_a_legacy_bin_is_read_without_unpickling_and_stored_as_safetensors(config_with_base: Config, store: Store,
                                                                          base_model_dir: Path,
                                                                          tmp_path: Path) -> None:
    source = write_adapter(tmp_path / "legacy", base_model_dir, legacy_bin=True)
    version = import_adapter(config_with_base, store, source, "sentiment")
    assert sorted(p.name for p in version.path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                               "card.json"]
    assert version.card.imported_from is not None and version.card.imported_from.weights_file == "adapter_model.bin"
    assert lora_shape(version.path).target_modules == ("q_proj", "v_proj")


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("unpickled!",))


@pytest.mark.parametrize("case, expected", [
    ("not a folder", "is not a folder"),
    ("no config", "holds no adapter_config.json"),
    ("config not json", "not valid UTF-8 JSON"),
    ("prompt tuning", "peft_type is 'PROMPT_TUNING'"),
    ("dora", "use_dora is true"),
    ("extra modules", "modules_to_save"),
    ("no weights", "holds neither adapter_model.safetensors nor adapter_model.bin"),
    ("truncated weights", "cannot be read as adapter weights"),
    ("pickled code", "cannot be read as adapter weights"),
    ("another base model", "needs"),
    ("unknown module", "which the base model"),
    ("rank above serving", "above serving.max_lora_rank 8"),
    ("not lora tensors", "is not a LoRA A/B matrix"),
])
def test_a_bad_folder_is_refused_naming_why_and_registers_nothing(case: str, expected: str,
                                                                  config_with_base: Config, store: Store,
                                                                  base_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    if case == "not a folder":
        folder = tmp_path / "missing"
    elif case == "no config":
        folder.mkdir()
    elif case == "config not json":
        write_adapter(folder, base_model_dir)
        (folder / "adapter_config.json").write_bytes(b"\xff{")
    elif case == "prompt tuning":
        write_adapter(folder, base_model_dir, config={"peft_type": "PROMPT_TUNING"})
    elif case == "dora":
        write_adapter(folder, base_model_dir, config={"use_dora": True})
    elif case == "extra modules":
        write_adapter(folder, base_model_dir, config={"modules_to_save": ["lm_head"]})
    elif case == "no weights":
        write_adapter(folder, base_model_dir)
        (folder / "adapter_model.safetensors").unlink()
    elif case == "truncated weights":
        write_adapter(folder, base_model_dir)
        data = (folder / "adapter_model.safetensors").read_bytes()
        (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "pickled code":
        write_adapter(folder, base_model_dir)
        (folder / "adapter_model.safetensors").unlink()
        (folder / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Exploit()}))
    elif case == "another base model":
        shapes = {f"model.layers.{i}.self_attn.q_proj": (128, 128) for i in range(2)}
        write_adapter(folder, base_model_dir, targets=("q_proj",), shapes=shapes)
    elif case == "unknown module":
        write_adapter(folder, base_model_dir, targets=("q_proj",),
                      shapes={"model.layers.99.self_attn.q_proj": (576, 576)})
    elif case == "rank above serving":
        write_adapter(folder, base_model_dir, rank=16)
    elif case == "not lora tensors":
        write_adapter(folder, base_model_dir)
        save_file({"base_model.model.lm_head.weight": torch.zeros(2, 2)}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=expected.replace("(", r"\(")):
        import_adapter(config_with_base, store, folder, "sentiment")
    assert list_adapters(store, "sentiment") == []
    adapters_dir = config_with_base.data_path / "adapters" / "sentiment"
    assert not adapters_dir.exists() or list(adapters_dir.iterdir()) == [], "no staging folder left behind"


def test_an_unknown_task_is_refused_before_any_file_is_read(config_with_base: Config, store: Store,
                                                            tmp_path: Path) -> None:
    from tuneloop.errors import ConfigError

    with pytest.raises(ConfigError, match="no-such-task"):
        import_adapter(config_with_base, store, tmp_path / "missing", "no-such-task")
    with pytest.raises(AdapterError):
        get_adapter(store, "no-such-task@1")
