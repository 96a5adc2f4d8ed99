"""`tuneloop task`: what a configured task still needs before it can be trained, served and judged."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer

from tuneloop.cli.context import STATE
from tuneloop.cli.output import print_json, print_table

app = typer.Typer(no_args_is_help=True, help="Check a task of your own before anything runs.")


@app.command("check")
def check(
    name: Annotated[str, typer.Argument(help="Task name (a key under tasks: in tuneloop.yaml).")],
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Check the task's datasets (registered, overlap with training, labels), its base model (LoRA targets
    against the model's real module names, chat template, system prompt kept) and its champion. Changes nothing;
    exits 1 when there is a problem."""
    from tuneloop.challenger_sets.readiness import check_task

    findings = check_task(STATE.config, STATE.store, name)
    problems = [f for f in findings if f.verdict == "problem"]
    if json_output:
        print_json({"task": name, "ready": not problems, "findings": [asdict(f) for f in findings]})
    else:
        print_table(f"task {name}: " + ("ready" if not problems else f"{len(problems)} problem(s)"),
                    ["check", "verdict", "detail"], [[f.check, f.verdict, f.detail] for f in findings])
    if problems:
        raise typer.Exit(1)
