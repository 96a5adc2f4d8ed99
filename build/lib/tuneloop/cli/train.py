"""`tuneloop train`: fine-tune a task and register the result as a new adapter version."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from tuneloop.cli.context import STATE
from tuneloop.cli.output import console, print_json
from tuneloop.config import TrainMethod


def train(
    task: Annotated[str, typer.Option("--task", "-t", help="Task to train (its train dataset and recipe).")],
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Stop after N optimizer steps.")] = None,
    method: Annotated[TrainMethod | None, typer.Option("--method",
                                                       help="lora (default), prompt-tuning or full.")] = None,
    rank: Annotated[int | None, typer.Option("--rank", help="LoRA rank (<= serving.max_lora_rank).")] = None,
    learning_rate: Annotated[float | None, typer.Option("--learning-rate", "--lr", help="Peak learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Examples per step.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed.")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Train on this dataset instead.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Fine-tune the base model on a task's training set (PEFT LoRA by default) and register the version."""
    from tuneloop.retrain.finetune import finetune

    overrides: dict[str, Any] = {k: v for k, v in {"rank": rank, "learning_rate": learning_rate,
                                                   "batch_size": batch_size, "seed": seed}.items() if v is not None}
    version = finetune(STATE.config, STATE.store, task, method=method, max_steps=max_steps,
                       overrides=overrides, dataset=dataset, progress=not quiet and not json_output)
    card = version.card
    if json_output:
        print_json({"ref": version.ref, "aliases": version.aliases, "path": str(version.path), "card": card})
        return
    first = card.curve[0].train_loss if card.curve else None
    console.print(f"registered [bold]{version.ref}[/bold] ({card.method}) {' '.join(version.aliases)}")
    console.print(f"steps {card.steps}, train loss {first} -> {card.curve[-1].train_loss if card.curve else None}, "
                  f"best val loss {card.best_val_loss}, {card.tokens_per_second:.0f} real tok/s, "
                  f"{card.trainable_params:,} trainable params")
