"""Labels by construction, checked: constrained decoding through the served endpoint against label likelihood.

The gateway restricts a classification task's answers to its labels (vLLM structured outputs), so a base model
and an adapter are compared on the task, not on answer format. This bench scores the base model and a trained
champion both ways on the same held-out tweets: through the gateway (what `tuneloop eval` and the promotion
gate use) and by label likelihood with transformers (what the accuracy bench uses). The two should agree within
their intervals; the agreement column says how often they pick the same label for the same tweet.
"""

from __future__ import annotations

import random
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select

from bench.setup import base_model_path, sentiment_sets
from bench.tables import Table, emit
from tuneloop.challenger_sets.catalog import add_dataset
from tuneloop.config import parse_config
from tuneloop.evaluators.few_shot import prediction_counts
from tuneloop.evaluators.label_likelihood import predict_labels
from tuneloop.evaluators.scoring import score_examples
from tuneloop.evaluators.statistics import paired_bootstrap, table_interval
from tuneloop.ports import free_port
from tuneloop.store import Store
from tuneloop.tables import EvalPredictionRow


def run(*, quick: bool = False) -> list[Table]:
    from tuneloop.evaluators.runner import EvalRunner, EvalTarget
    from tuneloop.registry import get_adapter
    from tuneloop.retrain.finetune import finetune
    from tuneloop.serving.server import running_server

    steps, n = (2, 24) if quick else (40, 1000)
    rows: list[list[Any]] = []
    diffs: list[list[Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = parse_config(
            f"data_dir: data\nbase_model:\n  path: {base_model_path()}\nserving:\n  gateway_port: {free_port()}\n"
            f"  vllm_port: {free_port()}\n  max_model_len: 512\n  kv_cache_gib: 2\nevaluation:\n  concurrency: 16\n"
            "tasks:\n  sentiment:\n    train:\n      learning_rate: 0.001\n      eval_every: 10000\n",
            config_dir=Path(tmp))
        task = config.tasks["sentiment"]
        store = Store(config.resolved_database_url)
        sets = sentiment_sets()
        add_dataset(store, config.data_path, sets["train"], task="sentiment", name="train", kind="train",
                    source="bench", check_leakage=False)
        heldout = random.Random(5).sample(sets["heldout"], n) if n < len(sets["heldout"]) else sets["heldout"]
        dataset = add_dataset(store, config.data_path, heldout, task="sentiment", name="bench-heldout",
                              kind="heldout", source="bench", check_leakage=False)
        champion = finetune(config, store, "sentiment", max_steps=steps, dataset="sentiment/train", progress=False)
        truth = [e.reference for e in heldout]
        served: dict[str, list[str]] = {}
        with running_server(config, store, seed=0) as running:
            runner = EvalRunner(config, store, progress=False)
            dtype = running.engine.spec.resolved_dtype
            for name, served_name, version in (("base model", config.base_model.name, None),
                                               (champion.ref, champion.ref, champion.version)):
                report = runner.run(EvalTarget("sentiment", served_name, version, running.url), dataset)
                with store.session() as session:
                    answers = dict(session.execute(select(EvalPredictionRow.example_id, EvalPredictionRow.prediction)
                                                   .where(EvalPredictionRow.run_id == report.run_id)).all())
                served[name] = [answers[e.id] or "" for e in heldout]
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = base_model_path()
        tokenizer = AutoTokenizer.from_pretrained(base)
        for name in served:
            model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            if name != "base model":
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, get_adapter(store, champion.ref).path)
            likely = predict_labels(model, tokenizer, heldout, system_prompt=task.system_prompt, labels=task.labels)
            tables = {}
            for scoring, predictions in ((f"constrained decoding via the gateway (vLLM {dtype})", served[name]),
                                         ("label likelihood (transformers fp32)", likely)):
                scored = score_examples(["accuracy", "macro_f1"], predictions, truth, task.labels)
                tables[scoring] = scored
                accuracy, _ = table_interval(scored["accuracy"])
                macro, _ = table_interval(scored["macro_f1"])
                invalid = sum(1 for p in predictions if p not in task.labels)
                rows.append([name, scoring, f"{accuracy.value:.3f} [{accuracy.low:.3f}, {accuracy.high:.3f}]",
                             f"{macro.value:.3f} [{macro.low:.3f}, {macro.high:.3f}]",
                             prediction_counts(predictions, task.labels), invalid])
            agreement = sum(a == b for a, b in zip(served[name], likely, strict=True)) / len(heldout)
            constrained, likelihood = tables.values()
            paired = paired_bootstrap(likelihood["accuracy"], constrained["accuracy"])
            diffs.append([name, f"{paired.delta:+.3f} [{paired.low:+.3f}, {paired.high:+.3f}]",
                          f"{paired.p_value:.3f}", f"{agreement:.1%}",
                          _disagreements(served[name], likely)])
        store.close()
    return [emit(f"Sentiment held-out (n={n}): constrained decoding through the endpoint vs label likelihood",
                 ["model", "scoring", "accuracy [95 % CI]", "macro-F1 [95 % CI]", "predicted", "non-label answers"],
                 rows, key="labels",
                 notes=f"The champion is LoRA r=8 q/k/v/o trained {steps} steps x batch 16 at lr 1e-3. Constrained "
                       "decoding: the gateway adds {\"structured_outputs\": {\"choice\": labels}} and greedy "
                       "decoding picks the most likely allowed continuation token by token."),
            emit("Constrained decoding minus label likelihood, paired on the same tweets",
                 ["model", "accuracy difference [95 % CI]", "p-value", "same label", "where they differ "
                  "(constrained -> likelihood)"], diffs, key="labels-agreement")]


def _disagreements(constrained: list[str], likely: list[str]) -> str:
    pairs = Counter(f"{a}->{b}" for a, b in zip(constrained, likely, strict=True) if a != b)
    return ", ".join(f"{pair} {count}" for pair, count in pairs.most_common(4)) or "-"
