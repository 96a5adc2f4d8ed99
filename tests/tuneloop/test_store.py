from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from bench.postgres import PostgresMissing, throwaway_postgres
from tuneloop.events import list_events, record_event
from tuneloop.store import Store, current_revision, head_revision
from tuneloop.tables import Base


def test_migrations_create_every_table_on_an_empty_sqlite_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    store = Store(url)
    tables = set(inspect(store.engine).get_table_names())
    assert {"datasets", "adapter_versions", "aliases", "events", "alembic_version"} <= tables
    assert current_revision(store.engine) == head_revision()
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    store.close()
    Store(url).close()


def test_models_match_the_latest_migration(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'x.db'}")
    with store.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []
    store.close()


def test_events_round_trip(store: Store) -> None:
    record_event(store, "unit", "hello", task="sentiment", payload={"n": 1})
    events = list_events(store, task="sentiment")
    assert [(e.kind, e.message, e.payload) for e in events] == [("unit", "hello", {"n": 1})]


# Postgres: the same code against a real server -----------------------------------------------------------

@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A throwaway Postgres cluster on 127.0.0.1 (bench/postgres.py)."""
    try:
        with throwaway_postgres() as server:
            yield server.url
    except PostgresMissing as exc:
        pytest.fail(str(exc))


@pytest.mark.integration
def test_same_store_code_runs_on_postgres(postgres_url: str, tmp_path: Path) -> None:
    from tuneloop.challenger_sets.catalog import add_dataset, get_dataset
    from tuneloop.challenger_sets.records import Example
    from tuneloop.registry import AdapterCard, get_adapter, register_adapter

    store = Store(postgres_url)
    assert current_revision(store.engine) == head_revision()
    examples = [Example(id=str(i), input=f"text {i}", reference="positive") for i in range(3)]
    version = add_dataset(store, tmp_path, examples, task="sentiment", name="pg", kind="challenger", source="test")
    assert get_dataset(store, "sentiment/pg").manifest.sha256 == version.manifest.sha256
    folder = tmp_path / "trained"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "adapter_config.json").write_text("{}")
    card = AdapterCard(task="sentiment", method="lora", base_model={"name": "b", "sha256": "0" * 64},
                       datasets=[], hyperparameters={"rank": 8})
    registered = register_adapter(store, tmp_path, folder, card)
    assert registered.aliases == ["champion"]
    assert get_adapter(store, "sentiment@champion").version == 1
    assert any(e.kind == "adapter_registered" for e in list_events(store))
    store.close()
