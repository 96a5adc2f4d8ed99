"""What every benchmark needs: the converted base model and the embedded datasets, cached under .cache/bench."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

from tuneloop.challenger_sets.records import Example
from tuneloop.config import Config, parse_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("TUNELOOP_BENCH_CACHE", REPO / ".cache" / "bench"))


@cache
def bench_config() -> Config:
    return parse_config("data_dir: .\n", config_dir=CACHE)


@cache
def base_model_path() -> Path:
    from tuneloop.basemodel import ensure_base_model

    return ensure_base_model(bench_config()).path


@cache
def sentiment_sets() -> dict[str, list[Example]]:
    from tuneloop.challenger_sets.embedded import build_sentiment

    return {built.name: built.examples for built in build_sentiment()}


@cache
def chat_sets() -> dict[str, list[Example]]:
    from tuneloop.challenger_sets.embedded import build_chat

    return {built.name: built.examples for built in build_chat()}


def trained_adapter(task_name: str, train: list[Example], steps: int, name: str) -> Path:
    """The task's default recipe trained for `steps` steps on `train`, cached as CACHE/name (trained once)."""
    from tuneloop.retrain.trainer import fit

    out = CACHE / name
    if (out / "adapter_model.safetensors").exists():
        return out
    task = Config().tasks[task_name]
    recipe = task.train.model_copy(update={"max_steps": steps, "eval_every": 10_000})
    fit(base_model_path(), train, [], system_prompt=task.system_prompt, train=recipe, output_dir=out, progress=False)
    return out


def causal_lm(adapter: Path | None) -> Any:
    """The embedded base model in float32, with `adapter` applied through PEFT when one is given."""
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base_model_path(), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model
