"""Shared fixtures. Real components come from session-scoped fixtures so each is built once per test run.

The converted base model is cached under `.cache/test-data/` in the checkout (override with TUNELOOP_TEST_CACHE),
so it is built once per fresh clone, as in CI, and reused by later local runs.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

from bench.colours import COLOURS_TASK  # noqa: E402
from tests.fakes import RecordingRunner  # noqa: E402
from tests.live import ADMIN_TOKEN, LiveGateway, add_tiny_sets  # noqa: E402
from tuneloop.config import Config, TrainConfig, parse_config  # noqa: E402
from tuneloop.ports import free_port  # noqa: E402
from tuneloop.store import Store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("TUNELOOP_TEST_CACHE", REPO / ".cache" / "test-data"))


def small_train_config(**overrides: object) -> TrainConfig:
    """A recipe sized for tests: few short steps on a 2-core machine."""
    values: dict[str, object] = {"batch_size": 4, "max_steps": 4, "max_seq_len": 96, "eval_every": 2,
                                 "validation_examples": 8, "learning_rate": 1e-3, "seed": 0}
    values.update(overrides)
    return TrainConfig.model_validate(values)


# `make test-postgres` runs the store-backed suites again with TEST_DATABASE_ENV=postgres: every test's store is
# then a database of its own on one throwaway Postgres 15 server (bench/postgres.py), migrated by the same code.
TEST_DATABASE_ENV = "TUNELOOP_TEST_DATABASE"
ON_POSTGRES = os.environ.get(TEST_DATABASE_ENV, "sqlite") == "postgres"


@pytest.fixture(scope="session")
def postgres_databases() -> Iterator[Callable[[], str] | None]:
    """On Postgres: a factory of fresh, empty databases on one server for the session; on SQLite: None."""
    if not ON_POSTGRES:
        yield None
        return
    from sqlalchemy import create_engine, text

    from bench.postgres import throwaway_postgres

    with throwaway_postgres() as server:
        admin = create_engine(server.url, isolation_level="AUTOCOMMIT")
        made = itertools.count(1)

        def fresh() -> str:
            name = f"test_{next(made)}"
            with admin.connect() as connection:
                connection.execute(text(f"CREATE DATABASE {name}"))
            return server.url.rsplit("/", 1)[0] + f"/{name}"

        try:
            yield fresh
        finally:
            admin.dispose()


def database_line(postgres_databases: Callable[[], str] | None) -> str:
    """The `database_url:` line of a test's config: a fresh Postgres database, or nothing (SQLite in the data
    dir)."""
    return f"database_url: {postgres_databases()}\n" if postgres_databases is not None else ""


@pytest.fixture(scope="session")
def embedding_model_dir() -> Path:
    """The drift embedder's int8 ONNX model, built once into the test cache (≈10 s) instead of once per data dir."""
    from tuneloop.monitor.embedding_onnx import int8_model
    from tuneloop.monitor.embeddings import model_dir

    return int8_model(model_dir(), CACHE / "models").parent


@pytest.fixture
def config(tmp_path: Path, postgres_databases: Callable[[], str] | None, embedding_model_dir: Path) -> Config:
    """Default config in a temporary data dir whose embedding model is the shared cached build (linked)."""
    text = "data_dir: data\n" + database_line(postgres_databases)
    cfg = parse_config(text, config_dir=tmp_path)
    models = cfg.data_path / "models"
    models.mkdir(parents=True, exist_ok=True)
    (models / embedding_model_dir.name).symlink_to(embedding_model_dir, target_is_directory=True)
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


@pytest.fixture(scope="session")
def live_gateway(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path,
                 postgres_databases: Callable[[], str] | None) -> Iterator[LiveGateway]:
    """One real vLLM + gateway for the whole test session (serving, evaluators, monitor and the live retraining
    tests share it), with real adapters trained for two tasks; a third, `colours`, is the retraining tests' own.
    The engine and gateway run in this process (uvicorn on a thread, vLLM as the supervised child), so tests can
    kill vLLM and watch the supervisor bring it back."""
    from tuneloop.conductor.process import running
    from tuneloop.retrain.finetune import finetune
    from tuneloop.serving.engine import EngineSupervisor

    root = tmp_path_factory.mktemp("serving")
    gateway_port, vllm_port = free_port(), free_port()
    config = parse_config(
        f"data_dir: data\n{database_line(postgres_databases)}base_model:\n  path: {base_model_dir}\n"
        f"serving:\n  gateway_port: {gateway_port}\n  vllm_port: {vllm_port}\n  max_model_len: 512\n"
        f"  kv_cache_gib: 1\n  admin_token: {ADMIN_TOKEN}\n  unload_grace_s: 1\n"
        "jobs:\n  heartbeat_s: 1\n  stale_after_s: 60\n"
        "tasks:\n  sentiment:\n    train:\n      batch_size: 4\n      validation_examples: 2\n      eval_every: 100\n"
        "  chat:\n    train:\n      batch_size: 4\n      validation_examples: 2\n      eval_every: 100\n"
        + COLOURS_TASK, config_dir=root)
    store = Store(config.resolved_database_url)
    add_tiny_sets(store, config.data_path)
    for task, steps in (("sentiment", 2), ("sentiment", 3), ("chat", 2)):
        finetune(config, store, task, max_steps=steps, dataset=f"{task}/tiny", progress=False)
    runner = RecordingRunner()
    with running(config, store, seed=0, runner=runner) as stack:
        assert isinstance(stack.server.engine, EngineSupervisor), "the session's gateway runs one supervised vLLM"
        yield LiveGateway(url=stack.url, config=config, store=store, ctx=stack.server.ctx, engine=stack.server.engine,
                          loop=stack.loop, runner=runner)
    store.close()
