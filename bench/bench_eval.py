"""Evaluation: examples/s through the endpoint vs one request at a time vs batched transformers.generate, the
share of wall time spent on metrics, and metric computation for 10k pairs vs a naive per-example loop.

All three generation paths answer the same examples with the same adapter and greedy decoding, in one run.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.setup import base_model_path, chat_sets, sentiment_sets
from bench.tables import Table, emit
from tuneloop.challenger_sets.catalog import add_dataset
from tuneloop.challenger_sets.records import Example
from tuneloop.config import TaskConfig, parse_config
from tuneloop.evaluators.client import request_body
from tuneloop.evaluators.runner import EvalRunner, EvalTarget
from tuneloop.ports import free_port
from tuneloop.store import Store


def run(*, quick: bool = False) -> list[Table]:
    from tuneloop.registry import get_adapter
    from tuneloop.retrain.finetune import finetune
    from tuneloop.serving.server import running_server

    sizes = {"sentiment": 16, "chat": 8} if quick else {"sentiment": 96, "chat": 32}
    repeats = 1 if quick else 2
    rows, share_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        config = parse_config(
            f"data_dir: data\nbase_model:\n  path: {base_model_path()}\nserving:\n  gateway_port: {free_port()}\n"
            f"  vllm_port: {free_port()}\n  max_model_len: 768\n  kv_cache_gib: 2\n  prefix_caching: false\n"
            "evaluation:\n  concurrency: 16\n"
            "tasks:\n  sentiment:\n    train:\n      batch_size: 4\n      validation_examples: 2\n"
            "  chat:\n    train:\n      batch_size: 4\n      validation_examples: 2\n", config_dir=Path(tmp))
        store = Store(config.resolved_database_url)
        sets = {"sentiment": sentiment_sets(), "chat": chat_sets()}
        heldout = {}
        for task, size in sizes.items():
            add_dataset(store, config.data_path, random.Random(0).sample(sets[task]["train"], 32), task=task,
                        name="bench-train", kind="train", source="bench", check_leakage=False)
            finetune(config, store, task, max_steps=2, dataset=f"{task}/bench-train", progress=False)
            heldout[task] = add_dataset(store, config.data_path, sets[task]["heldout"][:size], task=task,
                                        name="bench-heldout", kind="heldout", source="bench", check_leakage=False)
        with running_server(config, store, seed=0) as running:
            runner = EvalRunner(config, store, progress=False)
            for task in sizes:
                examples = heldout[task].load()
                spec = config.tasks[task]
                target = EvalTarget(task, f"{task}@1", 1, running.url)
                runner.run(target, heldout[task], limit=4, fresh=True)  # warm-up
                adapter = get_adapter(store, f"{task}@1")
                seconds = {"runner": 0.0, "sequential": 0.0, "hf": 0.0}
                report = None
                for repeat in range(repeats):
                    order = ["runner", "sequential", "hf"]
                    for path in order if repeat % 2 == 0 else list(reversed(order)):
                        if path == "runner":
                            report = runner.run(target, heldout[task], fresh=True)
                            seconds[path] += report.timings["generation_s"]
                        elif path == "sequential":
                            seconds[path] += _sequential(running.url, target, spec, examples,
                                                         config.evaluation.seed)
                        else:
                            seconds[path] += _hf_generate(base_model_path(), adapter.path, examples,
                                                          spec.system_prompt, spec.max_new_tokens)
                assert report is not None
                rate = {path: repeats * len(examples) / s for path, s in seconds.items()}
                label = f"{task} ({len(examples)} ex, <= {spec.max_new_tokens} new tokens)"
                rows += [[label, "tuneloop eval via gateway, 16 in flight", f"{rate['runner']:.2f}",
                          f"{rate['runner'] / rate['sequential']:.2f}x", f"{rate['runner'] / rate['hf']:.2f}x"],
                         [label, "sequential loop, 1 request at a time", f"{rate['sequential']:.2f}", "1.00x", "-"],
                         [label, "transformers.generate, batches of 16, PEFT", f"{rate['hf']:.2f}", "-", "1.00x"]]
                share_rows.append([task, report.n, f"{report.timings['generation_s']:.1f}",
                                   f"{report.timings['metrics_s']:.2f}",
                                   f"{100 * report.timings['metrics_share']:.1f} %"])
        store.close()
    tables = [emit("Evaluation throughput, same examples and adapter, greedy decoding",
                   ["task", "path", "examples/s", "vs sequential", "vs transformers.generate"], rows,
                   key="eval-throughput",
                   notes=f"{torch.get_num_threads()} CPU threads; {repeats} repetition(s) per path in mirrored order, "
                         "summed. The runner and the sequential loop send identical requests through the gateway "
                         "(sentiment answers constrained to the labels); transformers.generate decodes freely. The "
                         "runner's time excludes metric computation, shown below."),
              emit("Share of an eval run's wall time spent computing metrics (all metrics, 2000-resample CIs, "
                   "slices)", ["task", "examples", "generation s", "metrics s", "metrics share"], share_rows,
                   key="eval-metrics-share", notes="Target: < 5 %.")]
    tables.append(_metric_speed(2_000 if quick else 10_000))
    return tables


def _sequential(url: str, target: EvalTarget, task: TaskConfig, examples: list[Example], seed: int) -> float:
    """Seconds to answer every example one request at a time, with the runner's exact request bodies."""
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=300) as client:
        for example in examples:
            response = client.post("/v1/chat/completions", headers={"X-Tuneloop-Purpose": "eval"},
                                   json=request_body(target, task, example, seed))
            response.raise_for_status()
    return time.perf_counter() - started


def _hf_generate(base: Path, adapter: Path, examples: list[Example], system: str, max_tokens: int) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base, padding_side="left")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    model.eval()
    started = time.perf_counter()
    for start in range(0, len(examples), 16):
        batch = examples[start:start + 16]
        prompts = [tokenizer.apply_chat_template(e.chat_messages(system), tokenize=False, add_generation_prompt=True)
                   for e in batch]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return time.perf_counter() - started


def _metric_speed(n: int) -> Table:
    import sacrebleu
    from rouge_score import rouge_scorer

    from tuneloop.evaluators.scoring import score_examples
    from tuneloop.evaluators.statistics import table_interval

    replies = [e.reference for e in chat_sets()["train"]]
    rng = random.Random(3)
    references = [rng.choice(replies) for _ in range(n)]
    predictions = [rng.choice(replies) for _ in range(n)]
    metrics = ["bleu", "chrf", "rouge1", "rouge2", "rougeL", "token_f1"]

    started = time.perf_counter()
    tables = score_examples(metrics, predictions, references)
    ours_scores = time.perf_counter() - started
    started = time.perf_counter()
    for table in tables.values():
        table_interval(table, resamples=1000)
    ours_ci = time.perf_counter() - started

    from tuneloop.evaluators.metrics import token_f1_one

    started = time.perf_counter()
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for prediction, reference in zip(predictions, references, strict=True):
        sacrebleu.sentence_bleu(prediction, [reference])
        sacrebleu.sentence_chrf(prediction, [reference])
        scorer.score(reference, prediction)
        token_f1_one(prediction, reference)
    naive_scores = time.perf_counter() - started
    resamples = 20
    rs = random.Random(4)
    started = time.perf_counter()
    for _ in range(resamples):
        idx = [rs.randrange(n) for _ in range(n)]
        sacrebleu.corpus_bleu([predictions[i] for i in idx], [[references[i] for i in idx]])
    naive_ci_per_resample = (time.perf_counter() - started) / resamples
    rows: list[list[Any]] = [
        ["score 6 metrics (BLEU, chrF, ROUGE-1/2/L, token F1)", f"{ours_scores:.2f}", f"{naive_scores:.2f}",
         f"{naive_scores / ours_scores:.1f}x"],
        ["95 % CIs for all 6 metrics, 1000 resamples each", f"{ours_ci:.2f}",
         f"{naive_ci_per_resample * 1000:.0f} (BLEU alone, extrapolated from {resamples})",
         f"{naive_ci_per_resample * 1000 / ours_ci:.0f}x"],
    ]
    return emit(f"Metric computation for {n:,} prediction/reference pairs (chat replies), seconds",
                ["work", "tuneloop (sufficient statistics)", "naive per-example loop", "speed-up"], rows,
                notes="Naive: one sacrebleu.sentence_bleu / sentence_chrf / RougeScorer.score / token-F1 call per "
                      "pair (a mean of sentence BLEU is not corpus BLEU either); naive CI: corpus_bleu recomputed "
                      "on every resampled corpus. tuneloop: sacrebleu's segment statistics extracted once, "
                      "resamples are weighted sums of them.")
