"""What the two scheduled job kinds do for a task. The conductor binds them (tuneloop/conductor/loop.py) and hands
them to the scheduler; what follows a run (policy, retraining, watch) is the conductor's too.

`eval` runs the task's champion over its judged sets (challenger_sets/judged.py) through the gateway: the eval
runner stores and resumes runs, and an unchanged champion on an unchanged dataset version reuses its finished run.
`drift` runs the drift check of the task's captured traffic and then, for a classification task, the live-traffic
quality estimate of the same traffic (monitor/estimate.py), so the policy sees both side by side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuneloop.challenger_sets.judged import judged_sets
from tuneloop.config import Config
from tuneloop.monitor.jobs import DriftJobResult, EvalJobResult, Skipped
from tuneloop.registry import find_alias
from tuneloop.store import Store

if TYPE_CHECKING:
    from tuneloop.monitor.drift import DriftDetector
    from tuneloop.monitor.estimate import WindowEstimate


def scheduled_eval(config: Config, store: Store, task: str, *, endpoint: str) -> EvalJobResult | Skipped:
    """The champion on the held-out set and each challenger set's judge split, asked through `endpoint`.

    Judging on the split from the first eval on, rather than on the whole set until some retrain splits it, keeps
    the series comparable across champions (a retrained champion has seen the other half) and lets the gate reuse
    the champion's finished scheduled runs on the same examples instead of asking them again."""
    from tuneloop.evaluators.runner import EvalRunner, EvalTarget

    champion = find_alias(store, task, "champion")
    if champion is None:
        return Skipped(f"task '{task}' has no champion")
    runner = EvalRunner(config, store, progress=False)
    target = EvalTarget(task, champion.ref, champion.version, endpoint)
    limit = config.task(task).schedule.eval_limit
    runs = {judged.ref: runner.run(target, judged.dataset, limit=limit).run_id
            for judged in judged_sets(config, store, task)}
    return EvalJobResult(adapter=champion.ref, runs=runs)


def scheduled_drift(detector: DriftDetector, task: str) -> DriftJobResult | Skipped:
    """A drift check of the last monitor.window captured prompts (`detector` keeps its embedder between runs)."""
    from tuneloop.monitor.drift import NotEnoughTraffic

    try:
        report = detector.run(task)
    except NotEnoughTraffic as exc:
        return Skipped(str(exc))
    assert report.run_id is not None, "a saved drift check has a run id"
    return DriftJobResult(run_id=report.run_id, drifted=report.drifted)


def scheduled_estimate(config: Config, store: Store, task: str, *, endpoint: str) -> WindowEstimate | Skipped:
    """The champion's live-traffic estimate; nothing to estimate yet (no signals, no champion) is a quiet skip."""
    from tuneloop.errors import EstimationError
    from tuneloop.evaluators.targets import EvalTarget
    from tuneloop.monitor.estimate import QualityEstimator

    task_config = config.task(task)
    if not task_config.estimate.signal:
        return Skipped(f"task '{task}' has no live-traffic estimate (tasks.{task}.estimate.signal is off)")
    champion = find_alias(store, task, "champion")
    if champion is None:
        return Skipped(f"task '{task}' has no champion")
    try:
        return QualityEstimator(config, store).estimate(
            task, target=EvalTarget(task, champion.ref, champion.version, endpoint))
    except EstimationError as exc:
        return Skipped(str(exc))
