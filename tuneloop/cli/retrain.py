"""`tuneloop retrain` and `tuneloop jobs list|show|follow|reap`.

`list`, `show` and `follow` only read: a job whose worker is gone is shown with the reason, and failed by the
scheduler's reaper (`tuneloop run`) or by `tuneloop jobs reap`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tuneloop.cli.context import STATE
from tuneloop.cli.output import console, print_json, print_table
from tuneloop.errors import TuneloopError

if TYPE_CHECKING:
    from tuneloop.retrain.records import GateCheck, GateDecision, Job

JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
jobs_app = typer.Typer(no_args_is_help=True, help="Retraining jobs: their state, stages, gate decision and watch.")


class JobEnded(TuneloopError):
    """A cancel for a job that has already ended."""

    exit_code = 1


class WorkerGone(TuneloopError):
    """A followed job's worker died; the job stays unfinished until the reaper fails it."""

    exit_code = 1


def retrain(
    task: Annotated[str, typer.Option("--task", "-t", help="Task to retrain.")],
    reason: Annotated[str | None, typer.Option("--reason", help="Why (recorded with the job).")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the job until it finishes.")] = True,
    json_output: JsonOption = False,
) -> None:
    """Start retraining a task (or join its running job): assemble data, train, gate, promote or reject."""
    from tuneloop.conductor.process import assemble_loop
    from tuneloop.retrain.jobs import JobStore
    from tuneloop.retrain.triggers import manual_trigger

    outcome = assemble_loop(STATE.config, STATE.store).request_retrain(
        task, manual_trigger(reason, now=datetime.now(UTC)))
    job = outcome.job
    if not json_output:
        verb = "queued" if outcome.created else "joined running"
        console.print(f"{verb} job {job.id} for {task}; log: {job.log_path or 'starting'}")
    if wait:
        job = follow_job(job.id, quiet=json_output)
    if json_output:
        print_json(JobStore(STATE.store).get(job.id).model_dump(mode="json"))
        return
    show_job(job.id)
    if job.state == "failed":
        raise typer.Exit(1)


def follow_job(job_id: int, *, quiet: bool = False, poll_s: float = 2.0) -> Job:
    """Poll until the job leaves its active states, printing each state and stage once; raises WorkerGone when
    its worker died (the job itself is left for the reaper)."""
    from tuneloop.retrain.jobs import JobStore, why_stale

    jobs = JobStore(STATE.store)
    shown: set[str] = set()
    while True:
        job = jobs.get(job_id)
        lines = [(f"state:{job.state}", f"job {job.id}: {job.state}")]
        lines += [(f"stage:{name}:{timing.status}", f"job {job.id}:   {name} {timing.status}"
                   + (f" in {timing.seconds:.0f} s" if timing.seconds is not None else ""))
                  for name, timing in job.stages.items()]
        for key, text in lines:
            if key not in shown:
                shown.add(key)
                if not quiet:
                    console.print(text)
        if not job.active:
            return job
        stale = why_stale(job, stale_after_s=STATE.config.jobs.stale_after_s)
        if stale is not None:
            raise WorkerGone(f"job {job.id}: {stale}; `tuneloop jobs reap` marks it failed")
        time.sleep(poll_s)


@jobs_app.command("list")
def list_jobs(
    task: Annotated[str | None, typer.Option("--task", "-t", help="Only this task.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="Most recent N.")] = 20,
    json_output: JsonOption = False,
) -> None:
    """Retraining jobs, newest first (reads only)."""
    from tuneloop.retrain.jobs import JobStore, why_stale

    found = JobStore(STATE.store).recent(task=task, limit=limit)
    if json_output:
        print_json({"jobs": [j.model_dump(mode="json") for j in found]})
        return
    stale_after = STATE.config.jobs.stale_after_s
    print_table("retraining jobs", ["id", "task", "state", "runner", "created", "triggers", "candidate", "decision",
                                    "took"],
                [[j.id, j.task, j.state + (" (worker gone)" if why_stale(j, stale_after_s=stale_after) else ""),
                  j.runner,
                  j.created_at.strftime("%Y-%m-%d %H:%M"), ", ".join(t.trigger.source for t in j.triggers),
                  j.candidate_ref or "", _decision_summary(j.decision), f"{j.seconds:.0f} s" if j.seconds else ""]
                 for j in found])


@jobs_app.command("show")
def show(
    job_id: Annotated[int, typer.Argument(help="Job id (see `tuneloop jobs list`).")],
    json_output: JsonOption = False,
) -> None:
    """One job: triggers, stage timings, the gate's table with every number behind the decision, the watch."""
    from tuneloop.retrain.jobs import JobStore

    if json_output:
        print_json(JobStore(STATE.store).get(job_id).model_dump(mode="json"))
        return
    show_job(job_id)


@jobs_app.command("follow")
def follow(
    job_id: Annotated[int, typer.Argument(help="Job id (see `tuneloop jobs list`).")],
    json_output: JsonOption = False,
) -> None:
    """Print a job's states and stages as they happen, until it finishes (reads only); --json prints the
    finished job."""
    job = follow_job(job_id, quiet=json_output)
    if json_output:
        print_json(job.model_dump(mode="json"))
        return
    show_job(job.id)


@jobs_app.command("logs")
def logs(
    job_id: Annotated[int, typer.Argument(help="Job id (see `tuneloop jobs list`).")],
    tail: Annotated[int, typer.Option("--tail", min=1, max=100_000, help="Last N lines.")] = 200,
) -> None:
    """The job's worker output, from where its runner keeps it (the job's log file; Ray's job logs)."""
    from tuneloop.conductor.process import job_runner
    from tuneloop.retrain.jobs import JobStore

    job = JobStore(STATE.store).get(job_id)
    lines = job_runner(STATE.config, job.runner).logs(job).splitlines()
    print("\n".join(lines[-tail:]))


@jobs_app.command("cancel")
def cancel(
    job_id: Annotated[int, typer.Argument(help="Job id (see `tuneloop jobs list`).")],
    json_output: JsonOption = False,
) -> None:
    """Stop a running job where it runs (SIGTERM to the local worker; Ray's stop for a Ray job): the worker marks it
    failed, and the champion keeps serving. Needs the machine's database access, as every CLI write does."""
    from tuneloop.conductor.process import job_runner
    from tuneloop.retrain.jobs import JobStore

    job = JobStore(STATE.store).get(job_id)
    if not job.active:
        raise JobEnded(f"job {job_id} already ended {job.state}")
    job_runner(STATE.config, job.runner).cancel(job)
    if json_output:
        print_json({"job": job_id, "cancel": "requested", "runner": job.runner})
        return
    console.print(f"asked the {job.runner} runner to stop job {job_id}; `tuneloop jobs follow {job_id}` shows its end")


@jobs_app.command("reap")
def reap(json_output: JsonOption = False) -> None:
    """Fail the unfinished jobs whose worker is gone (killed, crashed, silent, or ended on Ray), remove their staging
    folders and unload the candidates they left in a running gateway's engine."""
    from tuneloop.conductor.process import assemble_loop

    failed = assemble_loop(STATE.config, STATE.store).reap_jobs()
    if json_output:
        print_json({"failed": failed})
        return
    console.print(f"marked failed: {', '.join(f'job {i}' for i in failed)}" if failed else "no stale jobs")


def show_job(job_id: int) -> None:
    from tuneloop.retrain.jobs import JobStore, why_stale

    job = JobStore(STATE.store).get(job_id)
    console.print(f"job {job.id}: task {job.task}, state [bold]{job.state}[/bold], runner {job.runner}"
                  + (f", pid {job.pid}" if job.pid else "") + (f", log {job.log_path}" if job.log_path else ""))
    stale = why_stale(job, stale_after_s=STATE.config.jobs.stale_after_s)
    if stale:
        console.print(f"worker gone: {stale} (`tuneloop jobs reap` marks it failed)", markup=False)
    if job.error:
        console.print(f"error: {job.error}", markup=False)
    print_table("triggers", ["source", "reason", "at"],
                [[t.trigger.source, t.trigger.reason, t.received_at.strftime("%H:%M:%S")] for t in job.triggers])
    if job.stages:
        print_table("stages", ["stage", "status", "seconds"],
                    [[name, s.status, "" if s.seconds is None else s.seconds] for name, s in job.stages.items()])
    if job.dataset_ref:
        console.print(f"training set {job.dataset_ref}; candidate {job.candidate_ref or '-'}; champion at start "
                      f"{job.task}@{job.champion_version}")
    if job.decision is not None:
        print_gate(job.decision)
    if job.watch is not None:
        console.print(f"watch: {job.watch.status} until {job.watch.until:%Y-%m-%d %H:%M:%S}"
                      + (f"; {job.watch.reason}" if job.watch.reason else ""), markup=False)


def print_gate(decision: GateDecision) -> None:
    verdict = "PROMOTE" if decision.promote else "REJECT"
    print_table(f"gate: {verdict} {decision.candidate or ''} vs {decision.champion} on {decision.metric} "
                f"({decision.level:.0%} level, margin {decision.margin})"
                + (" — refused before training" if decision.preflight else ""),
                ["set", "role", "n", "champion", "candidate", "delta [CI]", "p-value", "MDE", "verdict", "why"],
                [_gate_row(c) for c in decision.checks])


def _gate_row(check: GateCheck) -> list[Any]:
    c = check.comparison
    numbers = (["", "", "", ""] if c is None else
               [f"{c.a:.4f}", f"{c.b:.4f}", f"{c.delta:+.4f} [{c.ci_low:+.4f}, {c.ci_high:+.4f}]", f"{c.p_value:.4f}"])
    return [check.dataset, check.role, check.n, *numbers, f"{check.mde:.4f}", "pass" if check.passed else "FAIL",
            check.reason]


def _decision_summary(decision: GateDecision | None) -> str:
    if decision is None:
        return ""
    return "promote" if decision.promote else "reject: " + "; ".join(decision.reasons)[:80]
