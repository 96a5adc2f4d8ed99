"""Score a classification task by label likelihood with transformers: the label the model finds most likely.

Used to compare the base model's zero-/few-shot ability fairly with tuned adapters (free generation from a
135M base model rarely answers with a label at all) and by the benchmarks. Each label must be a single token in
the model's vocabulary, so one forward pass per example decides it.

Every prompt of one run shares a prefix (system prompt, the few-shot examples, the opening of the user turn), so
the prefix is run once and its key/value cache reused for every batch; only each example's own tokens are
computed, and vocabulary logits only at the answer position for the label tokens. The suffix tokens always come
from tokenizing the *whole* prompt, so the result is the same as scoring the full prompt (tested).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from tuneloop.challenger_sets.records import Example

ShotFormat = Literal["turns", "message"]
SHOT_FORMATS: tuple[ShotFormat, ...] = ("turns", "message")
_QUERY = "\u2063TUNELOOP-QUERY\u2063"  # stands for the example's text while the shared prefix is rendered


@dataclass(frozen=True)
class LabelScores:
    """Predicted label per example and the model's log-probabilities of each label there."""

    predictions: list[str]
    log_probs: torch.Tensor  # (n, len(labels)), log-softmax over the whole vocabulary


def label_token_ids(tokenizer: Any, labels: Sequence[str]) -> list[int]:
    ids = []
    for label in labels:
        tokens = tokenizer(label, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(f"label '{label}' is {len(tokens)} tokens; label-likelihood scoring needs one token")
        ids.append(tokens[0])
    return ids


def prompt_messages(system_prompt: str, query: str, shots: Sequence[Example] = (),
                    shot_format: ShotFormat = "turns") -> list[dict[str, str]]:
    """The chat a model sees: shots as earlier user/assistant turns, or listed inside the one user message.

    In the `message` format the query sits on its own line after the list, so the text before it (shared by
    every example) ends with a newline and tokenizes the same alone as in the whole prompt.
    """
    messages = [{"role": "system", "content": system_prompt}]
    if shot_format == "turns" or not shots:
        for shot in shots:
            messages += [{"role": "user", "content": shot.last_user_text()},
                         {"role": "assistant", "content": shot.reference}]
        return [*messages, {"role": "user", "content": query}]
    lines = "\n".join(f"{' '.join(shot.last_user_text().split())} => {shot.reference}" for shot in shots)
    return [*messages, {"role": "user", "content": f"Labelled examples:\n{lines}\n\nNow the tweet to classify:\n"
                                                   f"{query}"}]


def _split_template(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, str]:
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    parts = rendered.split(_QUERY)
    if len(parts) != 2:
        raise ValueError("the chat template repeats or drops the query; cannot share a prefix")
    return parts[0], parts[1]


def _decoder_and_head(model: Any) -> tuple[Any, Any]:
    """The decoder stack and the vocabulary head under any architecture's names (Llama `model`/`lm_head`,
    GPT-NeoX `gpt_neox`/`embed_out`)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm.base_model, causal_lm.get_output_embeddings()


def _device(model: Any) -> torch.device:
    """Inputs go where the model's weights are (a GPU when the caller put it there)."""
    device: torch.device = next(model.parameters()).device
    return device


@torch.no_grad()
def score_labels(model: Any, tokenizer: Any, examples: Sequence[Example], *, system_prompt: str,
                 labels: Sequence[str], shots: Sequence[Example] = (), shot_format: ShotFormat = "turns",
                 batch_size: int = 16, share_prefix: bool = True) -> LabelScores:
    """Log-probabilities of each label after each example's prompt, and the most likely label.

    `share_prefix=False` scores every full prompt from scratch (the reference the cached path is tested against;
    also what prompt-tuning models need, since PEFT prepends their virtual tokens inside its own forward).
    """
    if not examples:
        return LabelScores([], torch.zeros((0, len(labels))))
    ids = torch.tensor(label_token_ids(tokenizer, labels))
    prefix_text, suffix_text = _split_template(tokenizer, prompt_messages(system_prompt, _QUERY, shots,
                                                                          shot_format))
    prefix_ids = list(tokenizer(prefix_text, add_special_tokens=False)["input_ids"])
    is_prompt_tuning = getattr(getattr(model, "peft_config", {}).get("default"), "num_virtual_tokens", None)
    share_prefix = share_prefix and not is_prompt_tuning
    model.eval()
    full = [list(tokenizer(prefix_text + _query_text(e, shot_format) + suffix_text,
                           add_special_tokens=False)["input_ids"]) for e in examples]
    cached = [share_prefix and f[:len(prefix_ids)] == prefix_ids and len(f) > len(prefix_ids) for f in full]
    log_probs = torch.zeros((len(examples), len(labels)))
    prefix_cache = _run_prefix(model, prefix_ids) if any(cached) else None
    for use_cache in (True, False):
        rows = [i for i in range(len(examples)) if cached[i] == use_cache]
        # Similar lengths in a batch waste less padding; the order of results is restored by index.
        rows.sort(key=lambda i: len(full[i]))
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            offset = len(prefix_ids) if use_cache else 0
            suffixes = [full[i][offset:] for i in chunk]
            scores = (_batch_with_prefix(model, prefix_cache, offset, suffixes, ids) if use_cache
                      else _batch_full(model, suffixes, ids, tokenizer))
            log_probs[chunk] = scores
    predictions = [labels[int(i)] for i in log_probs.argmax(dim=-1)]
    return LabelScores(predictions, log_probs)


def predict_labels(model: Any, tokenizer: Any, examples: Sequence[Example], *, system_prompt: str,
                   labels: Sequence[str], shots: Sequence[Example] = (), shot_format: ShotFormat = "turns",
                   batch_size: int = 16) -> list[str]:
    """The most likely label for each example."""
    return score_labels(model, tokenizer, examples, system_prompt=system_prompt, labels=labels, shots=shots,
                        shot_format=shot_format, batch_size=batch_size).predictions


def _query_text(example: Example, shot_format: ShotFormat) -> str:
    text = example.last_user_text()
    return " ".join(text.split()) if shot_format == "message" else text


def _run_prefix(model: Any, prefix_ids: list[int]) -> Any:
    from transformers import DynamicCache

    decoder, _ = _decoder_and_head(model)
    cache = DynamicCache()
    decoder(input_ids=torch.tensor([prefix_ids], device=_device(model)), past_key_values=cache, use_cache=True)
    return cache


def _batch_with_prefix(model: Any, prefix_cache: Any, prefix_len: int, suffixes: list[list[int]],
                       label_ids: torch.Tensor) -> torch.Tensor:
    decoder, head = _decoder_and_head(model)
    batch = len(suffixes)
    width = max(len(s) for s in suffixes)
    input_ids = torch.zeros((batch, width), dtype=torch.long)
    attention = torch.zeros((batch, prefix_len + width), dtype=torch.long)
    attention[:, :prefix_len] = 1
    for row, tokens in enumerate(suffixes):
        input_ids[row, :len(tokens)] = torch.tensor(tokens)
        attention[row, prefix_len:prefix_len + len(tokens)] = 1
    cache = copy.deepcopy(prefix_cache)
    cache.batch_repeat_interleave(batch)
    positions = (prefix_len + torch.arange(width)).unsqueeze(0).expand(batch, -1)
    device = _device(model)
    hidden = decoder(input_ids=input_ids.to(device), attention_mask=attention.to(device), past_key_values=cache,
                     position_ids=positions.to(device), use_cache=True).last_hidden_state
    last = hidden[torch.arange(batch, device=device), torch.tensor([len(s) - 1 for s in suffixes], device=device)]
    return torch.log_softmax(head(last).float(), dim=-1).cpu()[:, label_ids]


def _batch_full(model: Any, prompts: list[list[int]], label_ids: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, tokens in enumerate(prompts):
        input_ids[row, :len(tokens)] = torch.tensor(tokens)
        attention[row, :len(tokens)] = 1
    device = _device(model)
    logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.cpu()
    # Prompt tuning prepends virtual tokens to the sequence; right padding keeps positions exact.
    offset = logits.shape[1] - width
    last = torch.tensor([offset + len(p) - 1 for p in prompts])
    return torch.log_softmax(logits[torch.arange(len(prompts)), last].float(), dim=-1)[:, label_ids]


CONTENT_FREE_INPUTS = ("N/A", "[MASK]", "-")


@torch.no_grad()
def content_free_log_probs(model: Any, tokenizer: Any, *, system_prompt: str, labels: Sequence[str],
                           shots: Sequence[Example] = (), shot_format: ShotFormat = "turns") -> torch.Tensor:
    """The prompt's own bias: mean label log-probabilities for inputs that carry no content (Zhao et al. 2021,
    "Calibrate before use"). A few-shot prompt often prefers the label of its last shot or its majority label
    whatever the input says; subtracting this bias (`calibrate`) removes that preference."""
    probes = [Example(id=f"content-free-{i}", input=text, reference=labels[0])
              for i, text in enumerate(CONTENT_FREE_INPUTS)]
    scores = score_labels(model, tokenizer, probes, system_prompt=system_prompt, labels=labels, shots=shots,
                          shot_format=shot_format, share_prefix=False)
    return torch.log_softmax(scores.log_probs, dim=-1).mean(dim=0)


def calibrate(scores: LabelScores, bias: torch.Tensor, labels: Sequence[str]) -> list[str]:
    """Predictions after dividing each label's probability by its content-free probability."""
    adjusted = torch.log_softmax(scores.log_probs, dim=-1) - bias
    return [labels[int(i)] for i in adjusted.argmax(dim=-1)]
