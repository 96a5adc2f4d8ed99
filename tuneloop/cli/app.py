"""Root of the command tree: global options, `init` and `config`; the groups live in sibling modules."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tuneloop.cli import adapters as adapters_cli
from tuneloop.cli import datasets as datasets_cli
from tuneloop.cli import demo as demo_cli
from tuneloop.cli import estimate as estimate_cli
from tuneloop.cli import evaluate as evaluate_cli
from tuneloop.cli import keys as keys_cli
from tuneloop.cli import monitor as monitor_cli
from tuneloop.cli import ops as ops_cli
from tuneloop.cli import retrain as retrain_cli
from tuneloop.cli import serving as serving_cli
from tuneloop.cli import task as task_cli
from tuneloop.cli import train as train_cli
from tuneloop.cli.context import STATE, configure_logging
from tuneloop.cli.output import console, print_json
from tuneloop.config import CONFIG_FILENAME, find_config_path, load_config, render_default_config
from tuneloop.errors import ConfigError

app = typer.Typer(
    name="tuneloop", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Keep fine-tuned LoRA adapters good after they ship: train, serve, evaluate, detect drift, retrain.")
config_app = typer.Typer(no_args_is_help=True, help="Check and show the configuration.")
app.add_typer(config_app, name="config")
app.add_typer(datasets_cli.app, name="datasets")
app.add_typer(adapters_cli.app, name="adapters")
app.add_typer(task_cli.app, name="task")
app.add_typer(keys_cli.app, name="keys")
app.command("train")(train_cli.train)
app.command("demo")(demo_cli.demo)
app.command("serve")(serving_cli.serve)
app.command("status")(serving_cli.status)
app.command("promote")(serving_cli.promote)
app.command("rollback")(serving_cli.rollback)
app.command("eval")(evaluate_cli.evaluate)
app.command("compare")(evaluate_cli.compare)
app.add_typer(evaluate_cli.feedback_app, name="feedback")
app.command("drift")(monitor_cli.drift)
app.command("run")(monitor_cli.run)
app.command("exporter")(monitor_cli.exporter)
app.command("incidents")(monitor_cli.incidents)
app.command("estimate")(estimate_cli.estimate)
app.command("retrain")(retrain_cli.retrain)
app.add_typer(retrain_cli.jobs_app, name="jobs")
app.add_typer(ops_cli.app, name="ops")


@app.callback()
def root(
    config: Annotated[Path | None, typer.Option("--config", "-c", help=f"Config file (default: ./{CONFIG_FILENAME} "
                                                "or $TUNELOOP_CONFIG).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    STATE.config_path = config
    STATE.verbose = verbose
    configure_logging(verbose)


@app.command()
def init(
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing config file.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Write a commented default tuneloop.yaml and prepare the data dir, database and embedded datasets."""
    path = find_config_path(STATE.config_path)
    if path.exists() and not force:
        load_config(path)
        written = False
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_default_config(), encoding="utf-8")
        written = True
    STATE.config_path = path
    config = STATE.config
    config.data_path.mkdir(parents=True, exist_ok=True)
    credential = config.ensure_local_credential()
    from tuneloop.challenger_sets.catalog import list_datasets

    datasets = [d.manifest.ref for d in list_datasets(STATE.store)]
    result = {"config": str(path), "written": written, "data_dir": str(config.data_path),
              "database": STATE.store.safe_url, "datasets": datasets,
              "admin_credential": str(config.local_credential_path) if config.local_credential_path.exists() else None}
    if json_output:
        print_json(result)
        return
    console.print(f"{'wrote' if written else 'kept existing'} {path}")
    console.print(f"data dir  {config.data_path}\ndatabase  {STATE.store.safe_url}")
    console.print(f"datasets  {', '.join(datasets)}")
    if credential is not None:
        console.print(f"admin credential  {credential} (owner-only; the local CLI and gateway read it)")
    console.print("next: tuneloop train --task sentiment --max-steps 20")


@config_app.command("validate")
def config_validate(
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Validate the config file and report every problem with its key path."""
    path = find_config_path(STATE.config_path)
    try:
        config = load_config(path, required=True)
    except ConfigError as exc:
        if json_output:
            print_json({"config": str(path), "valid": False, "problems": exc.problems or [str(exc)]})
            raise typer.Exit(exc.exit_code) from None
        raise
    if json_output:
        print_json({"config": str(path), "valid": True, "tasks": sorted(config.tasks),
                    "data_dir": str(config.data_path)})
        return
    console.print(f"{path}: valid ({len(config.tasks)} tasks: {', '.join(sorted(config.tasks))}; "
                  f"data dir {config.data_path})")


@config_app.command("show")
def config_show(
    json_output: Annotated[bool, typer.Option("--json", help="Print it as JSON instead of YAML.")] = False,
) -> None:
    """Print the resolved configuration (defaults filled in; the admin token is never printed)."""
    import yaml

    resolved = STATE.config.model_dump(mode="json")
    if resolved["serving"].get("admin_token"):
        resolved["serving"]["admin_token"] = "(set)"
    if resolved.get("database_url"):
        from sqlalchemy.engine import make_url

        resolved["database_url"] = make_url(resolved["database_url"]).render_as_string(hide_password=True)
    if json_output:
        print_json(resolved)
        return
    print(yaml.safe_dump(resolved, sort_keys=False), end="")
