"""The training loop shared by LoRA, prompt tuning and full fine-tuning.

A plain PyTorch loop rather than `transformers.Trainer`: batches grouped by length (see `batching.py`), the
batch's shared prompt prefix computed once (`split_shared_prefix`), bf16 autocast on CPU, validation loss every
`eval_every` steps with early stopping that restores the best weights, a progress bar, and exact counts of the real
(non-padding) tokens processed.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tuneloop.challenger_sets.records import Example
from tuneloop.config import TrainConfig
from tuneloop.errors import TrainingError
from tuneloop.hardware import Placement, torch_placement
from tuneloop.modelinfo import resolve_targets
from tuneloop.registry import CurvePoint
from tuneloop.retrain.batching import (
    IGNORE_INDEX,
    EncodedExample,
    collate,
    encode_examples,
    length_grouped_batches,
)

MIN_SHARED_PREFIX = 8  # tokens: below this the second forward costs more than the prefix saves


@dataclass
class FitResult:
    """What a training run produced, for the adapter card and the benchmarks."""

    output_dir: Path
    curve: list[CurvePoint]
    steps: int
    stopped_early: bool
    best_val_loss: float | None
    trainable_params: int
    total_params: int
    train_tokens: int
    padded_tokens: int
    train_seconds: float
    first_loss: float | None = None
    last_loss: float | None = None
    truncated: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds else 0.0


@dataclass
class EarlyStopping:
    """Tracks the best validation loss; says when `patience` validations in a row failed to improve it."""

    patience: int
    min_delta: float = 1e-4
    best: float = math.inf
    bad_evals: int = 0

    def update(self, val_loss: float) -> bool:
        """Record a validation loss; True if it is a new best (the caller snapshots the weights)."""
        if val_loss < self.best - self.min_delta:
            self.best, self.bad_evals = val_loss, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_evals >= self.patience


def placement(train: TrainConfig) -> Placement:
    return torch_placement(train.device, train.bf16)


def use_bf16(train: TrainConfig) -> bool:
    return placement(train).bf16


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def load_model_for_method(base_path: Path, train: TrainConfig, system_prompt: str,
                          init_adapter: Path | None = None) -> Any:
    """The base model wrapped for `train.method`: a PEFT LoRA or prompt-tuning model, or the full model.
    `init_adapter` continues training a saved LoRA adapter instead of starting a fresh one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model.config.use_cache = False
    if train.method == "full":
        return model
    from peft import LoraConfig, PeftModel, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    if init_adapter is not None:
        if train.method != "lora":
            raise TrainingError(f"continuing from an adapter needs method lora, not {train.method}")
        return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)

    if train.method == "lora":
        targets = resolve_targets(base_path, train.target_modules, where="train.target_modules")
        peft_config: Any = LoraConfig(task_type=TaskType.CAUSAL_LM, r=train.rank, lora_alpha=train.alpha,  # type: ignore[arg-type]
                                      lora_dropout=train.dropout, target_modules=targets)
    else:
        peft_config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=train.num_virtual_tokens,
                                         prompt_tuning_init=PromptTuningInit.TEXT,
                                         prompt_tuning_init_text=system_prompt,
                                         tokenizer_name_or_path=str(base_path))
    return get_peft_model(model, peft_config)


@dataclass(frozen=True)
class StepInfo:
    """Handed to `fit`'s `on_step` after every optimizer step (and validation, if one ran)."""

    step: int
    elapsed_s: float = field(metadata={"help": "Wall time since the loop started: steps, validation, batching."})
    train_seconds: float
    model: Any


def fit(base_path: Path, train_examples: list[Example], val_examples: list[Example], *, system_prompt: str,
        train: TrainConfig, output_dir: Path, max_steps: int | None = None, progress: bool = True,
        on_step: Callable[[StepInfo], bool] | None = None, init_adapter: Path | None = None) -> FitResult:
    """Train on `train_examples`, validate on `val_examples`, save the best weights to `output_dir`.

    `on_step` sees the model after each step (e.g. to snapshot it at time budgets); returning True stops training
    there, as early stopping does.
    """
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    steps = max_steps or train.max_steps
    if steps < 1:
        raise TrainingError(f"max_steps must be at least 1, got {steps}")
    if not train_examples:
        raise TrainingError("no training examples")
    set_seed(train.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = encode_examples(tokenizer, train_examples, system_prompt, train.max_seq_len)
    truncated = sum(1 for e in encoded if e.length >= train.max_seq_len)
    val_encoded = encode_examples(tokenizer, val_examples, system_prompt, train.max_seq_len)
    where = placement(train)
    model = load_model_for_method(base_path, train, system_prompt, init_adapter).to(where.device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    bf16 = where.bf16
    autocast = torch.autocast(where.device, dtype=torch.bfloat16, enabled=bf16)

    curve: list[CurvePoint] = []
    stopper = EarlyStopping(train.patience)
    best_state: dict[str, torch.Tensor] | None = None
    stopped_early = False
    real_tokens = padded_tokens = 0
    train_seconds = 0.0
    first_loss = last_loss = None
    epoch = 0
    batches: list[list[int]] = []
    bar = _progress(steps, progress, f"train {train.method}")
    step = 0
    loop_started = time.perf_counter()
    while step < steps:
        if not batches:
            batches = length_grouped_batches([e.length for e in encoded], train.batch_size, train.seed + epoch,
                                             group_by_length=train.group_by_length)
            epoch += 1
        batch_examples = [encoded[i] for i in batches.pop(0)]
        batch = {k: v.to(where.device) for k, v in collate(batch_examples, pad_id).items()}
        started = time.perf_counter()
        with autocast:
            loss = reply_loss(model, batch, train.method, share_prefix=train.share_prefix)
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became {loss.item()} at step {step + 1}; lower train.learning_rate "
                                f"(now {train.learning_rate})")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - started
        step += 1
        real_tokens += int(batch["attention_mask"].sum())
        padded_tokens += batch["input_ids"].numel()
        value = float(loss.detach())
        first_loss = value if first_loss is None else first_loss
        last_loss = value
        point = CurvePoint(step=step, train_loss=round(value, 5))
        if val_encoded and (step % train.eval_every == 0 or step == steps):
            point.val_loss = round(validation_loss(model, val_encoded, pad_id, train.batch_size, where,
                                                     train.method, share_prefix=train.share_prefix), 5)
            if stopper.update(point.val_loss):
                best_state = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        curve.append(point)
        bar.set_postfix(loss=f"{value:.3f}", val=f"{stopper.best:.3f}" if stopper.best < math.inf else "-",
                        tok_s=f"{real_tokens / max(train_seconds, 1e-9):.0f}")
        bar.update(1)
        if stopper.should_stop:
            stopped_early = True
            break
        if on_step is not None and on_step(StepInfo(step, time.perf_counter() - loop_started, train_seconds, model)):
            break
    bar.close()
    if best_state is not None:
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, weights in best_state.items():
                named[name].copy_(weights)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(output_dir, safe_serialization=True)
    if train.method == "full":
        tokenizer.save_pretrained(output_dir)
    return FitResult(output_dir=output_dir, curve=curve, steps=step, stopped_early=stopped_early,
                     best_val_loss=None if stopper.best == math.inf else stopper.best, trainable_params=trainable,
                     total_params=total, train_tokens=real_tokens, padded_tokens=padded_tokens,
                     train_seconds=train_seconds, first_loss=first_loss, last_loss=last_loss, truncated=truncated,
                     extra={"bf16": bf16}, device=where.device, precision=where.precision)


def reply_loss(model: Any, batch: dict[str, torch.Tensor], method: str, *,
               share_prefix: bool = True) -> torch.Tensor:
    """Mean cross-entropy over the reply tokens, computing vocabulary logits only where a label is.

    A tweet's label is 2 of ~55 tokens; projecting every position onto the 49k-token vocabulary (and holding
    those logits for the backward pass) was about a fifth of a step. The batch's shared prompt prefix (the
    chat template's system turn: 28 of ~65 tokens for a tweet) runs once, not once per example. Prompt tuning
    prepends virtual tokens inside PEFT's own forward, so it keeps the standard path.
    """
    if method == "prompt-tuning":
        loss: torch.Tensor = model(**batch).loss
        return loss
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    # `base_model` is the decoder stack under any architecture's prefix (Llama `model`, GPT-NeoX `gpt_neox`),
    # the output embeddings its vocabulary head (`lm_head`, `embed_out`).
    split = split_shared_prefix(batch) if share_prefix else None
    if split is None:
        hidden = causal_lm.base_model(input_ids=batch["input_ids"],
                                      attention_mask=batch["attention_mask"]).last_hidden_state
    else:
        prefix, batch = split
        hidden = _hidden_after_prefix(causal_lm.base_model, prefix, batch)
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][mask])
    return torch.nn.functional.cross_entropy(logits.float(), targets[mask])


def split_shared_prefix(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """The prompt tokens every example of the batch starts with, and the batch without them; None when under
    MIN_SHARED_PREFIX tokens are shared.

    Every example of a task begins with the same templated system turn, and under a causal mask those positions
    see nothing after them: their keys and values are the same for every example, so they are computed once and
    broadcast, and autograd sums their gradients over the batch. The losses and gradients equal the unshared
    ones up to float rounding (tests/retrain/test_shared_prefix.py). The prefix stops before the first label
    and leaves at least one token of every example, so every loss position stays in the rest."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    if ids.shape[0] < 2:
        return None
    shared = (ids == ids[:1]).all(0) & (labels == IGNORE_INDEX).all(0) & mask.bool().all(0)
    length = int(shared.long().cumprod(0).sum())
    length = min(length, int(mask.sum(1).min()) - 1)
    labelled = labels != IGNORE_INDEX
    first_label = torch.where(labelled.any(1), labelled.long().argmax(1), labels.shape[1])
    length = min(length, int(first_label.min()) - 1)  # the prefix's last position predicts no label
    if length < MIN_SHARED_PREFIX:
        return None
    return ids[0, :length], {k: v[:, length:] for k, v in batch.items()}


def _hidden_after_prefix(decoder: Any, prefix: torch.Tensor, rest: dict[str, torch.Tensor]) -> torch.Tensor:
    """The decoder's last hidden states of `rest`, each row continuing the one shared `prefix`."""
    from transformers import DynamicCache

    rows = rest["input_ids"].shape[0]
    cache = decoder(input_ids=prefix[None], use_cache=True).past_key_values
    shared = DynamicCache()
    for index, layer in enumerate(cache.layers):
        shared.update(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1), index)
    mask = torch.cat([rest["attention_mask"].new_ones(rows, prefix.shape[0]), rest["attention_mask"]], dim=1)
    out = decoder(input_ids=rest["input_ids"], attention_mask=mask, past_key_values=shared, use_cache=True)
    hidden: torch.Tensor = out.last_hidden_state
    return hidden


@torch.no_grad()
def validation_loss(model: Any, examples: list[EncodedExample], pad_id: int, batch_size: int,
                    where: Placement, method: str = "lora", *, share_prefix: bool = True) -> float:
    """Token-weighted mean loss over the reply tokens of `examples`."""
    was_training = model.training
    model.eval()
    total_loss = 0.0
    total_tokens = 0
    order = sorted(range(len(examples)), key=lambda i: examples[i].length)
    for start in range(0, len(order), batch_size):
        batch = {k: v.to(where.device)
                 for k, v in collate([examples[i] for i in order[start:start + batch_size]], pad_id).items()}
        with torch.autocast(where.device, dtype=torch.bfloat16, enabled=where.bf16):
            loss = reply_loss(model, batch, method, share_prefix=share_prefix)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total_loss += float(loss) * n
        total_tokens += n
    if was_training:
        model.train()
    return total_loss / max(total_tokens, 1)


def _progress(total: int, enabled: bool, description: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, disable=not enabled, unit="step", dynamic_ncols=True)
