"""`python -m retrain.worker JOB_ID --config-snapshot PATH`: run one retraining job to its end.

assemble -> train -> evaluate (gate) -> promote or reject. Any exception marks the job failed with its message
and leaves the champion serving; SIGTERM does the same. SIGKILL cannot be caught: the reaper (retrain/jobs.py)
finds the dead worker, marks the job failed and removes the half-written weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tuneloop.retrain.jobs import JobStore, TriggerRecord, remove_staging, staging_prefix
from tuneloop.config import Config, parse_config
from tuneloop.store import Store

log = logging.getLogger("tuneloop.retrain.worker")


class Terminated(Exception):
    """SIGTERM arrived."""


def run_job(config: Config, store: Store, job_id: int, *, log_path: str | None = None) -> str:
    """Run the job's stages; returns its final state."""
    from tuneloop.retrain.data import assemble, gate_sets
    from tuneloop.retrain.finetune import finetune
    from tuneloop.retrain.gate import Gate
    from tuneloop.serving.promotion import promote
    from tuneloop.registry import find_alias

    jobs = JobStore(store)
    job = jobs.get(job_id)
    jobs.claim(job_id, log_path=log_path)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(jobs, job_id, config.jobs.heartbeat_s, stop), daemon=True)
    beat.start()
    task, settings = job.task, config.task(job.task).retrain
    try:
        champion = find_alias(store, task, "champion")
        if champion is None:
            return jobs.finish(job_id, "failed", error=f"task '{task}' has no champion to compare a candidate "
                               "with; train one first").state
        challengers = _challengers(config, job.triggers, task)
        jobs.update(job_id, champion_version=champion.version,
                    settings={**job.settings, "challenger_sets": challengers})
        gate = Gate(config, store, task)
        refused = gate.preflight(gate_sets(config, store, task, challengers), champion.ref)
        if refused is not None:
            return jobs.finish(job_id, "rejected", decision=refused.to_json()).state
        jobs.transition(job_id, "training")
        with jobs.stage(job_id, "assemble"):
            data = assemble(config, store, task, challengers=challengers, name=f"retrain-job{job_id}")
        jobs.update(job_id, dataset_ref=data.dataset.manifest.ref)
        with jobs.stage(job_id, "train"):
            candidate = finetune(config, store, task, dataset=data.dataset.manifest.ref, max_steps=settings.max_steps,
                                 progress=False, staging_prefix=staging_prefix(job_id),
                                 init_from=champion if settings.start_from == "champion" else None)
        jobs.update(job_id, candidate_version=candidate.version)
        jobs.transition(job_id, "evaluating")
        with jobs.stage(job_id, "evaluate"):
            decision = gate.decide(champion, candidate, data.gate_sets)
        jobs.update(job_id, decision=decision.to_json())
        for line in decision.reasons:
            log.info("job %s gate: %s", job_id, line)
        if not decision.promote:
            _unload(config, candidate.ref)
            return jobs.finish(job_id, "rejected").state
        with jobs.stage(job_id, "promote"):
            promoted = promote(config, store, candidate.ref)
        now = datetime.now(UTC)
        watch = {"status": "watching" if settings.watch_s > 0 else "off", "promoted_at": now.isoformat(),
                 "until": (now + timedelta(seconds=settings.watch_s)).isoformat(),
                 "previous_version": champion.version, "through_gateway": promoted.gateway,
                 "gate_sets": [{"dataset": s.dataset.manifest.ref, "role": s.role} for s in data.gate_sets]}
        return jobs.finish(job_id, "promoted", watch=watch).state
    except BaseException as exc:  # noqa: BLE001 - every way out of a job must leave a record
        reason = "terminated (SIGTERM)" if isinstance(exc, Terminated) else f"{type(exc).__name__}: {exc}"
        log.exception("job %s failed", job_id)
        remove_staging(config.data_path, task, job_id)
        jobs.finish(job_id, "failed", error=reason)
        if not isinstance(exc, Exception | Terminated):
            raise
        return "failed"
    finally:
        stop.set()


def _unload(config: Config, ref: str) -> None:
    """A rejected candidate stays registered but should not hold an adapter slot in the engine."""
    from tuneloop.serving.admin_client import AdminClient

    try:
        AdminClient(config).unload(ref)
    except Exception as exc:  # noqa: BLE001 - costs only memory; the decision stands
        log.warning("could not unload rejected %s: %s", ref, exc)


def _challengers(config: Config, triggers: list[TriggerRecord], task: str) -> list[str]:
    """The challenger sets the triggers name (an incident's rule, an alert's `dataset` label), else the task's."""
    from tuneloop.challenger_sets.catalog import qualify

    task_config = config.task(task)
    named: list[str] = []
    configured = {qualify(task, c) for c in task_config.challenger_datasets}
    for trigger in triggers:
        for name in trigger.detail.get("datasets", []):
            full = qualify(task, name).removesuffix("-gate")
            if full in configured and full not in named:
                named.append(full)
    return named or sorted(configured)


def _heartbeat(jobs: JobStore, job_id: int, every_s: float, stop: threading.Event) -> None:
    while not stop.wait(every_s):
        try:
            jobs.heartbeat(job_id)
        except Exception as exc:  # noqa: BLE001 - a missed heartbeat is retried; the job goes on
            log.warning("heartbeat of job %s failed: %s", job_id, exc)


def load_snapshot(path: Path) -> Config:
    raw = json.loads(path.read_text())
    return parse_config(json.dumps(raw["config"]), source=str(path), config_dir=Path(raw["config_dir"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retrain.worker", description=__doc__)
    parser.add_argument("job", type=int, help="job id")
    parser.add_argument("--config-snapshot", type=Path, required=True, help="config.json written by the runner")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "alembic", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def terminate(_signum: int, _frame: object) -> None:
        raise Terminated

    signal.signal(signal.SIGTERM, terminate)
    config = load_snapshot(args.config_snapshot)
    store = Store(config.resolved_database_url)
    try:
        state = run_job(config, store, args.job, log_path=str(args.config_snapshot.parent / "worker.log"))
    finally:
        store.close()
    log.info("job %s finished: %s", args.job, state)
    return 0 if state in ("promoted", "rejected") else 1


if __name__ == "__main__":
    sys.exit(main())
