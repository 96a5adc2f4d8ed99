"""Score a classification task by label likelihood with transformers: the label the model finds most likely.

Used to compare the base model's zero-/few-shot ability fairly with tuned adapters (free generation from a
135M base model rarely answers with a label at all) and by the foundation benchmarks before serving exists.
Each label must be a single token in the model's vocabulary, so one forward pass per example decides it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from challenger_sets.records import Example


def label_token_ids(tokenizer: Any, labels: Sequence[str]) -> list[int]:
    ids = []
    for label in labels:
        tokens = tokenizer(label, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(f"label '{label}' is {len(tokens)} tokens; label-likelihood scoring needs one token")
        ids.append(tokens[0])
    return ids


def few_shot_messages(shots: Sequence[Example]) -> list[dict[str, str]]:
    turns: list[dict[str, str]] = []
    for shot in shots:
        turns.append({"role": "user", "content": shot.last_user_text()})
        turns.append({"role": "assistant", "content": shot.reference})
    return turns


@torch.no_grad()
def predict_labels(model: Any, tokenizer: Any, examples: Sequence[Example], *, system_prompt: str,
                   labels: Sequence[str], shots: Sequence[Example] = (), batch_size: int = 16) -> list[str]:
    """The most likely label for each example (right-padded batches, one forward pass each)."""
    ids = torch.tensor(label_token_ids(tokenizer, labels))
    prefix = [{"role": "system", "content": system_prompt}, *few_shot_messages(shots)]
    prompts = [tokenizer.apply_chat_template(prefix + e.chat_messages()[-1:], add_generation_prompt=True,
                                             tokenize=False) for e in examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    predictions: list[str] = []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start:start + batch_size]]
        width = max(len(x) for x in encoded)
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, tokens in enumerate(encoded):
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
            attention[row, : len(tokens)] = 1
        all_logits = model(input_ids=input_ids, attention_mask=attention).logits
        # Prompt tuning prepends virtual tokens to the sequence; right padding keeps positions exact.
        offset = all_logits.shape[1] - width
        last = torch.tensor([offset + len(tokens) - 1 for tokens in encoded])
        logits = all_logits[torch.arange(len(encoded)), last]
        best = logits[:, ids].argmax(dim=-1)
        predictions.extend(labels[int(i)] for i in best)
    return predictions
