"""`bench estimate_chat`: live-traffic estimates of a generation task's chrF, from each answer's token
log-probabilities, its length and its prompt's novelty (monitor/answer_quality.py), on the embedded chat task.

Two served models: the embedded base model answering zero-shot and the chat task's recipe trained for ADAPTER_STEPS
steps (cached in the bench cache). Answers are greedy, up to the task's 48 new tokens, generated with transformers
(the token log-probabilities are the ones vLLM returns for the same tokens, `tests/monitor/test_estimate_live.py`
checks capture against vLLM's own). Each answer's true score is its sentence chrF against the conversation's real
next message.

The chat held-out set (conversations of April-May 2018) is split in two: the predictor is fitted on one half and
ranks the other. Traffic is the challenger period `chat/autumn-2018` (September-November 2018, unseen): windows of
200 requests drawn from it, 25, 50 or 100 of them labelled at random. That shift is real but mild; where the
label-free estimate goes wrong on it, the table shows it.
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.setup import CACHE, base_model_path, causal_lm, chat_sets, trained_adapter
from bench.tables import Table, emit
from tuneloop.challenger_sets.records import Example
from tuneloop.config import Config
from tuneloop.monitor.answer_quality import (
    FEATURES,
    AnswerQualityModel,
    answer_features,
    fit_quality_model,
    sentence_scores,
    spearman,
)
from tuneloop.monitor.estimators import METHODS, ScoreWindow, estimate_scores

WINDOW = 200
LABELS_PER_WINDOW = (25, 50, 100)
ADAPTER_STEPS = 60
GENERATE_BATCH = 32


@dataclass(frozen=True)
class Answered:
    """Examples with the served model's answers, their token signals, novelty and true sentence chrF."""

    examples: list[Example]
    answers: list[str]
    signals: np.ndarray  # (n, 3): mean log-prob, lowest log-prob, tokens
    novelty: np.ndarray
    truth: np.ndarray

    def features(self) -> np.ndarray:
        return answer_features(self.signals, [e.last_user_text() for e in self.examples], self.novelty)

    def take(self, rows: np.ndarray) -> Answered:
        return Answered([self.examples[i] for i in rows], [self.answers[i] for i in rows], self.signals[rows],
                        self.novelty[rows], self.truth[rows])


def _adapter(steps: int) -> Path:
    """The chat task's recipe trained for `steps` steps, cached in the bench cache."""
    return trained_adapter("chat", chat_sets()["train"], steps, f"estimate-chat-adapter-{steps}")


def _generate(examples: list[Example], system_prompt: str, max_new_tokens: int, adapter: Path | None,
              key: str) -> tuple[list[str], np.ndarray]:
    """Greedy answers and their token signals, cached per model and example ids (generation is the slow part)."""
    cache_file = CACHE / f"estimate-chat-{key}.json"
    ids = [e.id for e in examples]
    if cache_file.exists():
        stored = json.loads(cache_file.read_text())
        if stored["ids"] == ids:
            return stored["answers"], np.array(stored["signals"], dtype=float)
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_path())
    tokenizer.padding_side = "left"
    model = causal_lm(adapter).eval()
    answers: list[str] = []
    signals: list[list[float]] = []
    for start in tqdm(range(0, len(examples), GENERATE_BATCH), desc=f"answering ({key})", unit="batch"):
        batch = examples[start: start + GENERATE_BATCH]
        prompts = [tokenizer.apply_chat_template(e.chat_messages(system_prompt), tokenize=False,
                                                 add_generation_prompt=True) for e in batch]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        logprobs = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
        generated = out.sequences[:, encoded.input_ids.shape[1]:]
        for row in range(len(batch)):
            ids_out = generated[row].tolist()
            # vLLM returns a log-probability for every output token, the end-of-turn token included
            n = ids_out.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in ids_out else len(ids_out)
            values = logprobs[row, :n].numpy()
            answers.append(str(tokenizer.decode(ids_out[:n], skip_special_tokens=True)).strip())
            signals.append([float(values.mean()), float(values.min()), float(n)])
    cache_file.write_text(json.dumps({"ids": ids, "answers": answers, "signals": signals}))
    return answers, np.array(signals, dtype=float)


def _novelty(examples: list[Example], train: list[Example]) -> np.ndarray:
    """The drift view's per-text novelty against a 2,000-prompt sample of the training inputs, as the product's
    reference sample draws it."""
    from tuneloop.monitor.embeddings import make_embedder
    from tuneloop.monitor.views import EmbeddingNoveltyView, TextFeatures

    texts = list(dict.fromkeys(e.last_user_text() for e in train))
    random.Random(0).shuffle(texts)
    embedder = make_embedder(Config().monitor.embedding_backend, CACHE / "drift",
                             cache_file=CACHE / "estimate-chat-embeddings.sqlite")
    view = EmbeddingNoveltyView()
    view.fit(TextFeatures.build(texts[:2000], embedder))
    return view.distances(TextFeatures.build([e.last_user_text() for e in examples], embedder))


def _answered(examples: list[Example], train: list[Example], adapter: Path | None, key: str) -> Answered:
    task = Config().tasks["chat"]
    answers, signals = _generate(examples, task.system_prompt, task.max_new_tokens, adapter, key)
    truth = sentence_scores("chrf", answers, [e.reference for e in examples])
    return Answered(examples, answers, signals, _novelty(examples, train), truth)


def run(*, quick: bool = False) -> list[Table]:
    sets = chat_sets()
    rng = random.Random(7)
    heldout = list(sets["heldout"])
    rng.shuffle(heldout)
    autumn = rng.sample(list(sets["autumn-2018"]), 120 if quick else 400)
    if quick:
        heldout = heldout[:80]
    half = len(heldout) // 2
    steps = 3 if quick else ADAPTER_STEPS
    served = {"base model, zero-shot": None, f"chat adapter ({steps} steps)": _adapter(steps)}
    rows: dict[str, list[list[Any]]] = {name: [] for name in ("rank", "windows", "width")}
    for model_name, adapter in served.items():
        key = ("quick-" if quick else "") + ("base" if adapter is None else f"adapter-{steps}")
        answered = _answered(heldout + autumn, sets["train"], adapter, key)
        fit_part = answered.take(np.arange(half))
        rank_part = answered.take(np.arange(half, len(heldout)))
        traffic = answered.take(np.arange(len(heldout), len(heldout) + len(autumn)))
        model = fit_quality_model(fit_part.features(), fit_part.truth)
        rows["rank"] += [[model_name, *row] for row in _rank_rows(model, fit_part, rank_part, traffic)]
        records = _windows(model, traffic, 40 if quick else 240, window=110 if quick else WINDOW)
        rows["windows"] += [[model_name, *row] for row in _window_rows(records)]
        rows["width"] += [[model_name, *row] for row in _width_rows(records)]
    return [
        emit("How well the chrF predictor ranks unseen answers (Spearman, 95 % bootstrap interval)", [
            "served model", "answers", "n", "Spearman: predictor", "Spearman: mean token log-prob alone",
            "true mean sentence chrF", "predicted mean", "corpus chrF", "mean novelty"], rows["rank"],
            key="estimate-chat-rank",
            notes=f"The predictor (ridge on {', '.join(FEATURES)}) is fitted on {half} held-out answers and ranks "
                  "the other held-out half and the later period. A mean token log-prob's correlation is negative "
                  "where the model's most confident replies are its generic ones. Corpus chrF (what a scheduled "
                  "eval reports) and mean sentence chrF (what an estimate estimates) on the same answers."),
        emit("chrF estimates per window of 200 requests (autumn 2018) vs the window's true mean sentence chrF", [
            "served model", "method", "labels per window", "windows", "mean absolute error",
            "coverage of the 95 % interval", "mean interval width"], rows["windows"], key="estimate-chat-windows",
            notes="Label-free: the mean predicted chrF, with the interval the predictor's held-out residual spread "
                  "gives if it still holds. Prediction-powered and labels-only: with the window's labels."),
        emit("chrF interval width: prediction-powered vs labels only, same labels", [
            "served model", "labels per window", "prediction-powered width", "labels-only width", "width ratio",
            "labels-only labels for the same width", "label saving", "prediction-powered coverage",
            "median lambda"], rows["width"], key="estimate-chat-width",
            notes="The labels labels-only would need for the prediction-powered width: labels x (width ratio)^-2."),
    ]


def _bootstrap_spearman(predicted: np.ndarray, truth: np.ndarray, *, draws: int = 1000) -> str:
    rng = np.random.default_rng(3)
    n = len(truth)
    values = [spearman(predicted[rows], truth[rows]) for rows in (rng.integers(0, n, n) for _ in range(draws))]
    low, high = np.quantile(values, [0.025, 0.975])
    return f"{spearman(predicted, truth):.2f} [{low:.2f}, {high:.2f}]"


def _rank_rows(model: AnswerQualityModel, fitted: Answered, held: Answered, later: Answered) -> list[list[Any]]:
    import sacrebleu

    rows = []
    for name, part in (("held-out, the fitted half (cross-fitted)", fitted), ("held-out, the other half", held),
                       ("autumn 2018 (later period)", later)):
        predicted = model.predict(part.features())
        corpus = sacrebleu.corpus_chrf(part.answers, [[e.reference for e in part.examples]]).score / 100
        rank = (f"{model.spearman:.2f} (cross-fitted)" if part is fitted
                else _bootstrap_spearman(predicted, part.truth))
        rows.append([name, len(part.truth), rank, _bootstrap_spearman(part.signals[:, 0], part.truth),
                     f"{part.truth.mean():.3f}", f"{predicted.mean():.3f}", f"{corpus:.3f}",
                     f"{part.novelty.mean():.3f}"])
    return rows


def _windows(model: AnswerQualityModel, traffic: Answered, windows: int, *, window: int) -> list[dict[str, Any]]:
    predicted_all = model.predict(traffic.features())
    rng = np.random.default_rng(5)
    records = []
    for _ in range(windows):
        rows = rng.choice(len(traffic.truth), window, replace=False)
        predicted, truth = predicted_all[rows], traffic.truth[rows]
        true_value = float(truth.mean())
        for n_labels in LABELS_PER_WINDOW:
            seen = np.full(window, np.nan)
            chosen = rng.choice(window, n_labels, replace=False)
            seen[chosen] = truth[chosen]
            for estimate in estimate_scores("chrf", ScoreWindow(predicted, seen, model.residual_sd)):
                assert estimate.value is not None and estimate.ci_lower is not None and estimate.ci_upper is not None
                records.append({"labels": n_labels, "method": estimate.method,
                                "error": abs(estimate.value - true_value),
                                "width": estimate.ci_upper - estimate.ci_lower,
                                "covered": estimate.ci_lower <= true_value <= estimate.ci_upper,
                                "lambda": estimate.detail.get("lambda")})
    return records


def _window_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for method in METHODS:
        for n_labels in (LABELS_PER_WINDOW[:1] if method == "label_free" else LABELS_PER_WINDOW):
            chosen = [r for r in records if r["method"] == method and r["labels"] == n_labels]
            rows.append([method, "-" if method == "label_free" else n_labels, len(chosen),
                         f"{statistics.mean(r['error'] for r in chosen):.3f}",
                         f"{statistics.mean(r['covered'] for r in chosen):.1%}",
                         f"{statistics.mean(r['width'] for r in chosen):.3f}"])
    return rows


def _width_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for n_labels in LABELS_PER_WINDOW:
        ppi = [r for r in records if r["labels"] == n_labels and r["method"] == "prediction_powered"]
        alone = [r for r in records if r["labels"] == n_labels and r["method"] == "labels_only"]
        w_ppi, w_alone = statistics.mean(r["width"] for r in ppi), statistics.mean(r["width"] for r in alone)
        equivalent = n_labels * (w_alone / w_ppi) ** 2
        rows.append([n_labels, f"{w_ppi:.3f}", f"{w_alone:.3f}", f"{w_ppi / w_alone:.2f}", f"{equivalent:.0f}",
                     f"{equivalent / n_labels:.2f}x", f"{statistics.mean(r['covered'] for r in ppi):.1%}",
                     f"{statistics.median(r['lambda'] for r in ppi):.2f}"])
    return rows
