"""`tuneloop adapters import`: register a PEFT LoRA folder trained elsewhere as the next version of a task.

The folder is untrusted input, so nothing of it is registered until all of it checked out: a plain LoRA config,
weights read only by safetensors or `torch.load(weights_only=True)`, every tensor naming a linear module of the
served base model with the shape that module needs, a rank vLLM is started for. What is registered is a copy
(weights as safetensors, the config as it came), with a card that says it was imported and from where; from
then on it is served, evaluated, gated, watched and retrained from like any trained version.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tuneloop.basemodel import ensure_base_model
from tuneloop.checksums import file_sha256
from tuneloop.config import Config
from tuneloop.errors import AdapterError
from tuneloop.events import record_event
from tuneloop.lora_files import CONFIG_FILE, SAFETENSORS_FILE, LoraShape, check_fits_base, load_weights, weights_file
from tuneloop.registry import AdapterCard, AdapterVersion, ImportSource, find_alias, register_adapter
from tuneloop.store import Store


def import_adapter(config: Config, store: Store, folder: Path, task: str) -> AdapterVersion:
    """Check `folder` against the configured base model and register a copy as `task`'s next version (the
    first LoRA version of a task becomes its champion, as a trained one does)."""
    config.task(task)  # an unknown task is refused before any file is read
    folder = folder.expanduser().resolve()
    base = ensure_base_model(config)
    shape = check_fits_base(folder, base.path)
    if shape.rank > config.serving.max_lora_rank:
        raise AdapterError(f"{folder} has LoRA rank {shape.rank}, above serving.max_lora_rank "
                           f"{config.serving.max_lora_rank}; raise it (vLLM is started for that rank) to import it")
    source = weights_file(folder)
    staging_root = config.data_path / "adapters" / task
    staging_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=staging_root))
    try:
        _copy(folder, source, staging)
        parent = find_alias(store, task, "champion")
        card = AdapterCard(
            task=task, method="lora", base_model={"name": base.name, "sha256": base.sha256}, datasets=[],
            hyperparameters=_hyperparameters(shape), origin="imported",
            imported_from=ImportSource(path=str(folder), weights_file=source.name, weights_sha256=file_sha256(source)),
            parent_version=parent.version if parent else None)
        version = register_adapter(store, config.data_path, staging, card)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    record_event(store, "adapter_imported", f"{version.ref} imported from {folder}", task=task,
                 payload={"version": version.version, "from": str(folder), "rank": shape.rank,
                          "target_modules": list(shape.target_modules)})
    return version


def _copy(folder: Path, source: Path, staging: Path) -> None:
    """The config as it came; the weights as safetensors (a legacy .bin is converted, never kept)."""
    shutil.copyfile(folder / CONFIG_FILE, staging / CONFIG_FILE)
    if source.name == SAFETENSORS_FILE:
        shutil.copyfile(source, staging / SAFETENSORS_FILE)
        return
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in load_weights(source).items()}
    save_file(tensors, str(staging / SAFETENSORS_FILE), metadata={"format": "pt"})


def _hyperparameters(shape: LoraShape) -> dict[str, object]:
    """What serving and retraining read from a card (rank, alpha, targets), from the adapter itself."""
    return {"method": "lora", "rank": shape.rank, "alpha": shape.alpha, "dropout": shape.dropout,
            "target_modules": list(shape.target_modules),
            "base_model_name_or_path": shape.base_model_name_or_path}

