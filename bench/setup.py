"""What every benchmark needs: the converted base model and the embedded datasets, cached under .cache/bench."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

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
