"""Training throughput: real (non-padding) tokens per second, tuneloop's loop vs a plain HF Trainer + PEFT.

Same base model, same LoRA recipe, same examples, same number of steps and batch size, same machine, one run.
Baseline: `transformers.Trainer` with the common tutorial recipe of padding every example to `max_seq_len`.
The ablation row (tuneloop's loop without length grouping, padding each random batch to its longest example)
shows how much of the gain is dynamic padding and how much is grouping.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.setup import base_model_path, sentiment_sets
from bench.tables import emit
from retrain.batching import collate, encode_example
from retrain.trainer import fit, load_model_for_method
from tuneloop.config import Config, TrainConfig


def run(*, quick: bool = False) -> str:
    steps = 3 if quick else 8
    config = Config()
    task = config.tasks["sentiment"]
    recipe = task.train.model_copy(update={"max_steps": steps, "eval_every": 10_000, "batch_size": 16})
    examples = random.Random(0).sample(sentiment_sets()["train"], 16 * steps * 4)
    base = base_model_path()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, grouped in (("tuneloop loop, length-grouped batches", True),
                               ("tuneloop loop, random batches padded to longest (ablation)", False)):
            result = fit(base, examples, [], system_prompt=task.system_prompt,
                         train=recipe.model_copy(update={"group_by_length": grouped}),
                         output_dir=Path(tmp) / label[:8], progress=False)
            rows.append((label, result.train_tokens, result.padded_tokens, result.train_seconds))
        rows.append(("HF Trainer + PEFT, padding='max_length' (baseline)",
                     *_hf_trainer(base, examples, task.system_prompt, recipe, Path(tmp) / "hf")))
    baseline = rows[-1][1] / rows[-1][3]
    table = [[label, steps, real, padded, f"{real / padded:.0%}", f"{seconds:.1f}", f"{real / seconds:.0f}",
              f"{(real / seconds) / baseline:.2f}x"] for label, real, padded, seconds in rows]
    return emit(f"Training throughput, LoRA r={recipe.rank} {'+'.join(recipe.target_modules)}, batch 16, "
                f"{steps} steps, max_seq_len {recipe.max_seq_len}, sentiment tweets, {torch.get_num_threads()} "
                "threads",
                ["run", "steps", "real tokens", "tokens incl. padding", "real share", "train s", "real tok/s",
                 "vs baseline"], table,
                notes="real tok/s counts only non-padding tokens; train s excludes model loading and tokenization.")


def _hf_trainer(base: Path, examples: list[Any], system_prompt: str, recipe: TrainConfig,
                out: Path) -> tuple[int, int, float]:
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(base)
    pad_id = tokenizer.pad_token_id
    encoded = [encode_example(tokenizer, e, system_prompt, recipe.max_seq_len) for e in examples]
    counted = {"real": 0, "padded": 0}

    def pad_to_max_length(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from retrain.batching import IGNORE_INDEX, EncodedExample

        width = recipe.max_seq_len
        items = [EncodedExample(b["input_ids"], b["labels"]) for b in batch]
        tensors = collate(items, pad_id)
        extra = width - tensors["input_ids"].shape[1]
        if extra > 0:
            n = len(items)
            tensors["input_ids"] = torch.cat([tensors["input_ids"], torch.full((n, extra), pad_id)], dim=1)
            tensors["labels"] = torch.cat([tensors["labels"], torch.full((n, extra), IGNORE_INDEX)], dim=1)
            tensors["attention_mask"] = torch.cat([tensors["attention_mask"], torch.zeros((n, extra),
                                                                                          dtype=torch.long)], dim=1)
        counted["real"] += int(tensors["attention_mask"].sum())
        counted["padded"] += tensors["input_ids"].numel()
        return tensors

    model = load_model_for_method(base, recipe, system_prompt)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=recipe.batch_size,
                             max_steps=recipe.max_steps, learning_rate=recipe.learning_rate, report_to=[],
                             use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             remove_unused_columns=False, seed=recipe.seed, dataloader_num_workers=0)
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=pad_to_max_length)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return counted["real"], counted["padded"], seconds
