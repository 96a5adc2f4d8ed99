"""`tuneloop task check`: what a task of one's own lacks is said before anything runs, and a ready task is ready."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.tiny_models import make_tiny_model
from tuneloop.challenger_sets.catalog import add_dataset
from tuneloop.challenger_sets.readiness import Finding, check_task
from tuneloop.challenger_sets.records import Example
from tuneloop.config import Config, parse_config
from tuneloop.store import Store

INTENT = {"kind": "classification", "labels": ["billing", "delivery", "other"],
          "system_prompt": "Classify the customer's message: billing, delivery or other.",
          "metrics": ["accuracy", "macro_f1"], "primary_metric": "macro_f1", "max_new_tokens": 4,
          "train_dataset": "intent/train", "heldout_dataset": "intent/heldout"}


def _rows(prefix: str, n: int, labels: list[str]) -> list[Example]:
    return [Example(id=f"{prefix}{i}", input=f"{prefix} message {i}", reference=labels[i % len(labels)])
            for i in range(n)]


def _by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings}


def _intent_config(root: Path, base: Path, **task: object) -> Config:
    text = yaml.safe_dump({"data_dir": "data", "base_model": {"path": str(base), "name": "tiny"},
                           "tasks": {"intent": {**INTENT, **task}}})
    (root / "tuneloop.yaml").write_text(text)
    return parse_config(text, config_dir=root)


def test_a_new_task_is_told_every_missing_piece(tmp_path: Path, base_model_dir: Path) -> None:
    config = _intent_config(tmp_path, base_model_dir, train={"target_modules": ["q_proj", "qkv_proj"]})
    store = Store(config.resolved_database_url)
    findings = _by_check(check_task(config, store, "intent"))
    assert findings["train set"].verdict == "problem" and "--kind train --name train" in findings["train set"].detail
    assert findings["heldout set"].verdict == "problem"
    assert findings["LoRA targets"].verdict == "problem"
    assert "'qkv_proj' (did you mean" in findings["LoRA targets"].detail
    assert "its projections are q_proj, k_proj, v_proj, o_proj, gate_proj" in findings["LoRA targets"].detail
    assert findings["system prompt"].verdict == "ok"
    assert findings["champion"].verdict == "note"
    store.close()


def test_overlap_missing_labels_and_a_dropped_system_prompt_are_problems(tmp_path: Path,
                                                                        base_model_dir: Path) -> None:
    # the test's model folder: the embedded model's files, with a chat template that has no system role
    model = make_tiny_model(tmp_path / "model", "qwen2", base_model_dir, chat_template=False)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    config = _intent_config(tmp_path, model)
    store = Store(config.resolved_database_url)
    train = _rows("t", 30, ["billing", "delivery"])  # "other" never occurs
    add_dataset(store, config.data_path, train, task="intent", name="train", kind="train", source="test")
    heldout = [*_rows("h", 9, ["billing", "delivery", "other"]), train[0].model_copy(update={"id": "leak"})]
    add_dataset(store, config.data_path, heldout, task="intent", name="heldout", kind="heldout", source="test",
                check_leakage=False)
    findings = _by_check(check_task(config, store, "intent"))
    assert findings["train set"].verdict == "ok" and "30 rows" in findings["train set"].detail
    overlap = findings["intent/heldout vs training"]
    assert overlap.verdict == "problem" and overlap.detail.startswith("1 of 10 inputs also in intent/train@1")
    assert findings["intent/train labels"].verdict == "problem" and "['other'] never occur" in \
        findings["intent/train labels"].detail
    assert findings["intent/heldout labels"].verdict == "ok"
    assert findings["system prompt"].verdict == "problem" and "drops the system prompt" in \
        findings["system prompt"].detail
    assert findings["LoRA targets"].verdict == "ok"
    assert findings["base model"].detail.startswith("tiny: Qwen2ForCausalLM")
    store.close()


def test_the_cli_exits_1_on_a_problem_and_changes_nothing(tmp_path: Path,
                                                                          base_model_dir: Path) -> None:
    config = _intent_config(tmp_path, base_model_dir)
    store = Store(config.resolved_database_url)
    add_dataset(store, config.data_path, _rows("t", 30, INTENT["labels"]), task="intent", name="train",  # type: ignore[arg-type]
                kind="train", source="test")

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tuneloop", "--config", str(tmp_path / "tuneloop.yaml"),
                               "task", "check", "intent", "--json"], capture_output=True, text=True, timeout=120)

    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "data").rglob("*") if "db" not in p.name)
    missing = check()
    assert missing.returncode == 1, missing.stderr
    report = json.loads(missing.stdout)
    assert report["ready"] is False
    assert [f["check"] for f in report["findings"] if f["verdict"] == "problem"] == ["heldout set"]
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "data").rglob("*") if "db" not in p.name) == before
    add_dataset(store, config.data_path, _rows("h", 9, INTENT["labels"]), task="intent", name="heldout",  # type: ignore[arg-type]
                kind="heldout", source="test")
    assert [f for f in check_task(config, store, "intent") if f.verdict == "problem"] == [], "now ready"
    store.close()
