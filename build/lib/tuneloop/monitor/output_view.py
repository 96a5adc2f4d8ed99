"""The output view: has what the served adapter *says* moved, before any label arrives?

Reference: the same adapter version's answers on the task's held-out set (its latest complete eval run). Current:
its answers to the captured user traffic in the window. Classification tasks compare label shares (total
variation distance, unknown answers counted as one extra class); generation tasks compare reply length (KS
statistic) and the share of empty replies, taking the larger. The threshold is the (1 - alpha) quantile of the
same statistic on bootstrap windows of held-out answers of the live window's size, and its false-alarm rate is
measured on a second, independent set of such windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select

from tuneloop.config import TaskConfig
from tuneloop.store import Store
from tuneloop.tables import EvalPredictionRow, EvalRunRow

NULL_WINDOWS = 2000
OTHER = "(other)"


@dataclass(frozen=True)
class HeldoutAnswers:
    run_id: int
    dataset_ref: str
    answers: list[str]


def heldout_answers(store: Store, task_name: str, task: TaskConfig, adapter_version: int) -> HeldoutAnswers | None:
    """The adapter's answers in its latest complete run on the task's held-out set, if there is one."""
    prefix = task.heldout_dataset.split("@", 1)[0] + "@"
    with store.session() as session:
        run = session.scalars(
            select(EvalRunRow).where(EvalRunRow.task == task_name, EvalRunRow.adapter_version == adapter_version,
                                     EvalRunRow.status == "complete", EvalRunRow.dataset_ref.startswith(prefix))
            .order_by(EvalRunRow.id.desc()).limit(1)).first()
        if run is None:
            return None
        answers = [p or "" for p in session.scalars(
            select(EvalPredictionRow.prediction).where(EvalPredictionRow.run_id == run.id))]
    return HeldoutAnswers(run_id=run.id, dataset_ref=run.dataset_ref, answers=answers)


class OutputStatistic:
    """Turns answers into the view's statistic against fixed reference answers."""

    def __init__(self, task: TaskConfig, reference: Sequence[str]) -> None:
        self.kind = task.kind
        self.labels = [label.lower() for label in task.labels]
        self.classes = [*self.labels, OTHER]
        self.reference_codes = self._codes(reference)
        if self.kind == "classification":
            self.reference_shares = self._shares(self.reference_codes)
        else:
            self.reference_lengths = np.sort(self.reference_codes)
            self.reference_empty = float(np.mean(self.reference_codes == 0))

    @property
    def method(self) -> str:
        return ("total variation distance of label shares" if self.kind == "classification"
                else "max(KS on reply length, |empty-reply share difference|)")

    def _codes(self, answers: Sequence[str]) -> np.ndarray:
        if self.kind == "classification":
            index = {label: i for i, label in enumerate(self.labels)}
            return np.array([index.get(a.strip().strip(".!").lower(), len(self.labels)) for a in answers])
        return np.array([len(a.strip()) for a in answers], dtype=np.float64)

    def _shares(self, codes: np.ndarray) -> np.ndarray:
        return np.bincount(codes, minlength=len(self.classes)) / max(len(codes), 1)

    def score_codes(self, codes: np.ndarray) -> float:
        if self.kind == "classification":
            return float(0.5 * np.abs(self._shares(codes) - self.reference_shares).sum())
        from tuneloop.monitor.views import _ks_statistic

        empty = abs(float(np.mean(codes == 0)) - self.reference_empty)
        return max(_ks_statistic(self.reference_lengths, codes), empty)

    def score(self, answers: Sequence[str]) -> tuple[float, dict[str, Any]]:
        codes = self._codes(answers)
        value = self.score_codes(codes)
        detail: dict[str, Any]
        if self.kind == "classification":
            detail = {"current_shares": dict(zip(self.classes, self._shares(codes).round(4).tolist(), strict=True)),
                      "reference_shares": dict(zip(self.classes, self.reference_shares.round(4).tolist(),
                                                   strict=True))}
        else:
            detail = {"current_mean_length": float(codes.mean()), "reference_mean_length":
                      float(self.reference_codes.mean()), "current_empty_share": float(np.mean(codes == 0)),
                      "reference_empty_share": self.reference_empty}
        return value, detail

    def null_scores(self, window: int, windows: int, rng: np.random.Generator) -> np.ndarray:
        """The statistic on bootstrap windows of reference answers: its distribution when nothing moved."""
        draws = rng.integers(0, len(self.reference_codes), size=(windows, window))
        return np.array([self.score_codes(self.reference_codes[row]) for row in draws])
