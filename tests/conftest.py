"""Shared fixtures. Real components come from session-scoped fixtures so each is built once per test run.

The converted base model is cached under `.cache/test-data/` in the checkout (override with TUNELOOP_TEST_CACHE),
so it is built once per fresh clone, as in CI, and reused by later local runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

from tuneloop.config import Config, TrainConfig, parse_config  # noqa: E402
from tuneloop.store import Store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("TUNELOOP_TEST_CACHE", REPO / ".cache" / "test-data"))


def small_train_config(**overrides: object) -> TrainConfig:
    """A recipe sized for tests: few short steps on a 2-core machine."""
    values = {"batch_size": 4, "max_steps": 4, "max_seq_len": 96, "eval_every": 2, "validation_examples": 8,
              "learning_rate": 1e-3, "seed": 0}
    values.update(overrides)
    return TrainConfig.model_validate(values)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """Default config in a temporary data dir whose base model is the shared cached conversion."""
    text = "data_dir: data\n"
    cfg = parse_config(text, config_dir=tmp_path)
    return cfg


@pytest.fixture
def store(config: Config) -> Iterator[Store]:
    store = Store(config.resolved_database_url)
    yield store
    store.close()


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    """The embedded base model, converted once into the test cache."""
    from tuneloop.basemodel import ensure_base_model

    cached = parse_config("data_dir: .\n", config_dir=CACHE)
    return ensure_base_model(cached).path


@pytest.fixture
def config_with_base(config: Config, base_model_dir: Path) -> Config:
    """A config whose data dir already holds the cached base model (linked, not copied)."""
    models = config.data_path / "models"
    models.mkdir(parents=True, exist_ok=True)
    link = models / base_model_dir.name
    if not link.exists():
        link.symlink_to(base_model_dir, target_is_directory=True)
    return config


@pytest.fixture(scope="session")
def embedded_sets() -> dict[str, list]:
    """The embedded tasks' built datasets (built once per session)."""
    from tuneloop.challenger_sets.embedded import build_chat, build_sentiment

    return {"sentiment": build_sentiment(), "chat": build_chat()}
