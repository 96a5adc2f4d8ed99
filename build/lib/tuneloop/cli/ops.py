"""`tuneloop ops`: generate the ops pack (dashboards, rules, promtool tests, Grafana alerting, docs) from code."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tuneloop.cli.output import console, print_json

app = typer.Typer(no_args_is_help=True, help="Grafana dashboards, Prometheus rules and alert provisioning.")

RootOption = Annotated[Path, typer.Option("--root", help="Repository root: files go to <root>/grafana and "
                                          "<root>/docs.")]
RunbookOption = Annotated[str, typer.Option("--runbook-base", help="Prefix of each alert's runbook_url (your "
                                            "wiki's copy of docs/runbooks.md).")]


@app.command()
def build(root: RootOption = Path("."), runbook_base: RunbookOption = "docs/runbooks.md",
          json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False) -> None:
    """Write the generated files; files whose content is already current are left alone."""
    from tuneloop.monitor.ops.files import write

    written = write(root, runbook_base)
    if json_output:
        print_json({"written": [str(p) for p in written]})
        return
    for path in written:
        console.print(f"wrote {path}")
    console.print(f"{len(written)} file(s) changed" if written else "everything is current")


@app.command()
def check(root: RootOption = Path("."), runbook_base: RunbookOption = "docs/runbooks.md",
          json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False) -> None:
    """Exit 1 when a committed file differs from what the code generates (run `tuneloop ops build`)."""
    from tuneloop.monitor.ops.files import StaleOpsFiles, differences

    found = differences(root, runbook_base)
    if json_output:
        print_json({"current": not found, "differences": [{"path": str(d.path), "reason": d.reason} for d in found]})
        if found:
            raise typer.Exit(1)
        return
    if found:
        raise StaleOpsFiles("generated ops files are out of date (run `tuneloop ops build`):\n"
                            + "\n".join(f"  {d.path}: {d.reason}" for d in found))
    console.print("ops files are current")
