"""Drift views on the input texts: each turns a window of texts into one number, larger = more drift.

Views only score; thresholds come from calibration on no-drift windows (monitor/calibration.py), never from a
library default. Texts are turned into features once (`TextFeatures`: embeddings and descriptors), so thousands of
calibration windows are index lookups, not re-embeddings.

- `domain_classifier`: Evidently's text drift (a classifier told to separate current from reference texts); the
  score is its ROC AUC.
- `embedding_model`: Evidently's `ModelDriftMethod` on MiniLM embeddings, called directly (the full Report spends
  ~99 % of its time drawing a t-SNE plot); score = ROC AUC.
- `embedding_novelty`: tuneloop's own: the mean, over the window, of each text's cosine distance to its 5 nearest
  reference texts. A share p of off-domain texts moves it by p times their extra distance, so it is a direct test
  of "some of the traffic is unlike anything trained on"; it catches a 10 % mix where the classifiers need more.
- `descriptors`: the largest Kolmogorov-Smirnov statistic over text length, word count and non-letter share.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tuneloop.monitor.embeddings import Embedder

DESCRIPTOR_NAMES = ("length_chars", "word_count", "non_letter_share")
NOVELTY_NEIGHBOURS = 5
_LETTER = re.compile(r"[^\W\d_]", re.UNICODE)


def descriptors(texts: Sequence[str]) -> np.ndarray:
    """(n, 3): characters, words, share of non-letter characters (spaces excluded)."""
    out = np.zeros((len(texts), len(DESCRIPTOR_NAMES)), dtype=np.float64)
    for i, text in enumerate(texts):
        visible = [c for c in text if not c.isspace()]
        letters = sum(1 for c in visible if _LETTER.match(c))
        out[i] = (len(text), len(text.split()), 1 - letters / len(visible) if visible else 0.0)
    return out


@dataclass(frozen=True)
class TextFeatures:
    """Texts with what the views need, computed once."""

    texts: list[str]
    embeddings: np.ndarray | None
    descriptors: np.ndarray

    @classmethod
    def build(cls, texts: Sequence[str], embedder: Embedder | None, *, progress: bool = False) -> TextFeatures:
        embeddings = embedder.embed(list(texts), progress=progress) if embedder is not None else None
        return cls(texts=list(texts), embeddings=embeddings, descriptors=descriptors(texts))

    def take(self, index: np.ndarray) -> TextFeatures:
        return TextFeatures(texts=[self.texts[i] for i in index],
                            embeddings=None if self.embeddings is None else self.embeddings[index],
                            descriptors=self.descriptors[index])

    def __len__(self) -> int:
        return len(self.texts)


class InputView(Protocol):
    name: str
    column: str
    method: str
    needs_embeddings: bool

    def fit(self, reference: TextFeatures) -> None: ...

    def score(self, current: TextFeatures) -> tuple[float, dict[str, Any]]: ...


def _evidently() -> Any:
    os.environ.setdefault("DO_NOT_TRACK", "1")
    import evidently

    return evidently


class DomainClassifierView:
    name, column, needs_embeddings = "domain_classifier", "prompt", False
    method = "Evidently text content drift (domain classifier ROC AUC)"

    def fit(self, reference: TextFeatures) -> None:
        _evidently()
        self._reference = _text_dataset(reference.texts)
        # Evidently picks the plain classifier for a reference over 1,000 rows and a bootstrap variant below.
        self.variant = "classifier" if len(reference) > 1000 else "bootstrap classifier"

    def score(self, current: TextFeatures) -> tuple[float, dict[str, Any]]:
        from evidently import Report
        from evidently.metrics import ValueDrift

        snapshot = Report([ValueDrift(column="text")]).run(_text_dataset(current.texts), self._reference)
        value = snapshot.dict()["metrics"][0]["value"]
        return float(value), {"evidently_variant": self.variant}


class EmbeddingModelView:
    name, column, needs_embeddings = "embedding_model", "prompt_embedding", True
    method = "Evidently ModelDriftMethod on all-MiniLM-L6-v2 embeddings (ROC AUC)"

    def fit(self, reference: TextFeatures) -> None:
        _evidently()
        import pandas as pd

        assert reference.embeddings is not None
        self._columns = [f"e{i}" for i in range(reference.embeddings.shape[1])]
        self._reference = pd.DataFrame(reference.embeddings, columns=self._columns)

    def score(self, current: TextFeatures) -> tuple[float, dict[str, Any]]:
        import pandas as pd
        from evidently.metrics.embeddings import ModelDriftMethod

        assert current.embeddings is not None
        frame = pd.DataFrame(current.embeddings, columns=self._columns)
        # The method takes current first and writes a `target` column into both frames: pass copies.
        value, _, _ = ModelDriftMethod()(frame, self._reference.copy())
        return float(value), {}


class EmbeddingNoveltyView:
    name, column, needs_embeddings = "embedding_novelty", "prompt_embedding", True
    method = f"mean cosine distance to the {NOVELTY_NEIGHBOURS} nearest reference texts (all-MiniLM-L6-v2)"

    def fit(self, reference: TextFeatures) -> None:
        assert reference.embeddings is not None
        self._reference = reference.embeddings.astype(np.float32)

    def distances(self, current: TextFeatures) -> np.ndarray:
        assert current.embeddings is not None
        out = np.empty(len(current), dtype=np.float64)
        k = min(NOVELTY_NEIGHBOURS, len(self._reference))
        for start in range(0, len(current), 4096):
            sims = current.embeddings[start:start + 4096] @ self._reference.T
            top = np.partition(sims, -k, axis=1)[:, -k:]
            out[start:start + 4096] = 1.0 - top.mean(axis=1)
        return out

    def score(self, current: TextFeatures) -> tuple[float, dict[str, Any]]:
        distances = self.distances(current)
        return float(distances.mean()), {"p90_distance": float(np.quantile(distances, 0.9))}


class DescriptorsView:
    name, column, needs_embeddings = "descriptors", ",".join(DESCRIPTOR_NAMES), False
    method = "max Kolmogorov-Smirnov statistic over text descriptors"

    def fit(self, reference: TextFeatures) -> None:
        self._reference = np.sort(reference.descriptors, axis=0)

    def score(self, current: TextFeatures) -> tuple[float, dict[str, Any]]:
        stats = {name: _ks_statistic(self._reference[:, i], current.descriptors[:, i])
                 for i, name in enumerate(DESCRIPTOR_NAMES)}
        return max(stats.values()), {"ks": stats}


def _ks_statistic(sorted_reference: np.ndarray, current: np.ndarray) -> float:
    """Two-sample KS statistic (sup |F_ref - F_cur|); the reference is pre-sorted for the thousands of windows."""
    current = np.sort(current)
    grid = np.concatenate([sorted_reference, current])
    f_ref = np.searchsorted(sorted_reference, grid, side="right") / len(sorted_reference)
    f_cur = np.searchsorted(current, grid, side="right") / len(current)
    return float(np.max(np.abs(f_ref - f_cur)))


def _text_dataset(texts: Sequence[str]) -> Any:
    import pandas as pd
    from evidently import DataDefinition, Dataset

    return Dataset.from_pandas(pd.DataFrame({"text": list(texts)}), data_definition=DataDefinition(
        text_columns=["text"]))


INPUT_VIEWS: dict[str, type] = {v.name: v for v in (DomainClassifierView, EmbeddingModelView, EmbeddingNoveltyView,
                                                    DescriptorsView)}


def make_input_views(names: Sequence[str]) -> list[InputView]:
    return [INPUT_VIEWS[n]() for n in names if n in INPUT_VIEWS]
