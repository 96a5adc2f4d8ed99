"""`tuneloop adapters`: list, inspect and import adapter versions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tuneloop.cli.context import STATE
from tuneloop.cli.output import console, print_json, print_table

app = typer.Typer(no_args_is_help=True, help="Registered adapter versions, their cards and aliases.")


@app.command("import")
def import_(
    folder: Annotated[Path, typer.Argument(help="A PEFT LoRA folder (adapter_config.json + adapter_model."
                                           "safetensors or .bin) trained on the configured base model.")],
    task: Annotated[str, typer.Option("--task", "-t", help="Task the adapter serves.")],
    champion: Annotated[bool, typer.Option("--champion", help="Make it champion once registered (through a "
                                           "running gateway's admin API, else in the registry).")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Register an adapter trained elsewhere as the task's next version, after the checks every served adapter
    gets (plain LoRA, base model shapes, rank, weights read without unpickling). Nothing is registered on error."""
    from tuneloop.adapter_import import import_adapter

    version = import_adapter(STATE.config, STATE.store, folder, task)
    promoted = None
    if champion and "champion" not in version.aliases:
        from tuneloop.serving.promotion import promote

        promoted = promote(STATE.config, STATE.store, version.ref)
    aliases = ["champion"] if promoted else version.aliases
    if json_output:
        print_json({"ref": version.ref, "aliases": aliases, "path": str(version.path), "card": version.card,
                    "promoted_through_gateway": promoted.through_gateway if promoted else None})
        return
    hyper = version.card.hyperparameters
    console.print(f"imported {version.ref} from {folder}: LoRA r={hyper['rank']} on "
                  f"{', '.join(hyper['target_modules'])}" + (f"; {', '.join(aliases)}" if aliases else ""))


@app.command("list")
def list_(
    task: Annotated[str | None, typer.Option("--task", "-t", help="Only this task.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """List adapter versions with their aliases (champion, candidate)."""
    from tuneloop.registry import list_adapters

    versions = list_adapters(STATE.store, task)
    if json_output:
        print_json([{"ref": v.ref, "task": v.task, "version": v.version, "method": v.method, "origin": v.card.origin,
                     "aliases": v.aliases, "path": str(v.path), "parent_version": v.parent_version,
                     "created_at": v.created_at, "steps": v.card.steps, "best_val_loss": v.card.best_val_loss,
                     "rank": v.card.lora_rank} for v in versions])
        return
    print_table("adapters", ["version", "method", "aliases", "rank", "steps", "val loss", "parent", "created"],
                [[v.ref, v.method, ",".join(v.aliases), v.card.lora_rank, v.card.steps, v.card.best_val_loss,
                  v.parent_version, v.created_at.strftime("%Y-%m-%d %H:%M")] for v in versions])


@app.command("show")
def show(
    ref: Annotated[str, typer.Argument(help="task@N or task@champion / task@candidate.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Show an adapter version's card: base model, datasets, hyperparameters, training curve, lineage."""
    from tuneloop.registry import get_adapter

    version = get_adapter(STATE.store, ref)
    if json_output:
        print_json({"ref": version.ref, "aliases": version.aliases, "path": str(version.path),
                    "card": version.card})
        return
    card = version.card
    console.print(f"[bold]{version.ref}[/bold] {card.method} {' '.join(version.aliases)}\npath {version.path}")
    if card.imported_from is not None:
        console.print(f"imported from {card.imported_from.path} ({card.imported_from.weights_file}, sha256 "
                      f"{card.imported_from.weights_sha256[:12]})", markup=False)
    if card.device:
        console.print(f"trained on {card.device} in {card.precision}")
    console.print(f"base model {card.base_model['name']} sha256 {card.base_model['sha256'][:12]}")
    for ds in card.datasets:
        console.print(f"dataset {ds.ref} ({ds.kind}, {ds.rows} rows, sha256 {ds.sha256[:12]})")
    if card.origin == "trained":  # an imported adapter's training happened elsewhere: nothing to report here
        console.print(f"params trainable {card.trainable_params:,} of {card.total_params:,} "
                      f"({100 * card.trainable_params / max(card.total_params, 1):.2f} %)")
        console.print(f"steps {card.steps} (early stop: {card.stopped_early}), best val loss {card.best_val_loss}, "
                      f"{card.tokens_per_second:.0f} tok/s, parent {card.parent_version}, git {card.git_commit}")
    else:
        console.print(f"parent {card.parent_version} (the champion when it was imported)")
    console.print("hyperparameters " + ", ".join(f"{k}={v}" for k, v in card.hyperparameters.items()))
    evals = [p for p in card.curve if p.val_loss is not None]
    if evals:
        print_table("validation curve", ["step", "train loss", "val loss"],
                    [[p.step, p.train_loss, p.val_loss] for p in evals])
