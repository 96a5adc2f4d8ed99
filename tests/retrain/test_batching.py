from __future__ import annotations

import random
from pathlib import Path

import pytest

from tuneloop.challenger_sets.records import Example, Message
from tuneloop.retrain.batching import IGNORE_INDEX, collate, encode_example, length_grouped_batches


def test_length_grouping_covers_every_example_once_and_cuts_padding() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(10, 120) for _ in range(2000)]
    grouped = length_grouped_batches(lengths, 16, seed=1)
    plain = length_grouped_batches(lengths, 16, seed=1, group_by_length=False)
    for batches in (grouped, plain):
        assert sorted(i for b in batches for i in b) == list(range(2000))

    def padded(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    assert padded(grouped) < 0.7 * padded(plain)
    assert grouped == length_grouped_batches(lengths, 16, seed=1), "seeded"
    assert grouped != length_grouped_batches(lengths, 16, seed=2)


def test_collate_pads_right_and_masks_padding() -> None:
    from tuneloop.retrain.batching import EncodedExample

    batch = collate([EncodedExample([1, 2, 3], [IGNORE_INDEX, 2, 3]), EncodedExample([4], [4])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.integration
def test_loss_is_only_on_the_assistant_reply(base_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    example = Example(id="a", messages=[Message(role="user", content="hi there"),
                                        Message(role="assistant", content="hello"),
                                        Message(role="user", content="how are you?")], reference="fine thanks")
    encoded = encode_example(tokenizer, example, "Be brief.", max_len=256)
    reply = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(reply) == "fine thanks<|im_end|>"
    prompt = tokenizer.decode(encoded.input_ids[: encoded.labels.index(reply[0])])
    assert isinstance(prompt, str)
    assert prompt.startswith("<|im_start|>system\nBe brief.") and prompt.endswith("<|im_start|>assistant\n")
    short = encode_example(tokenizer, example, "Be brief.", max_len=24)
    assert short.length <= 24 and any(label != IGNORE_INDEX for label in short.labels)



def _one_call_per_example(tokenizer: object, example: Example, system_prompt: str) -> tuple[list[int], list[int]]:
    """The prompt and full ids as `apply_chat_template(tokenize=True)` makes them, one conversation at a time:
    what the batched path must reproduce."""
    from tuneloop.retrain.batching import _as_ids

    messages = example.chat_messages(system_prompt)
    prompt = _as_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))  # type: ignore[attr-defined]
    full = _as_ids(tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        [*messages, {"role": "assistant", "content": example.reference}], tokenize=True))
    return prompt, full


@pytest.mark.integration
def test_batched_encoding_gives_the_ids_one_template_call_per_example_gives(base_model_dir: Path,
                                                                          embedded_sets: dict[str, list]) -> None:
    from transformers import AutoTokenizer

    from tuneloop.retrain.batching import encode_examples

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    rng = random.Random(0)
    train = {task: next(b.examples for b in built if b.name == "train") for task, built in embedded_sets.items()}
    sample = rng.sample(train["sentiment"], 300) + rng.sample(train["chat"], 100)
    batched = encode_examples(tokenizer, sample, "Be brief.", max_len=64)
    for example, encoded in zip(sample, batched, strict=True):
        prompt, full = _one_call_per_example(tokenizer, example, "Be brief.")
        if len(full) <= 64 and full[: len(prompt)] == prompt:
            reply = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE_INDEX]
            assert encoded.input_ids[: len(prompt)] == prompt, example.id
            assert full[len(prompt):][: len(reply)] == reply, example.id
        assert encoded == encode_example(tokenizer, example, "Be brief.", max_len=64), example.id
    assert any(e.length == 64 for e in batched), "the sample includes truncated chat examples"
