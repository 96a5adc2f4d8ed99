"""Metrics from maintained libraries, per example and per corpus, each result carrying its signature.

- BLEU and chrF: sacrebleu, corpus level, with sacrebleu's own signature string.
- ROUGE-1/2/L/Lsum: rouge-score with stemming, but with a Unicode-aware tokenizer: rouge-score's default one
  drops every non-Latin character, so a Chinese or Russian reply would score 0 against itself.
- Token F1 and exact match: SQuAD-style normalisation (lowercase, no punctuation, no English articles).
- Label tasks: accuracy, macro-F1, per-class precision/recall (scikit-learn) over parsed labels.

Empty or missing predictions score 0 and are counted in `MetricResult.empty`, never crashed on.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

GENERATION_METRICS = ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum", "token_f1", "exact_match")
LABEL_METRICS = ("accuracy", "macro_f1", "exact_match")
INVALID_LABEL = "<invalid>"


@dataclass(frozen=True)
class MetricResult:
    """A corpus score, the per-example scores it came from (where they exist), and what produced it."""

    name: str
    value: float
    n: int
    signature: str
    per_example: list[float] | None = None
    empty: int = 0
    details: dict[str, Any] = field(default_factory=dict)


# Tokenisation ------------------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+", re.UNICODE)
_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af])")


class UnicodeTokenizer:
    """rouge-score tokenizer interface: lowercase words of any script, CJK split per character, Porter-stemmed
    where the word is ASCII (the stemmer only knows English). Cached, since stemming is rouge's hot spot."""

    def __init__(self, stem: bool = True) -> None:
        from nltk.stem import porter  # rouge-score depends on nltk's Porter stemmer

        self._stemmer = porter.PorterStemmer() if stem else None
        self.tokenize = lru_cache(maxsize=200_000)(self._tokenize)
        self._stem = lru_cache(maxsize=500_000)(self._stemmer.stem) if self._stemmer else None

    def _tokenize(self, text: str) -> list[str]:
        spaced = _CJK.sub(r" \1 ", unicodedata.normalize("NFKC", text).lower())
        tokens = _WORD.findall(spaced)
        if self._stem is None:
            return tokens
        return [self._stem(t) if t.isascii() and len(t) > 3 else t for t in tokens]


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@lru_cache(maxsize=1)
def _tokenizer() -> UnicodeTokenizer:
    return UnicodeTokenizer()


@lru_cache(maxsize=16)
def _rouge_scorer(types: tuple[str, ...] = ROUGE_TYPES) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(types), tokenizer=_tokenizer())


# Generation metrics ------------------------------------------------------------------------------------------

def bleu(predictions: Sequence[str], references: Sequence[str]) -> MetricResult:
    import sacrebleu

    metric = sacrebleu.BLEU()
    score = metric.corpus_score(list(predictions), [list(references)])
    return MetricResult("bleu", score.score / 100, len(predictions), str(metric.get_signature()),
                        empty=_empties(predictions))


def chrf(predictions: Sequence[str], references: Sequence[str]) -> MetricResult:
    import sacrebleu

    metric = sacrebleu.CHRF()
    score = metric.corpus_score(list(predictions), [list(references)])
    return MetricResult("chrf", score.score / 100, len(predictions), str(metric.get_signature()),
                        empty=_empties(predictions))


def rouge(predictions: Sequence[str], references: Sequence[str],
          types: Sequence[str] = ROUGE_TYPES) -> dict[str, MetricResult]:
    """ROUGE F-measures; rougeLsum splits summaries on newlines, as rouge-score does. Only `types` are computed
    (rougeLsum's summary-level LCS costs as much as the other three together)."""
    wanted = tuple(t for t in ROUGE_TYPES if t in types)
    scorer = _rouge_scorer(wanted)
    per: dict[str, list[float]] = {k: [] for k in wanted}
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction or "")
        for key in per:
            per[key].append(scores[key].fmeasure)
    signature = "rouge-score|stemmer:porter(ascii words)|tokenizer:unicode-words+cjk-chars|f-measure|mean"
    return {key: MetricResult(key, _mean(values), len(values), signature, values, _empties(predictions))
            for key, values in per.items()}


def normalize_answer(text: str) -> str:
    """SQuAD normalisation, extended to all Unicode punctuation."""
    text = text.lower()
    text = "".join(c for c in text if not unicodedata.category(c).startswith("P") and c not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1_one(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(predictions: Sequence[str], references: Sequence[str]) -> MetricResult:
    values = [token_f1_one(p or "", r) for p, r in zip(predictions, references, strict=True)]
    return MetricResult("token_f1", _mean(values), len(values), "squad-token-f1|normalize:lower,punct,articles",
                        values, _empties(predictions))


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> MetricResult:
    values = [float(bool(p) and normalize_answer(p) == normalize_answer(r))
              for p, r in zip(predictions, references, strict=True)]
    return MetricResult("exact_match", _mean(values), len(values), "exact-match|normalize:lower,punct,articles",
                        values, _empties(predictions))


# Label metrics -------------------------------------------------------------------------------------------------

def parse_label(text: str | None, labels: Sequence[str]) -> str:
    """The label an answer gives, or INVALID_LABEL.

    Rules, in order: the whole answer (lowercased, stripped of punctuation and whitespace) equals a label; else
    the first word does ("Positive." and "positive, because ..." count as positive); else invalid. An answer
    that merely mentions a label later ("not negative") is invalid rather than guessed.
    """
    if not text:
        return INVALID_LABEL
    lowered = {label.lower(): label for label in labels}
    cleaned = normalize_answer(text)
    if cleaned in lowered:
        return lowered[cleaned]
    words = cleaned.split()
    if words and words[0] in lowered:
        return lowered[words[0]]
    return INVALID_LABEL


def label_metrics(predictions: Sequence[str | None], references: Sequence[str],
                  labels: Sequence[str]) -> dict[str, MetricResult]:
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    parsed = [parse_label(p, labels) for p in predictions]
    correct = [float(p == r) for p, r in zip(parsed, references, strict=True)]
    invalid = sum(1 for p in parsed if p == INVALID_LABEL)
    empty = _empties([p or "" for p in predictions])
    signature = f"labels:{','.join(labels)}|parse:whole-or-first-word|invalid-counts-as-wrong"
    macro = float(f1_score(references, parsed, labels=list(labels), average="macro", zero_division=0))
    precision, recall, f1, support = precision_recall_fscore_support(references, parsed, labels=list(labels),
                                                                      zero_division=0)
    per_class = {label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                         "support": int(support[i])} for i, label in enumerate(labels)}
    details = {"invalid": invalid, "per_class": per_class}
    return {
        "accuracy": MetricResult("accuracy", _mean(correct), len(correct), signature, correct, empty, details),
        "macro_f1": MetricResult("macro_f1", macro, len(correct), signature + "|sklearn-macro", None, empty,
                                 details),
        "exact_match": exact_match([p or "" for p in predictions], references),
    }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _empties(predictions: Sequence[str | None]) -> int:
    return sum(1 for p in predictions if not p or not p.strip())
