"""`tuneloop run`: the serving stack plus the scheduler, in one supervised process tree.

The scheduled jobs are the real ones: `eval` runs the task's champion over its held-out and challenger sets
through the gateway (the eval runner stores and resumes runs; an unchanged champion on an unchanged dataset
version reuses its finished run), `drift` runs the drift check. After each successful job the task's policy is
evaluated, which opens or resolves incidents.
"""

from __future__ import annotations

import logging
from typing import Any

from tuneloop.challenger_sets.catalog import DatasetVersion
from tuneloop.monitor.jobs import JobFunction
from tuneloop.monitor.policy import Policy
from tuneloop.monitor.scheduler import TuneloopScheduler
from tuneloop.config import Config
from tuneloop.errors import DatasetError
from tuneloop.store import Store

log = logging.getLogger(__name__)


def eval_runner(config: Config, store: Store) -> JobFunction:
    def run(task: str) -> dict[str, Any]:
        from tuneloop.evaluators.runner import EvalRunner
        from tuneloop.evaluators.targets import EvalTarget
        from tuneloop.serving.admin_client import gateway_url
        from tuneloop.registry import find_alias

        champion = find_alias(store, task, "champion")
        if champion is None:
            return {"skipped": f"task '{task}' has no champion"}
        task_config = config.task(task)
        runner = EvalRunner(config, store, progress=False)
        target = EvalTarget(task, champion.ref, champion.version, gateway_url(config))
        results = {}
        for dataset in scheduled_sets(config, store, task):
            report = runner.run(target, dataset, limit=task_config.schedule.eval_limit)
            results[dataset.manifest.ref] = report.run_id
        return {"adapter": champion.ref, "runs": results}

    return run


def scheduled_sets(config: Config, store: Store, task: str) -> list[DatasetVersion]:
    """The held-out set and each challenger set's judge split, created here on first use.

    Judging on the split from the first eval on, rather than on the whole set until some retrain splits it, keeps
    the series comparable across champions (a retrained champion has seen the other half) and lets the gate reuse
    the champion's finished scheduled runs on the same examples instead of asking them again."""
    from tuneloop.challenger_sets.catalog import get_dataset
    from tuneloop.challenger_sets.splits import evaluation_set
    from tuneloop.retrain.data import judge_set

    sets = [get_dataset(store, config.task(task).heldout_dataset)]
    for name in config.task(task).challenger_datasets:
        try:
            sets.append(judge_set(config, store, task, name))
        except DatasetError as exc:  # too few examples for a split: the whole set is still worth watching
            log.warning("%s: evaluating all of %s: %s", task, name, exc)
            sets.append(get_dataset(store, evaluation_set(store, task, name)))
    return sets


def drift_runner(config: Config, store: Store) -> JobFunction:
    from tuneloop.monitor.drift import DriftDetector, NotEnoughTraffic

    detector = DriftDetector(config, store)

    def run(task: str) -> dict[str, Any]:
        try:
            report = detector.run(task)
        except NotEnoughTraffic as exc:
            return {"skipped": str(exc)}
        return {"run_id": report.run_id, "drifted": report.drifted}

    return run


def after_job(config: Config, store: Store, job: str, task: str) -> None:
    """What follows a successful scheduled job: the policy (incidents), retraining for new incidents, and, after an
    eval, the watch of a recent promotion."""
    from tuneloop.retrain.triggers import incident_trigger, request_retrain
    from tuneloop.retrain.watch import Watch

    outcome = Policy(config, store).evaluate(task)
    if outcome.opened:
        log.warning("%s: incident(s) opened: %s", task, outcome.opened)
        if config.task(task).retrain.on_incident:
            for check in outcome.checks:
                incident = outcome.opened_by_rule.get(check.rule)
                if incident is not None:
                    submitted = request_retrain(config, store, task, incident_trigger(incident, check.rule,
                                                                                      check.facts))
                    log.warning("%s: incident %s -> retraining job %s", task, incident, submitted.job.id)
    if job == "eval":
        watched = Watch(config, store).check(task)
        if watched is not None and watched.status == "rolled_back":
            log.warning("%s: watch rolled back job %s's promotion", task, watched.job)


def build_scheduler(config: Config, store: Store) -> TuneloopScheduler:
    def after(job: str, task: str) -> None:
        after_job(config, store, job, task)

    return TuneloopScheduler(config, store, {"eval": eval_runner(config, store), "drift": drift_runner(config, store)},
                             on_success=after)
