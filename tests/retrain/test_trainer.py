"""Real training on the real base model, sized to run in about a minute on two cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import small_train_config
from tuneloop.challenger_sets.records import Example
from tuneloop.retrain.batching import collate, encode_example

SYSTEM = "Classify the sentiment of the tweet. Answer with exactly one word: negative, neutral or positive."


def _tweets() -> list[Example]:
    texts = [("@united lost my bag again, worst airline", "negative"),
             ("@JetBlue thank you, lovely crew!", "positive"),
             ("@Delta flight 123 departs at 5pm", "neutral"), ("@united delayed 4 hours, no help", "negative"),
             ("@SouthwestAir best landing ever, thanks", "positive"), ("@AmericanAir is the gate B12?", "neutral"),
             ("@USAirways rude staff and broken seats", "negative"),
             ("@VirginAmerica love the mood lighting", "positive")]
    return [Example(id=str(i), input=t, reference=label) for i, (t, label) in enumerate(texts)]


def _mean_loss(model: object, examples: list[Example], tokenizer: object) -> float:
    batch = collate([encode_example(tokenizer, e, SYSTEM, 96) for e in examples], pad_id=2)
    with torch.no_grad():
        return float(model(**batch).loss)  # type: ignore[operator]


@pytest.mark.integration
@pytest.mark.slow
def test_a_few_lora_steps_lower_the_loss_and_change_the_outputs(base_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.retrain.trainer import fit

    examples = _tweets()
    recipe = small_train_config(max_steps=6, learning_rate=2e-3, eval_every=3)
    result = fit(base_model_dir, examples, examples[:2], system_prompt=SYSTEM, train=recipe,
                 output_dir=tmp_path / "adapter", progress=False)
    assert result.steps == 6 and len(result.curve) == 6
    assert 0 < result.trainable_params < 0.01 * result.total_params, "LoRA trains under 1 % of the parameters"
    assert result.train_tokens < result.padded_tokens + 1
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and set(adapter_config["target_modules"]) == {"q_proj", "k_proj", "v_proj",
                                                                                    "o_proj"}

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32).eval()
    before = _mean_loss(base, examples, tokenizer)
    inputs = collate([encode_example(tokenizer, examples[0], SYSTEM, 96)], pad_id=2)
    with torch.no_grad():
        base_logits = base(input_ids=inputs["input_ids"]).logits
    tuned = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    after = _mean_loss(tuned, examples, tokenizer)
    with torch.no_grad():
        tuned_logits = tuned(input_ids=inputs["input_ids"]).logits
    assert after < before * 0.8, f"training loss did not drop: {before:.3f} -> {after:.3f}"
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-3)


@pytest.mark.integration
@pytest.mark.slow
def test_prompt_tuning_and_full_share_the_loop(base_model_dir: Path, tmp_path: Path) -> None:
    from tuneloop.retrain.trainer import fit

    examples = _tweets()
    prompt = fit(base_model_dir, examples, [], system_prompt=SYSTEM,
                 train=small_train_config(method="prompt-tuning", max_steps=1, num_virtual_tokens=4),
                 output_dir=tmp_path / "pt", progress=False)
    assert prompt.trainable_params == 4 * 576
    assert (tmp_path / "pt" / "adapter_config.json").exists()
    full = fit(base_model_dir, examples, [], system_prompt=SYSTEM,
               train=small_train_config(method="full", max_steps=1, learning_rate=1e-5),
               output_dir=tmp_path / "full", progress=False)
    assert full.trainable_params == full.total_params
    assert (tmp_path / "full" / "config.json").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_best_validation_loss_is_the_minimum_of_the_curve(base_model_dir: Path, tmp_path: Path) -> None:
    from tuneloop.retrain.trainer import fit

    examples = _tweets()
    recipe = small_train_config(max_steps=4, learning_rate=5e-3, eval_every=1, patience=10)
    result = fit(base_model_dir, examples[2:], examples[:2], system_prompt=SYSTEM, train=recipe,
                 output_dir=tmp_path / "a", progress=False)
    val = [p.val_loss for p in result.curve if p.val_loss is not None]
    assert len(val) == 4 and result.best_val_loss == min(val)


def test_early_stopping_counts_validations_without_improvement() -> None:
    from tuneloop.retrain.trainer import EarlyStopping

    stopper = EarlyStopping(patience=2)
    assert stopper.update(1.0) and not stopper.should_stop
    assert not stopper.update(1.0) and not stopper.should_stop
    assert stopper.update(0.5) and stopper.bad_evals == 0
    assert not stopper.update(0.7) and not stopper.update(0.6)
    assert stopper.should_stop and stopper.best == 0.5
