"""`tuneloop train`: fine-tune a task's adapter on its training set and register it as a new version.

The workflow is a plain typed function the CLI calls: resolve the recipe (config + overrides), load the
training dataset, carve a seeded validation split out of it (the held-out set stays untouched for evaluation),
fit, write the adapter card and register the version.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from tuneloop.basemodel import ensure_base_model
from tuneloop.challenger_sets.catalog import get_dataset
from tuneloop.challenger_sets.records import Example
from tuneloop.config import Config, TrainConfig, TrainMethod
from tuneloop.errors import TrainingError
from tuneloop.lora_files import lora_shape
from tuneloop.modelinfo import resolve_targets
from tuneloop.registry import AdapterCard, AdapterVersion, DatasetRef, find_alias, register_adapter
from tuneloop.retrain.trainer import FitResult, fit
from tuneloop.store import Store


def resolve_recipe(config: Config, task: str, *, method: TrainMethod | None = None,
                   overrides: dict[str, Any] | None = None, init_from: AdapterVersion | None = None) -> TrainConfig:
    """The task's TrainConfig with CLI overrides applied and checked against serving limits, before anything
    heavy happens (a bad --learning-rate is refused before the base model is converted or loaded).

    Continuing from a version (`init_from`) keeps that adapter's own rank, alpha and targets: PEFT loads its
    shapes from its adapter_config.json, whatever the task's recipe says. The targets are resolved against the
    base model by `with_targets`."""
    recipe = config.task(task).train
    updates: dict[str, Any] = dict(overrides or {})
    if method:
        updates["method"] = method
    if updates:
        try:
            recipe = TrainConfig.model_validate({**recipe.model_dump(), **updates})
        except Exception as exc:
            raise TrainingError(f"invalid training hyperparameters for task '{task}': {exc}") from None
    if init_from is not None:
        shape = lora_shape(init_from.path)
        recipe = recipe.model_copy(update={"rank": shape.rank, "alpha": shape.alpha,
                                           "target_modules": list(shape.target_modules)})
    if recipe.method == "lora" and recipe.rank > config.serving.max_lora_rank:
        raise TrainingError(f"LoRA rank {recipe.rank} exceeds serving.max_lora_rank "
                            f"{config.serving.max_lora_rank}; vLLM could not serve the adapter")
    return recipe


def with_targets(recipe: TrainConfig, task: str, base_path: Path) -> TrainConfig:
    """The recipe with its LoRA targets checked against the model (null = its attention projections), so the
    card records the names trained."""
    if recipe.method != "lora":
        return recipe
    targets = resolve_targets(base_path, recipe.target_modules, where=f"tasks.{task}.train.target_modules")
    return recipe.model_copy(update={"target_modules": targets})


def split_validation(examples: list[Example], size: int, seed: int) -> tuple[list[Example], list[Example]]:
    if len(examples) < 2:
        raise TrainingError(f"need at least 2 training examples, got {len(examples)}")
    size = min(size, max(1, len(examples) // 10))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    val = {i for i in order[:size]}
    return [e for i, e in enumerate(examples) if i not in val], [examples[i] for i in sorted(val)]


def finetune(config: Config, store: Store, task: str, *, method: TrainMethod | None = None,
             max_steps: int | None = None, overrides: dict[str, Any] | None = None,
             dataset: str | None = None, progress: bool = True,
             staging_prefix: str = ".training-", init_from: AdapterVersion | None = None) -> AdapterVersion:
    """Train and register a new version of `task`'s adapter; its parent is the current champion.

    Weights are written to a `staging_prefix*` folder beside the registry and moved in only when registered, so
    a killed run leaves no version behind (a retrain job's reaper removes its own staging folder).
    `init_from` continues training that version's LoRA weights instead of a fresh adapter (a control in
    bench retrain); its datasets are listed in the new card too.
    """
    task_config = config.task(task)
    if max_steps is not None and max_steps < 1:
        raise TrainingError(f"--max-steps must be at least 1, got {max_steps}")
    recipe = resolve_recipe(config, task, method=method, overrides=overrides, init_from=init_from)
    base = ensure_base_model(config)
    recipe = with_targets(recipe, task, base.path)
    train_set = get_dataset(store, dataset or task_config.train_dataset, task=task)
    examples = train_set.load()
    train_examples, val_examples = split_validation(examples, recipe.validation_examples, recipe.seed)
    if recipe.batch_size > len(train_examples):
        raise TrainingError(f"batch_size {recipe.batch_size} is larger than the {len(train_examples)} training "
                            f"examples of {train_set.manifest.ref}")
    parent = find_alias(store, task, "champion")
    staging_root = config.data_path / "adapters" / task
    staging_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix, dir=staging_root))
    try:
        result = fit(base.path, train_examples, val_examples, system_prompt=task_config.system_prompt,
                     train=recipe, output_dir=staging, max_steps=max_steps, progress=progress,
                     init_adapter=init_from.path if init_from else None)
        inherited = list(init_from.card.datasets) if init_from else []
        card = build_card(task, recipe, result, base_name=base.name, base_sha=base.sha256,
                          datasets=[*inherited, DatasetRef(ref=train_set.manifest.ref, kind="train",
                                                           sha256=train_set.manifest.sha256,
                                                           rows=train_set.manifest.rows)],
                          parent_version=parent.version if parent else None,
                          validation_examples=len(val_examples), max_steps=max_steps or recipe.max_steps)
        return register_adapter(store, config.data_path, staging, card)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_card(task: str, recipe: TrainConfig, result: FitResult, *, base_name: str, base_sha: str,
               datasets: list[DatasetRef], parent_version: int | None, validation_examples: int,
               max_steps: int) -> AdapterCard:
    hyper = recipe.model_dump()
    hyper.update(max_steps=max_steps, validation_examples_used=validation_examples)
    return AdapterCard(
        task=task, method=recipe.method, base_model={"name": base_name, "sha256": base_sha}, datasets=datasets,
        hyperparameters=hyper, curve=result.curve, steps=result.steps, stopped_early=result.stopped_early,
        best_val_loss=result.best_val_loss, trainable_params=result.trainable_params,
        total_params=result.total_params, train_tokens=result.train_tokens,
        tokens_per_second=round(result.tokens_per_second, 1), train_seconds=round(result.train_seconds, 2),
        parent_version=parent_version, git_commit=git_commit(), library_versions=library_versions(),
        device=result.device, precision=result.precision)


def git_commit() -> str | None:
    """The tuneloop checkout's commit, if it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, check=True,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def library_versions() -> dict[str, str]:
    versions = {}
    for name in ("torch", "transformers", "peft", "tuneloop"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
