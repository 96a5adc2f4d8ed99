"""`tuneloop estimate`: a task's metric on the last window of live traffic, before the labels arrive."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from tuneloop.cli.context import STATE
from tuneloop.cli.output import console, print_json, print_table


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def estimate(
    task: Annotated[str, typer.Option("--task", "-t", help="Task whose served traffic to estimate.")],
    window: Annotated[int | None, typer.Option("--window", "-w", min=1, max=20_000, help="Newest captured answers "
                                               "to cover (default: tasks.<name>.estimate.window).")] = None,
    metric: Annotated[str | None, typer.Option("--metric", "-m", help="accuracy or macro_f1 (classification), chrf "
                                               "(generation); default: the task's primary metric.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Label-free, prediction-powered and labels-only estimates of the champion's metric on live traffic.

    The first estimate for an adapter version fits its calibrator on the task's held-out set through the gateway
    (marked as evaluation traffic); later ones reuse it. Each estimate is stored for /metrics and the policy.
    """
    from tuneloop.monitor.estimate import QualityEstimator

    result = QualityEstimator(STATE.config, STATE.store).estimate(task, window=window, metric=metric)
    if json_output:
        print_json(result.to_json())
        return
    level = f"{STATE.config.task(task).estimate.level:.0%}"
    version = "base model" if result.adapter_version is None else f"{task}@{result.adapter_version}"
    print_table(f"{result.metric} of {version} on its last {result.n_answers} answers (window {result.window})",
                ["method", "value", f"{level} CI", "labelled", "unlabelled"],
                [[e.method, _fmt(e.value), f"[{_fmt(e.ci_lower)}, {_fmt(e.ci_upper)}]", e.n_labelled, e.n_unlabelled]
                 for e in result.estimates])
    if "spearman" in result.calibration:
        console.print(f"predictor: {result.calibration['method']} on {result.calibration['n']} held-out answers "
                      f"(rank correlation with the true per-answer {result.metric} on unseen halves: "
                      f"{result.calibration['spearman']:.2f}; residual sd {result.calibration['residual_sd']:.3f}). "
                      "label_free assumes the predictor still holds on these inputs; prediction_powered does not, "
                      "and needs the labelled answers to be a random sample.")
    else:
        _print_calibration(result.calibration)
    skipped = {k: v for k, v in result.skipped.items() if v}
    if skipped:
        console.print(f"skipped: {skipped}")


def _print_calibration(calibration: dict[str, Any]) -> None:
    ece = calibration["ece"]
    console.print(f"calibration: {calibration['method']} on {calibration['n']} held-out answers "
                  f"(held-out ECE: identity {ece.get('identity', 0):.3f}, temperature {ece.get('temperature', 0):.3f}, "
                  f"isotonic {ece.get('isotonic', 0):.3f}). label_free assumes that calibration still holds on "
                  "these inputs; prediction_powered does not, and needs the labelled answers to be a random sample.")
