"""`tuneloop retrain` and `tuneloop jobs list|show|watch`."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from tuneloop.cli.context import STATE
from tuneloop.cli.output import console, print_json, print_table

JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
jobs_app = typer.Typer(no_args_is_help=True, help="Retraining jobs: their state, stages, gate decision and watch.")


def retrain(
    task: Annotated[str, typer.Option("--task", "-t", help="Task to retrain.")],
    reason: Annotated[str | None, typer.Option("--reason", help="Why (recorded with the job).")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the job until it finishes.")] = True,
    json_output: JsonOption = False,
) -> None:
    """Start retraining a task (or join its running job): assemble data, train, gate, promote or reject."""
    from tuneloop.retrain.jobs import JobStore
    from tuneloop.retrain.triggers import manual_trigger, request_retrain

    outcome = request_retrain(STATE.config, STATE.store, task, manual_trigger(reason, now=datetime.now(UTC)))
    job = outcome.job
    if not json_output:
        verb = "queued" if outcome.created else "joined running"
        console.print(f"{verb} job {job.id} for {task}; log: {job.log_path or 'starting'}")
    if wait:
        job = follow(job.id, quiet=json_output)
    if json_output:
        print_json(job_json(JobStore(STATE.store).get(job.id)))
        return
    show_job(job.id)
    if job.state == "failed":
        raise typer.Exit(1)


def follow(job_id: int, *, quiet: bool = False, poll_s: float = 2.0) -> Any:
    """Poll until the job leaves its active states, printing each state and stage once."""
    from tuneloop.retrain.triggers import reap_stale_jobs

    shown: set[str] = set()
    while True:
        job = reap_stale_jobs(STATE.config, STATE.store).get(job_id)
        for key, text in [(f"state:{job.state}", f"job {job.id}: {job.state}"),
                          *[(f"stage:{name}:{s.get('status')}", f"job {job.id}:   {name} {s.get('status')}"
                             + (f" in {s['seconds']:.0f} s" if "seconds" in s else ""))
                            for name, s in job.stages.items()]]:
            if key not in shown:
                shown.add(key)
                if not quiet:
                    console.print(text)
        if not job.active:
            return job
        time.sleep(poll_s)


def job_json(job: Any) -> dict[str, Any]:
    return job.model_dump(mode="json")


@jobs_app.command("list")
def list_jobs(
    task: Annotated[str | None, typer.Option("--task", "-t", help="Only this task.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Most recent N.")] = 20,
    json_output: JsonOption = False,
) -> None:
    """Retraining jobs, newest first."""
    from tuneloop.retrain.triggers import reap_stale_jobs

    found = reap_stale_jobs(STATE.config, STATE.store).recent(task=task, limit=limit)
    if json_output:
        print_json({"jobs": [job_json(j) for j in found]})
        return
    print_table("retraining jobs", ["id", "task", "state", "created", "triggers", "candidate", "decision", "took"],
                [[j.id, j.task, j.state, j.created_at.strftime("%Y-%m-%d %H:%M"),
                  ", ".join(t.source for t in j.triggers), f"{j.task}@{j.candidate_version}" if j.candidate_version
                  else "", _decision_summary(j), _took(j)] for j in found])


@jobs_app.command("show")
def show(
    job_id: Annotated[int, typer.Argument(help="Job id (see `tuneloop jobs list`).")],
    json_output: JsonOption = False,
) -> None:
    """One job: triggers, stage timings, the gate's table with every number behind the decision, the watch."""
    from tuneloop.retrain.jobs import JobStore

    if json_output:
        print_json(job_json(JobStore(STATE.store).get(job_id)))
        return
    show_job(job_id)


def show_job(job_id: int) -> None:
    from tuneloop.retrain.jobs import JobStore

    job = JobStore(STATE.store).get(job_id)
    console.print(f"job {job.id}: task {job.task}, state [bold]{job.state}[/bold], runner {job.runner}"
                  + (f", pid {job.pid}" if job.pid else "") + (f", log {job.log_path}" if job.log_path else ""))
    if job.error:
        console.print(f"error: {job.error}", markup=False)
    print_table("triggers", ["source", "reason", "at"],
                [[t.source, t.reason, t.created_at.strftime("%H:%M:%S")] for t in job.triggers])
    if job.stages:
        print_table("stages", ["stage", "status", "seconds"],
                    [[name, s.get("status"), s.get("seconds", "")] for name, s in job.stages.items()])
    if job.dataset_ref:
        console.print(f"training set {job.dataset_ref}; candidate "
                      f"{f'{job.task}@{job.candidate_version}' if job.candidate_version else '-'}; champion at start "
                      f"{job.task}@{job.champion_version}")
    if job.decision:
        print_gate(job.decision)
    if job.watch:
        console.print(f"watch: {job.watch.get('status')} until {job.watch.get('until', '')}"
                      + (f"; {job.watch['reason']}" if job.watch.get("reason") else ""), markup=False)


def print_gate(decision: dict[str, Any]) -> None:
    verdict = "PROMOTE" if decision["promote"] else "REJECT"
    rows = []
    for c in decision["checks"]:
        rows.append([c["dataset"], c["role"], c["n"], _f(c.get("champion")), _f(c.get("candidate")),
                     f"{_s(c.get('delta'))} [{_s(c.get('ci_low'))}, {_s(c.get('ci_high'))}]"
                     if c.get("delta") is not None else "", _f(c.get("p_value")), _f(c.get("mde")),
                     "pass" if c["passed"] else "FAIL", c["reason"]])
    print_table(f"gate: {verdict} {decision.get('candidate') or ''} vs {decision['champion']} on "
                f"{decision['metric']} ({decision['level']:.0%} level, margin {decision['margin']})"
                + (" — refused before training" if decision.get("preflight") else ""),
                ["set", "role", "n", "champion", "candidate", "delta [CI]", "p-value", "MDE", "verdict", "why"], rows)


def _f(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _s(value: float | None) -> str:
    return "" if value is None else f"{value:+.4f}"


def _decision_summary(job: Any) -> str:
    if not job.decision:
        return ""
    return "promote" if job.decision.get("promote") else "reject: " + "; ".join(job.decision.get("reasons", []))[:80]


def _took(job: Any) -> str:
    seconds = sum(float(s.get("seconds", 0)) for s in job.stages.values())
    return f"{seconds:.0f} s" if seconds else ""
