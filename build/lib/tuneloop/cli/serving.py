"""`tuneloop serve | status | promote | rollback`."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer

from tuneloop.cli.context import STATE
from tuneloop.cli.output import console, print_json, print_table
from tuneloop.registry import Promotion

JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def serve() -> None:
    """Start vLLM with every task's champion (and candidate) and the gateway, in the foreground."""
    from tuneloop.conductor.process import serve as serve_process

    config = STATE.config
    console.print(f"starting vLLM on {config.serving.vllm_host}:{config.serving.vllm_port} and the gateway on "
                  f"http://{config.serving.gateway_host}:{config.serving.gateway_port} (Ctrl-C stops both)")
    serve_process(config, STATE.store)


def status(json_output: JsonOption = False) -> None:
    """Tasks, their champion and candidate versions, and the health of a running gateway/engine."""
    from tuneloop.monitor.status import monitor_status
    from tuneloop.retrain.status import retrain_status
    from tuneloop.serving.status import serving_status

    result = serving_status(STATE.config, STATE.store)
    monitor = monitor_status(STATE.store)
    retraining = retrain_status(STATE.config, STATE.store)
    if json_output:
        print_json({**result.model_dump(mode="json"), "monitor": monitor.model_dump(mode="json"),
                    "retrain": {task: s.model_dump(mode="json") for task, s in retraining.items()}})
        return
    print_table("tasks", ["task", "champion", "candidate", "canary", "shadow"],
                [[t.task, t.champion, t.candidate, t.canary_share, t.shadow] for t in result.tasks])
    console.print(f"gateway: {result.gateway['status']} (engine: {result.gateway.get('engine', 'unknown')})")
    holder = monitor.scheduler_holder or "none (no `tuneloop run` holds the lease)"
    print_table(f"scheduler: {holder}", ["job", "schedule", "next run", "last run", "last status", "error"],
                [[j.id, j.schedule, _when(j.next_run), _when(j.last_started), j.last_status, j.last_error]
                 for j in monitor.jobs])
    drift = ", ".join(f"{t}: {'DRIFT' if d.drifted else 'quiet'} (run {d.run_id}, {_when(d.at)})"
                      for t, d in monitor.drift.items())
    console.print(f"drift: {drift or 'no checks yet'}")
    print_table("open incidents", ["id", "task", "rule", "opened", "breaches", "message"],
                [[i.id, i.task, i.rule, _when(i.opened_at), i.breaches, i.message] for i in monitor.open_incidents])
    retrain = ", ".join(f"{t}: job {s.job} {s.state}" + (f" ({s.candidate})" if s.candidate else "")
                        + (f", watch {s.watch}" if s.watch else "") + (f" — {s.stale}" if s.stale else "")
                        for t, s in retraining.items())
    console.print(f"retraining: {retrain or 'no jobs yet'}", markup=False)
    if result.spilled_traffic_records:
        console.print(f"{result.spilled_traffic_records} captured records wait in the spill file for replay")


def _when(value: object) -> str:
    from datetime import datetime

    return value.strftime("%Y-%m-%d %H:%M:%S") if isinstance(value, datetime) else ""


def promote(
    version: Annotated[str, typer.Argument(help="task@N to make champion.")],
    json_output: JsonOption = False,
) -> None:
    """Make a version champion: hot-swapped into a running gateway, or flipped in the registry if none runs."""
    from tuneloop.serving.promotion import promote as run_promotion

    _print(run_promotion(STATE.config, STATE.store, version), json_output)


def rollback(
    task: Annotated[str, typer.Argument(help="Task whose last promotion to undo.")],
    json_output: JsonOption = False,
) -> None:
    """Make the previous champion of a task champion again."""
    from tuneloop.serving.promotion import rollback as run_rollback

    _print(run_rollback(STATE.config, STATE.store, task), json_output)


def _print(result: Promotion, json_output: bool) -> None:
    if json_output:
        print_json(asdict(result))
        return
    where = "" if result.through_gateway else " (no gateway running: registry only)"
    console.print(f"{result.task}: champion is now {result.champion} (was {result.previous}){where}")
