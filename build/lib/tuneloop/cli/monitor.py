"""`tuneloop drift | run | exporter | incidents`."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from tuneloop.cli.context import STATE
from tuneloop.cli.output import console, print_json, print_table
from tuneloop.config import parse_interval
from tuneloop.errors import ConfigError

JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def drift(
    task: Annotated[str, typer.Option("--task", "-t", help="Task whose captured traffic to check.")],
    window: Annotated[int | None, typer.Option("--window", "-w", min=5, help="The last N captured user prompts "
                                               "(default: monitor.window).")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Instead of --window: prompts captured in the last "
                                              "30m / 6h / 1d.")] = None,
    no_report: Annotated[bool, typer.Option("--no-report", help="Skip the Evidently HTML report.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Check a task's captured traffic for drift against its training inputs (calibrated thresholds), then run the
    policy on it as after a scheduled check: this stores the check, and a new incident can start a retraining
    job (as `tuneloop run` would)."""
    from tuneloop.conductor.process import assemble_loop

    if window is not None and since is not None:
        raise ConfigError("give --window or --since, not both")
    if window is not None and window < STATE.config.monitor.min_window:
        raise ConfigError(f"--window {window} is below monitor.min_window {STATE.config.monitor.min_window}: a "
                          "window that small gets no verdict; give a larger --window or lower monitor.min_window")
    start = None
    if since is not None:
        try:
            start = datetime.now(UTC) - timedelta(seconds=parse_interval(since))
        except ValueError as exc:
            raise ConfigError(f"--since: {exc}") from None
    report, _ = assemble_loop(STATE.config, STATE.store).check_drift(
        task, window=window, since=start, html=False if no_report else None, progress=not json_output)
    if json_output:
        print_json(report.to_json())
        return
    verdict = "[red]DRIFT[/red]" if report.drifted else "[green]no drift[/green]"
    console.print(f"{task}: {verdict} — {report.n_current} captured prompts vs {report.n_reference} training "
                  f"inputs of {report.reference}; false-alarm budget {report.false_alarm_rate:.0%} "
                  f"({report.alpha_per_view:.2%} per view), measured {_pct(report.measured_false_alarm_rate)} on "
                  "no-drift windows")
    rows = []
    for v in report.views:
        cal = v.calibration or {}
        rows.append([v.view, _num(v.score), _num(v.threshold), "yes" if v.drifted else "no", v.n,
                     _pct(cal.get("false_alarm_rate")), cal.get("n_windows", ""),
                     v.method if v.status == "ok" else v.detail.get("reason", v.status)])
    print_table(f"drift run {report.run_id}", ["view", "score", "threshold", "drifted", "n", "false alarms",
                                               "windows", "method"], rows)
    if report.report_path:
        console.print(f"report: GET /reports/{report.report_path} on the gateway (admin token), file "
                      f"{STATE.config.data_path / 'reports' / report.report_path}")


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def run() -> None:
    """Serve (vLLM + gateway) and run the scheduler: scheduled evals, drift checks, policy; Ctrl-C stops all."""
    from tuneloop.conductor.process import serve

    config = STATE.config
    console.print(f"tuneloop run: gateway http://{config.serving.gateway_host}:{config.serving.gateway_port} "
                  "(/v1, /metrics, /reports), scheduler with "
                  f"{sum(bool(t.schedule.eval) + bool(t.schedule.drift) for t in config.tasks.values())} jobs; "
                  "Ctrl-C stops everything")
    serve(config, STATE.store, schedule=True)


def exporter(
    port: Annotated[int | None, typer.Option("--port", help="Port (default: monitor.exporter_port).")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Bind address (default: monitor.exporter_host).")] = None,
) -> None:
    """Serve the monitor's Prometheus metrics from the store alone, for a Prometheus that cannot reach the gateway."""
    from prometheus_client import start_http_server

    from tuneloop.conductor.process import exporter_registry

    config = STATE.config
    registry = exporter_registry(config, STATE.store)
    bind_host, bind_port = host or config.monitor.exporter_host, port or config.monitor.exporter_port
    server, thread = start_http_server(bind_port, addr=bind_host, registry=registry)
    console.print(f"exporter on http://{bind_host}:{bind_port}/metrics (Ctrl-C stops)")
    try:
        while thread.is_alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()


def incidents(
    task: Annotated[str | None, typer.Option("--task", "-t", help="Only this task.")] = None,
    show_all: Annotated[bool, typer.Option("--all", help="Resolved ones too.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Incidents opened by the policy (open ones by default)."""
    from dataclasses import asdict

    from tuneloop.monitor.incidents import IncidentStore

    found = IncidentStore(STATE.store).list(task=task, status=None if show_all else "open")
    if json_output:
        print_json([{**asdict(i), "rule": str(i.rule)} for i in found])
        return
    print_table("incidents", ["id", "task", "rule", "status", "opened", "breaches", "message"],
                [[i.id, i.task, str(i.rule), i.status, i.opened_at.strftime("%Y-%m-%d %H:%M"), i.breaches,
                  i.message] for i in found])
