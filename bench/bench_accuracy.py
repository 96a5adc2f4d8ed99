"""The brief's two claims, measured on the sentiment held-out set (airline tweets, never trained on).

1. "Fine-tuning yields a 15-30 % accuracy improvement over zero-shot or few-shot prompting."
2. "PEFT reaches performance comparable to full fine-tuning with about 1 % of the parameters trainable."

Every model is scored the same way, by label likelihood (the most likely of the three label tokens after the
chat prompt), so the base model is not penalised for answering in free text. LoRA, prompt tuning and full
fine-tuning get the same data, steps and batch size; each its usual learning rate. Intervals are 95 % percentile
bootstrap CIs over the held-out examples; the majority-class rate is shown as the floor.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from sklearn.metrics import f1_score

from bench.setup import base_model_path, sentiment_sets
from bench.tables import emit
from challenger_sets.records import Example
from evaluators.label_likelihood import predict_labels
from evaluators.statistics import Interval, bootstrap_interval
from retrain.trainer import fit
from tuneloop.config import Config

LEARNING_RATES = {"lora": 1e-3, "prompt-tuning": 3e-2, "full": 3e-5}


def run(*, quick: bool = False) -> str:
    steps = 4 if quick else 40
    n_eval = 60 if quick else 400
    task = Config().tasks["sentiment"]
    sets = sentiment_sets()
    heldout = random.Random(1).sample(sets["heldout"], n_eval)
    train = sets["train"]
    shots = _one_shot_per_label(train, task.labels)
    base = base_model_path()
    rows: list[list[Any]] = []
    truth = [e.reference for e in heldout]
    majority = Counter(truth).most_common(1)[0][0]
    rows.append(_row(f"majority class ('{majority}')", [majority] * len(truth), truth, "-", "-", 0.0))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    started = time.perf_counter()
    zero = predict_labels(model, tokenizer, heldout, system_prompt=task.system_prompt, labels=task.labels)
    rows.append(_row("base model, zero-shot", zero, truth, "0", "-", time.perf_counter() - started))
    started = time.perf_counter()
    few = predict_labels(model, tokenizer, heldout, system_prompt=task.system_prompt, labels=task.labels,
                         shots=shots)
    rows.append(_row(f"base model, {len(shots)}-shot", few, truth, "0", "-", time.perf_counter() - started))
    del model

    with tempfile.TemporaryDirectory() as tmp:
        for method in ("lora", "prompt-tuning", "full"):
            recipe = task.train.model_copy(update={"method": method, "max_steps": steps, "eval_every": 10_000,
                                                   "learning_rate": LEARNING_RATES[method], "batch_size": 16})
            out = Path(tmp) / method
            result = fit(base, train, [], system_prompt=task.system_prompt, train=recipe, output_dir=out,
                         progress=False)
            tuned = _load(base, out, method)
            started = time.perf_counter()
            predictions = predict_labels(tuned, tokenizer, heldout, system_prompt=task.system_prompt,
                                         labels=task.labels)
            share = f"{100 * result.trainable_params / result.total_params:.3f} %"
            label = {"lora": f"LoRA r={recipe.rank} attention", "prompt-tuning":
                     f"prompt tuning ({recipe.num_virtual_tokens} virtual tokens)", "full": "full fine-tuning"}[method]
            rows.append(_row(f"{label}, {steps} steps, lr {recipe.learning_rate:g}", predictions, truth,
                             f"{result.trainable_params:,} ({share})", f"{result.train_seconds:.0f}",
                             time.perf_counter() - started))
            del tuned
    zero_acc = float(rows[1][1].split()[0])
    lora_acc = float(rows[3][1].split()[0])
    notes = (f"n = {n_eval} held-out airline tweets ({dict(Counter(truth))}); 95 % bootstrap CIs, 2000 resamples, "
             f"seed 12345. Training: {steps} steps x batch 16 = {steps * 16} examples seen.\n"
             f"LoRA vs zero-shot accuracy: {lora_acc - zero_acc:+.3f} absolute "
             f"({(lora_acc - zero_acc) / max(zero_acc, 1e-9):+.0%} relative).")
    return emit("Sentiment held-out accuracy: prompting vs fine-tuning methods (label-likelihood scoring)",
                ["model", "accuracy [95 % CI]", "macro-F1 [95 % CI]", "trainable params", "train s", "eval s"],
                rows, notes=notes)


def _one_shot_per_label(train: list[Example], labels: list[str]) -> list[Example]:
    rng = random.Random(7)
    shots = []
    for label in labels:
        pool = [e for e in train if e.reference == label and len(e.input or "") < 90]
        shots.append(rng.choice(pool))
    return shots


def _load(base: Path, out: Path, method: str) -> Any:
    from transformers import AutoModelForCausalLM

    if method == "full":
        return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out)


def _row(name: str, predicted: list[str], truth: list[str], params: str, train_s: str, eval_s: float) -> list[Any]:
    accuracy = _interval(predicted, truth, lambda p, t: sum(a == b for a, b in zip(p, t, strict=True)) / len(t))
    macro = _interval(predicted, truth, lambda p, t: f1_score(t, p, average="macro", zero_division=0))
    return [name, _fmt(accuracy), _fmt(macro), params, train_s, f"{eval_s:.0f}"]


def _interval(predicted: list[str], truth: list[str], metric: Any) -> Interval:
    return bootstrap_interval(truth, lambda idx: metric([predicted[i] for i in idx], [truth[i] for i in idx]))


def _fmt(interval: Interval) -> str:
    return f"{interval.value:.3f} [{interval.low:.3f}, {interval.high:.3f}]"
