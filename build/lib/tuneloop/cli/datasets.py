"""`tuneloop datasets`: import, list and show versioned datasets."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from tuneloop.cli.context import STATE
from tuneloop.cli.output import console, print_json, print_table


class DatasetKindChoice(StrEnum):
    train = "train"
    heldout = "heldout"
    challenger = "challenger"


app = typer.Typer(no_args_is_help=True, help="Versioned train, held-out and challenger datasets.")


@app.command("add")
def add(
    file: Annotated[Path, typer.Argument(help="JSONL (id, messages|input, reference, meta) or CSV (input, "
                                          "reference, optional id, other columns -> meta).")],
    task: Annotated[str, typer.Option("--task", "-t", help="Task the data belongs to.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Dataset name (stored as task/name).")],
    kind: Annotated[DatasetKindChoice, typer.Option("--kind", "-k", help="train, heldout or challenger.")] = \
        DatasetKindChoice.challenger,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Validate a file whole and register it as the next version of task/name (nothing is imported on error)."""
    from tuneloop.challenger_sets.catalog import import_dataset_file

    version = import_dataset_file(STATE.store, STATE.config.data_path, file, task=task,
                                  task_config=STATE.config.task(task), name=name, kind=kind.value)
    if json_output:
        print_json(version.manifest)
        return
    m = version.manifest
    console.print(f"added {m.ref}: {m.rows} {m.kind} rows, sha256 {m.sha256[:12]}")


@app.command("list")
def list_(
    task: Annotated[str | None, typer.Option("--task", "-t", help="Only this task.")] = None,
    all_versions: Annotated[bool, typer.Option("--all-versions", help="Every version, not only the latest.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """List datasets (latest version of each unless --all-versions)."""
    from tuneloop.challenger_sets.catalog import list_datasets

    versions = list_datasets(STATE.store, task=task, latest_only=not all_versions)
    if json_output:
        print_json([v.manifest for v in versions])
        return
    print_table("datasets", ["name", "version", "kind", "rows", "sha256", "source", "created"],
                [[v.manifest.name, v.manifest.version, v.manifest.kind, v.manifest.rows, v.manifest.sha256[:12],
                  v.manifest.source[:48], v.manifest.created_at.strftime("%Y-%m-%d %H:%M")] for v in versions])


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="task/name, or task/name@version.")],
    task: Annotated[str | None, typer.Option("--task", "-t", help="Task, if NAME has no task/ prefix.")] = None,
    head: Annotated[int, typer.Option("--head", help="Example rows to print.")] = 3,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Show a dataset version's manifest and its first rows."""
    from tuneloop.challenger_sets.catalog import get_dataset

    version = get_dataset(STATE.store, name, task=task)
    examples = version.load()[:head] if head > 0 else []
    if json_output:
        print_json({"manifest": version.manifest, "path": str(version.path), "head": examples})
        return
    m = version.manifest
    console.print(f"[bold]{m.ref}[/bold]  kind={m.kind} rows={m.rows} sha256={m.sha256}\n"
                  f"source={m.source}\ncreated={m.created_at.isoformat()}\nfile={version.path}")
    for key, value in m.build.items():
        console.print(f"  {key}: {value}")
    for example in examples:
        console.print(f"- {example.id}: {example.last_user_text()[:100]!r} -> {example.reference[:60]!r}")


@app.command("from-traffic")
def from_traffic(
    task: Annotated[str, typer.Option("--task", "-t", help="Task whose labelled traffic to use.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Challenger set name (stored as task/name).")],
    since: Annotated[str, typer.Option("--since", help="Start of the window: ISO date/time, or an age like 7d, "
                                       "12h, 30m.")] = "30d",
    until: Annotated[str | None, typer.Option("--until", help="End of the window (default: now).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Turn captured requests that got feedback into a new challenger set version (deduplicated, no training
    inputs)."""
    from tuneloop.challenger_sets.from_traffic import build_from_traffic
    from tuneloop.timewindow import parse_instant

    result = build_from_traffic(STATE.config, STATE.store, task, name=name, since=parse_instant(since, "--since"),
                                until=parse_instant(until, "--until") if until else None)
    m = result.dataset.manifest
    if json_output:
        print_json({"manifest": m, "labelled": result.labelled, "duplicates": result.duplicates,
                    "leaked": result.leaked})
        return
    console.print(f"added {m.ref}: {m.rows} challenger rows from {result.labelled} labelled requests "
                  f"({result.duplicates} duplicates, {result.leaked} also in training data, dropped)")
