"""Label-likelihood scoring on the real base model: the shared-prefix cache gives the scores of the full prompt,
for zero-shot and few-shot prompts in both formats, for the base model and a LoRA model; calibration removes a
prompt's own bias."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tuneloop.challenger_sets.records import Example
from tuneloop.config import Config
from tuneloop.evaluators.few_shot import FewShotVariant, draw_shots
from tuneloop.evaluators.label_likelihood import calibrate, content_free_log_probs, label_token_ids, score_labels

pytestmark = [pytest.mark.integration]
TASK = Config().tasks["sentiment"]


@pytest.fixture(scope="module")
def model_and_tokenizer(base_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(base_model_dir))


@pytest.fixture(scope="module")
def tweets(embedded_sets) -> tuple[list[Example], list[Example]]:
    sets = {built.name: built.examples for built in embedded_sets["sentiment"]}
    return random.Random(0).sample(sets["heldout"], 12), sets["train"]


@pytest.mark.parametrize(("k", "shot_format"), [(0, "turns"), (3, "turns"), (3, "message")])
def test_the_shared_prefix_gives_the_full_prompts_scores(model_and_tokenizer, tweets, k, shot_format):
    model, tokenizer = model_and_tokenizer
    examples, train = tweets
    shots = draw_shots(train, TASK.labels, FewShotVariant(max(k, 3), "balanced", shot_format), seed=0)[:k]
    cached = score_labels(model, tokenizer, examples, system_prompt=TASK.system_prompt, labels=TASK.labels,
                          shots=shots, shot_format=shot_format, batch_size=5)
    full = score_labels(model, tokenizer, examples, system_prompt=TASK.system_prompt, labels=TASK.labels,
                        shots=shots, shot_format=shot_format, share_prefix=False)
    torch.testing.assert_close(cached.log_probs, full.log_probs, atol=1e-3, rtol=1e-4)
    assert cached.predictions == full.predictions


def test_scores_are_the_models_log_probabilities_of_the_label_tokens(model_and_tokenizer, tweets):
    model, tokenizer = model_and_tokenizer
    example = tweets[0][0]
    scores = score_labels(model, tokenizer, [example], system_prompt=TASK.system_prompt, labels=TASK.labels)
    ids = tokenizer.apply_chat_template(example.chat_messages(TASK.system_prompt), add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        expected = torch.log_softmax(model(**ids).logits[0, -1], dim=-1)[label_token_ids(tokenizer, TASK.labels)]
    torch.testing.assert_close(scores.log_probs[0], expected, atol=1e-4, rtol=1e-4)
    assert scores.predictions[0] == TASK.labels[int(expected.argmax())]


def test_a_lora_model_is_scored_through_its_adapter(model_and_tokenizer, tweets, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base, tokenizer = model_and_tokenizer
    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base.name_or_path, dtype=torch.float32),
                          LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path)
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base.name_or_path, dtype=torch.float32),
                                     tmp_path).eval()
    examples = tweets[0][:6]
    with_adapter = score_labels(lora, tokenizer, examples, system_prompt=TASK.system_prompt, labels=TASK.labels)
    full = score_labels(lora, tokenizer, examples, system_prompt=TASK.system_prompt, labels=TASK.labels,
                        share_prefix=False)
    without = score_labels(base, tokenizer, examples, system_prompt=TASK.system_prompt, labels=TASK.labels)
    torch.testing.assert_close(with_adapter.log_probs, full.log_probs, atol=1e-3, rtol=1e-4)
    assert (with_adapter.log_probs - without.log_probs).abs().max() > 0.1, "the adapter was not applied"


def test_calibration_removes_the_prompts_bias(model_and_tokenizer, tweets):
    model, tokenizer = model_and_tokenizer
    bias = content_free_log_probs(model, tokenizer, system_prompt=TASK.system_prompt, labels=TASK.labels)
    assert bias.shape == (3,) and torch.isfinite(bias).all()
    scores = score_labels(model, tokenizer, tweets[0], system_prompt=TASK.system_prompt, labels=TASK.labels)
    assert calibrate(scores, torch.zeros(3), TASK.labels) == scores.predictions, "no bias, no change"
    skewed = torch.tensor([0.0, 0.0, -50.0])  # a prompt that never says 'positive' on content-free input
    assert set(calibrate(scores, skewed, TASK.labels)) == {"positive"}
