"""`tuneloop eval`, `tuneloop compare` and `tuneloop feedback`: scores with intervals, paired comparisons, labels."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tuneloop.cli.context import STATE
from tuneloop.cli.output import console, print_json, print_table
from tuneloop.errors import EvaluationError

if TYPE_CHECKING:
    from tuneloop.challenger_sets.catalog import DatasetVersion

feedback_app = typer.Typer(no_args_is_help=True, help="Attach reference answers to captured requests.")

EndpointOption = Annotated[str | None, typer.Option(
    "--endpoint", help="OpenAI-compatible base URL to send requests to as they are (default: the gateway from "
                       "config, which loads a version it does not serve yet through its admin API).")]
LimitOption = Annotated[int | None, typer.Option("--limit", "-n", min=1, help="Only the first N examples.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
FreshOption = Annotated[bool, typer.Option("--fresh", help="Ask again even if an identical finished run exists.")]


def _dataset(task: str, name: str | None) -> DatasetVersion:
    from tuneloop.challenger_sets.catalog import get_dataset

    return get_dataset(STATE.store, name or STATE.config.task(task).heldout_dataset, task=task)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _signed(value: float) -> str:
    """+0.012 / -0.012, and +0.000 rather than -0.000 for a difference that rounds to zero."""
    return f"{round(value, 3) + 0.0:+.3f}"


def evaluate(
    task: Annotated[str | None, typer.Option("--task", "-t", help="Task (implied by --adapter).")] = None,
    adapter: Annotated[str | None, typer.Option("--adapter", "-a", help="task@N, task@champion, task@candidate "
                                                "(default: the task's champion).")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="name, task/name or task/name@version "
                                                "(default: the task's held-out set).")] = None,
    base: Annotated[bool, typer.Option("--base", help="Score the base model zero-shot instead of an adapter.")] = False,
    limit: LimitOption = None,
    slice_by: Annotated[list[str] | None, typer.Option("--slice", help="Also score per value of this meta field "
                                                       "(repeatable; the task's slice_by always applies).")] = None,
    endpoint: EndpointOption = None,
    fresh: FreshOption = False,
    json_output: JsonOption = False,
) -> None:
    """Score a model on a dataset through the served endpoint: every metric with its CI, stored and resumable."""
    from tuneloop.evaluators.runner import EvalRunner
    from tuneloop.evaluators.targets import resolve_target

    target = resolve_target(STATE.config, STATE.store, task=task, adapter=adapter, base=base, endpoint=endpoint)
    task_name = target.task
    version = _dataset(task_name, dataset)
    runner = EvalRunner(STATE.config, STATE.store, progress=not json_output)
    report = runner.run(target, version, limit=limit, fresh=fresh, slice_by=slice_by or [])
    if json_output:
        print_json(report.to_json())
        return
    level = f"{report.scores[0].level:.0%}" if report.scores else "95%"
    note = " (stored run reused)" if report.reused else (
        f" (resumed after {report.resumed_from} stored answers)" if report.resumed_from else "")
    print_table(f"{report.model} on {report.dataset}, n={report.n}{note}",
                ["metric", "value", f"{level} CI", "n", "MDE", "empty"],
                [[s.metric, _fmt(s.value), f"[{_fmt(s.ci_low)}, {_fmt(s.ci_high)}]", s.n, _fmt(s.mde), s.empty]
                 for s in report.scores])
    primary = STATE.config.task(task_name).primary_metric
    slices = [s for s in report.slices if s.metric == primary]
    if slices:
        print_table(f"{primary} by slice", ["slice", "value", f"{level} CI", "n"],
                    [[f"{s.slice_field}={s.slice_value}", _fmt(s.value), f"[{_fmt(s.ci_low)}, {_fmt(s.ci_high)}]",
                      s.n] for s in slices])
    timings = report.timings
    console.print(f"run {report.run_id}: {report.errors} failed requests; "
                  f"{timings.get('examples_per_s', 0):.2f} examples/s, metrics {timings.get('metrics_s', 0):.2f} s "
                  f"({100 * timings.get('metrics_share', 0):.1f} % of wall time). MDE = smallest difference a "
                  "comparison on this set would detect with 80 % power.")


def compare(
    first: Annotated[str, typer.Argument(help="Version A: task@N (or 'base' with --task).")],
    second: Annotated[str, typer.Argument(help="Version B: task@N.")],
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="Dataset (default: held-out set).")] = None,
    task: Annotated[str | None, typer.Option("--task", "-t", help="Task, when A or B is 'base'.")] = None,
    limit: LimitOption = None,
    endpoint: EndpointOption = None,
    fresh: FreshOption = False,
    json_output: JsonOption = False,
) -> None:
    """Paired comparison B - A on the same examples: delta, CI and p-value per metric (McNemar for accuracy)."""
    from tuneloop.evaluators.compare import compare_runs
    from tuneloop.evaluators.runner import EvalRunner
    from tuneloop.evaluators.targets import resolve_target, resolve_version

    # Both sides are resolved (and checked to share a task) before any request is sent or adapter loaded.
    tasks = {resolve_version(STATE.config, STATE.store, task=task, adapter=None if ref == "base" else ref,
                             base=ref == "base")[0] for ref in (first, second)}
    if len(tasks) != 1:
        raise EvaluationError(f"{first} and {second} belong to different tasks: {sorted(tasks)}")
    task_name = tasks.pop()
    targets = [resolve_target(STATE.config, STATE.store, task=task_name, adapter=None if ref == "base" else ref,
                              base=ref == "base", endpoint=endpoint) for ref in (first, second)]
    version = _dataset(task_name, dataset)
    runner = EvalRunner(STATE.config, STATE.store, progress=not json_output)
    runs = [runner.run(target, version, limit=limit, fresh=fresh) for target in targets]
    report = compare_runs(runner, runs[0].run_id, runs[1].run_id)
    if json_output:
        print_json(report.to_json())
        return
    print_table(f"{report.b} - {report.a} on {report.dataset}, n={report.n} (paired)",
                ["metric", "A", "B", "B - A", "CI", "p-value", "McNemar p", "MDE", "verdict"],
                [[m.metric, _fmt(m.a), _fmt(m.b), _signed(m.delta), f"[{_signed(m.ci_low)}, {_signed(m.ci_high)}]",
                  _fmt(m.p_value, 4), _fmt(m.mcnemar_p_value, 4), _fmt(m.mde),
                  ("B better" if m.delta > 0 else "A better") if m.significant else
                  ("no difference detectable" if abs(m.delta) < m.mde else "not significant")]
                 for m in report.metrics])


@feedback_app.command("import")
def feedback_import(
    file: Annotated[Path, typer.Argument(help="JSONL lines of {\"request_id\": ..., \"reference\": ...}.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace references given earlier.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Attach references to captured requests; one bad line and nothing is imported."""
    from tuneloop.serving.feedback import import_feedback

    results = import_feedback(STATE.store, STATE.config, file, overwrite=overwrite)
    if json_output:
        print_json([r.model_dump() for r in results])
        return
    changed = sum(1 for r in results if r.changed)
    console.print(f"imported {len(results)} references ({changed} new or changed, {len(results) - changed} "
                  "already there)")
