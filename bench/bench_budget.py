"""What a training budget buys: held-out accuracy of the default recipe after 1, 2, 4, 7.5 and 15 minutes.

The default `sentiment` recipe (the embedded task's defaults: LoRA r=8 on q/k/v/o, batch 16, a validation split
carved from training with early stopping; learning rate and steps chosen on that validation split) is trained
once; snapshots of the adapter are taken when the loop's wall time (steps, validation passes and batching: what a
user pays for) crosses each budget, and each snapshot is scored on the whole held-out set by label likelihood.
Minute 0 is the base model zero-shot.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.setup import base_model_path, sentiment_sets
from bench.tables import Table, emit
from tuneloop.config import Config
from tuneloop.evaluators.label_likelihood import predict_labels
from tuneloop.evaluators.scoring import score_examples
from tuneloop.evaluators.statistics import table_interval
from tuneloop.retrain.finetune import split_validation
from tuneloop.retrain.trainer import StepInfo, fit, use_bf16

BUDGETS_MIN = (1, 2, 4, 7.5, 15)  # 7.5 wall minutes = 15 CPU-minutes on 2 threads: issue 25's budget


def run(*, quick: bool = False) -> list[Table]:
    budgets = (0.05, 0.1) if quick else BUDGETS_MIN
    task = Config().tasks["sentiment"]
    recipe = task.train.model_copy(update={"max_steps": 3} if quick else {})
    sets = sentiment_sets()
    train, validation = split_validation(sets["train"], recipe.validation_examples, recipe.seed)
    test = sets["heldout"][:40] if quick else sets["heldout"]
    base = base_model_path()
    snapshots: list[tuple[str, float, int, Path]] = []
    last: list[StepInfo] = []
    with tempfile.TemporaryDirectory() as tmp:
        pending = list(budgets)

        def snapshot(info: StepInfo) -> bool:
            last[:] = [info]
            while pending and info.elapsed_s >= pending[0] * 60:
                out = Path(tmp) / f"{pending.pop(0)}min"
                info.model.save_pretrained(out)
                snapshots.append(("", info.elapsed_s, info.step, out))
            return not pending

        result = fit(base, train, validation, system_prompt=task.system_prompt, train=recipe,
                     output_dir=Path(tmp) / "final", progress=not quick, on_step=snapshot)
        if pending and last:  # the recipe ended (max_steps or early stopping) before the largest budget
            snapshots.append((" (recipe ended; best weights)", last[0].elapsed_s, result.steps, Path(tmp) / "final"))
        rows = [_row(base, None, test, task, " (base model, zero-shot)", 0.0, 0)]
        rows += [_row(base, out, test, task, note, elapsed, step) for note, elapsed, step, out in snapshots]
    threads = torch.get_num_threads()
    return [emit(f"Held-out accuracy by training budget, default sentiment recipe (n={len(test)})",
                 ["wall minutes", f"CPU-minutes ({threads} threads)", "steps", "examples seen",
                  "accuracy [95 % CI]", "macro-F1 [95 % CI]"], rows, key="budget",
                 notes=f"LoRA r={recipe.rank} q/k/v/o, lr {recipe.learning_rate:g}, batch {recipe.batch_size}, "
                       f"max {recipe.max_steps} steps, validation every {recipe.eval_every} steps on "
                       f"{len(validation)} examples carved from training"
                       + (f"; the recipe stopped early after {result.steps} steps" if result.stopped_early else "")
                       + f". Precision: {'bf16 autocast' if use_bf16(recipe) else 'float32'}. Wall minutes count "
                         "the whole loop (steps, validation, batching); CPU-minutes = wall x threads. Target (issue "
                         "25): >= 0.83 accuracy within 15 CPU-minutes. Label-likelihood scoring.")]


def _row(base: Path, adapter: Path | None, test: list[Any], task: Any, note: str, elapsed_s: float,
         step: int) -> list[Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    predictions = predict_labels(model, AutoTokenizer.from_pretrained(base), test, system_prompt=task.system_prompt,
                                 labels=task.labels)
    tables = score_examples(["accuracy", "macro_f1"], predictions, [e.reference for e in test], task.labels)
    accuracy, _ = table_interval(tables["accuracy"])
    macro, _ = table_interval(tables["macro_f1"])
    minutes = elapsed_s / 60
    return [f"{minutes:.1f}{note}", f"{minutes * torch.get_num_threads():.1f}", step, step * task.train.batch_size,
            f"{accuracy.value:.3f} [{accuracy.low:.3f}, {accuracy.high:.3f}]",
            f"{macro.value:.3f} [{macro.low:.3f}, {macro.high:.3f}]"]
