"""`tuneloop task check NAME`: everything a task needs before training or serving it, said up front.

A new task fails late and far from its cause otherwise: a missing held-out set when the first scheduled eval
runs, a system prompt the chat template silently drops when the adapter answers nonsense, a Llama module name on
a GPT-NeoX model inside PEFT. Each check here is cheap (no weights are loaded; the model is built on meta once
and cached) and names what to do about a problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tuneloop.basemodel import ensure_base_model
from tuneloop.challenger_sets.catalog import DatasetVersion, get_dataset
from tuneloop.challenger_sets.leakage import input_keys, overlapping
from tuneloop.challenger_sets.records import Example
from tuneloop.config import Config
from tuneloop.errors import BaseModelError, DatasetNotFound, TrainingError
from tuneloop.modelinfo import model_modules, resolve_targets
from tuneloop.registry import find_alias
from tuneloop.store import Store

Verdict = Literal["ok", "problem", "note"]
PROBE_USER_TEXT = "tuneloop task check: a probe message"


@dataclass(frozen=True)
class Finding:
    check: str
    verdict: Verdict
    detail: str


def check_task(config: Config, store: Store, name: str) -> list[Finding]:
    """Every finding for task `name`, problems and all (the caller decides the exit status)."""
    task = config.task(name)
    findings: list[Finding] = []
    sets: dict[str, DatasetVersion] = {}
    for role, dataset in [("train", task.train_dataset), ("heldout", task.heldout_dataset),
                          *(("challenger", c) for c in task.challenger_datasets)]:
        try:
            version = get_dataset(store, dataset, task=name)
        except DatasetNotFound:
            findings.append(Finding(f"{role} set", "problem", f"{dataset} is not registered: `tuneloop datasets add "
                                    f"FILE --task {name} --kind {role} --name {dataset.split('/')[-1]}`"))
            continue
        sets[role if role != "challenger" else dataset] = version
        kind_ok = version.manifest.kind == role
        findings.append(Finding(f"{role} set", "ok" if kind_ok else "problem",
                                f"{version.manifest.ref}: {version.manifest.rows} rows"
                                + ("" if kind_ok else f", but registered as a {version.manifest.kind} set")))
    loaded = {key: version.load() for key, version in sets.items()}  # each file read once for every check below
    train = sets.get("train")
    if train is not None:
        train_keys = input_keys(loaded["train"])
        for key, version in sets.items():
            if version is train:
                continue
            leaked = overlapping(loaded[key], train_keys)
            findings.append(Finding(f"{version.manifest.name} vs training", "problem" if leaked else "ok",
                                    f"{len(leaked)} of {version.manifest.rows} inputs also in {train.manifest.ref}"
                                    + (f" (e.g. {leaked[0].last_user_text()[:60]!r}): scores on it would overstate "
                                       "quality" if leaked else "")))
    if task.kind == "classification":
        findings += _label_findings(task.labels, sets, loaded)
    findings += _model_findings(config, name)
    champion = find_alias(store, name, "champion")
    findings.append(Finding("champion", "ok" if champion else "note",
                            f"{champion.ref} ({champion.card.origin})" if champion else
                            f"none yet: `tuneloop train --task {name}` or `tuneloop adapters import FOLDER --task "
                            f"{name}`"))
    return findings


def _label_findings(labels: list[str], sets: dict[str, DatasetVersion],
                    loaded: dict[str, list[Example]]) -> list[Finding]:
    findings = []
    for role, version in sets.items():
        seen = {e.reference for e in loaded[role]}
        unknown = sorted(seen - set(labels))
        missing = [label for label in labels if label not in seen]
        if unknown:
            findings.append(Finding(f"{version.manifest.name} labels", "problem",
                                    f"references {unknown[:5]} are not labels {labels}"))
        elif missing and role == "train":
            findings.append(Finding(f"{version.manifest.name} labels", "problem",
                                    f"labels {missing} never occur: the adapter cannot learn them"))
        else:
            findings.append(Finding(f"{version.manifest.name} labels", "note" if missing else "ok",
                                    f"{len(seen)} of {len(labels)} labels occur"
                                    + (f" ({missing} do not)" if missing else "")))
    return findings


def _model_findings(config: Config, name: str) -> list[Finding]:
    task = config.task(name)
    try:
        base = ensure_base_model(config)
        modules = model_modules(base.path)
    except BaseModelError as exc:
        return [Finding("base model", "problem", str(exc))]
    findings = [Finding("base model", "ok", f"{base.name}: {modules.architecture} at {base.path}")]
    if task.train.method == "lora":
        try:
            targets = resolve_targets(base.path, task.train.target_modules,
                                      where=f"tasks.{name}.train.target_modules")
            findings.append(Finding("LoRA targets", "ok", f"{', '.join(targets)} (the model has "
                                    f"{', '.join(modules.linear)})"))
        except TrainingError as exc:
            findings.append(Finding("LoRA targets", "problem", str(exc)))
    findings.append(_system_prompt_finding(base.path, task.system_prompt))
    return findings


def _system_prompt_finding(model_dir: object, system_prompt: str) -> Finding:
    """Render a probe conversation with the model's own template: a template without a system role drops (or
    refuses) the task's system prompt, and the adapter then never sees its instructions."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": PROBE_USER_TEXT}]
    try:
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # templates raise jinja's own exceptions (e.g. "system role not supported")
        return Finding("system prompt", "problem", f"the chat template refuses a system message ({exc})")
    if system_prompt.strip() not in str(rendered):
        return Finding("system prompt", "problem", "the chat template drops the system prompt; put the "
                       "instructions where the template keeps them, or use a model whose template has a system role")
    return Finding("system prompt", "ok", "the chat template keeps the system prompt")
