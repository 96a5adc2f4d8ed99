"""The batch's shared prompt prefix computed once: where it is split, and that the loss and every LoRA gradient
equal those of the unshared forward on the real base model, in float32 and (where the CPU has it) bf16."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.retrain.test_trainer import SYSTEM, _tweets
from tuneloop.hardware import cpu_has_fast_bf16
from tuneloop.retrain.batching import IGNORE_INDEX, collate
from tuneloop.retrain.trainer import MIN_SHARED_PREFIX, reply_loss, split_shared_prefix


def _batch(rows: list[list[int]], first_label: list[int]) -> dict[str, torch.Tensor]:
    from tuneloop.retrain.batching import EncodedExample

    examples = [EncodedExample(ids, [IGNORE_INDEX] * start + ids[start:]) for ids, start in zip(rows, first_label,
                                                                                                strict=True)]
    return collate(examples, pad_id=0)


def test_the_prefix_is_what_every_row_shares_before_any_label() -> None:
    shared = list(range(100, 112))  # 12 tokens every row starts with
    batch = _batch([shared + [1, 2, 3, 4], shared + [5, 6, 7], shared + [1, 9, 9, 9, 9]], [14, 13, 14])
    split = split_shared_prefix(batch)
    assert split is not None
    prefix, rest = split
    assert prefix.tolist() == shared
    assert rest["input_ids"][:, 0].tolist() == [1, 5, 1], "rows keep everything after the prefix, padding too"
    assert rest["labels"].shape == rest["input_ids"].shape == rest["attention_mask"].shape


def test_the_prefix_stops_so_that_its_last_position_predicts_no_label() -> None:
    shared = list(range(100, 112))
    batch = _batch([shared + [1, 2], shared + [3, 4]], [12, 13])  # row 0's reply starts right after the prefix
    split = split_shared_prefix(batch)
    assert split is not None and split[0].shape[0] == 11, "position 11 predicts row 0's first label: not shared"


def test_too_little_shared_or_one_row_is_not_split() -> None:
    short = list(range(MIN_SHARED_PREFIX - 1))
    assert split_shared_prefix(_batch([short + [1, 2], short + [3, 4]], [8, 8])) is None
    assert split_shared_prefix(_batch([list(range(20))], [18])) is None
    assert split_shared_prefix(_batch([[1] + list(range(20)), [2] + list(range(20))], [18, 18])) is None


def _loss_and_grads(model: Any, batch: dict[str, torch.Tensor], *, share: bool,
                    dtype: torch.dtype) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = reply_loss(model, batch, "lora", share_prefix=share)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    return float(loss.detach()), grads


def _dtypes() -> list[Any]:
    return [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        not cpu_has_fast_bf16(), reason="this CPU has no native bf16: training runs float32 here, bf16 not checked"))]


@pytest.mark.integration
@pytest.mark.parametrize("dtype", _dtypes())
def test_the_shared_prefix_gives_the_same_loss_and_lora_gradients(base_model_dir: Path, dtype: torch.dtype) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.retrain.batching import encode_examples

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      init_lora_weights=False))  # non-zero B: every A and B gets a gradient
    model.train()
    batch = collate(encode_examples(tokenizer, _tweets(), SYSTEM, 96), pad_id=tokenizer.pad_token_id or 0)
    split = split_shared_prefix(batch)
    assert split is not None and split[0].shape[0] >= 20, "the templated system turn is shared"

    widths: list[tuple[int, int]] = []  # (rows, tokens) of each decoder call
    decoder: Any = model.get_base_model().model
    decoder.register_forward_pre_hook(
        lambda _m, _a, kwargs: widths.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    shared_loss, shared_grads = _loss_and_grads(model, batch, share=True, dtype=dtype)
    prefix, rest = split
    rows, width = batch["input_ids"].shape
    assert widths == [(1, prefix.shape[0]), (rows, width - prefix.shape[0])], "the prefix ran once, then the rest"
    plain_loss, plain_grads = _loss_and_grads(model, batch, share=False, dtype=dtype)
    assert widths[-1] == (rows, width)

    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    assert shared_loss == pytest.approx(plain_loss, rel=tolerance)
    assert shared_grads.keys() == plain_grads.keys() and len(plain_grads) == 30 * 4 * 2
    worst = max(float((shared_grads[n] - g).norm() / g.norm().clamp_min(1e-12)) for n, g in plain_grads.items())
    assert worst < (1e-3 if dtype == torch.float32 else 0.1), worst
