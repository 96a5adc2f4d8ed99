from __future__ import annotations

from pathlib import Path

import pytest

from tuneloop.config import Config
from tuneloop.errors import AdapterError
from tuneloop.registry import (
    AdapterCard,
    find_alias,
    get_adapter,
    list_adapters,
    parse_ref,
    register_adapter,
    set_alias,
    verify_adapter,
)
from tuneloop.store import Store


def _trained(tmp_path: Path, name: str, payload: bytes = b"weights") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(payload)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    return folder


def _card(method: str = "lora", parent: int | None = None) -> AdapterCard:
    return AdapterCard(task="sentiment", method=method, base_model={"name": "base", "sha256": "a" * 64},
                       datasets=[], hyperparameters={"rank": 8}, parent_version=parent)


def test_versions_count_up_and_the_first_lora_becomes_champion(store: Store, config: Config, tmp_path: Path) -> None:
    first = register_adapter(store, config.data_path, _trained(tmp_path, "a"), _card())
    second = register_adapter(store, config.data_path, _trained(tmp_path, "b", b"other"), _card(parent=1))
    assert (first.ref, second.ref) == ("sentiment@1", "sentiment@2")
    assert first.aliases == ["champion"] and second.aliases == []
    assert second.card.parent_version == 1 and second.card.version == 2
    assert (config.data_path / "adapters" / "sentiment" / "v2" / "card.json").exists()
    assert not (tmp_path / "b").exists(), "the trained folder is moved into the registry"
    assert [v.ref for v in list_adapters(store, "sentiment")] == ["sentiment@1", "sentiment@2"]


def test_aliases_move_and_resolve(store: Store, config: Config, tmp_path: Path) -> None:
    register_adapter(store, config.data_path, _trained(tmp_path, "a"), _card())
    register_adapter(store, config.data_path, _trained(tmp_path, "b", b"2"), _card())
    assert set_alias(store, "sentiment@2", "candidate") is None
    assert get_adapter(store, "sentiment@candidate").version == 2
    previous = set_alias(store, "sentiment@2", "champion")
    assert previous is not None and previous.version == 1
    assert get_adapter(store, "sentiment@champion").version == 2
    assert sorted(get_adapter(store, "sentiment@2").aliases) == ["candidate", "champion"]


def test_an_alias_flip_its_event_and_the_cleared_candidate_commit_together(store: Store, config: Config,
                                                                           tmp_path: Path) -> None:
    """Rollback reads the previous champion from the flip's event: if the event cannot be written, the flip must
    not happen either (a trigger makes the events table refuse the write, as a kill or a full disk would end the
    transaction)."""
    from sqlalchemy import text

    from tuneloop.errors import StoreError
    from tuneloop.events import list_events

    register_adapter(store, config.data_path, _trained(tmp_path, "a"), _card())
    register_adapter(store, config.data_path, _trained(tmp_path, "b", b"2"), _card())
    set_alias(store, "sentiment@2", "candidate")
    events_before = len(list_events(store))
    postgres = store.engine.dialect.name == "postgresql"
    with store.session() as session:
        if postgres:
            session.execute(text("CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'disk full'; "
                                 "END $$ LANGUAGE plpgsql"))
            session.execute(text("CREATE TRIGGER refuse_events BEFORE INSERT ON events FOR EACH ROW "
                                 "EXECUTE FUNCTION refuse()"))
        else:
            session.execute(text("CREATE TRIGGER refuse_events BEFORE INSERT ON events "
                                 "BEGIN SELECT RAISE(ABORT, 'disk full'); END"))
    with pytest.raises(StoreError, match="disk full"):
        set_alias(store, "sentiment@2", "champion", clear="candidate")
    assert get_adapter(store, "sentiment@champion").version == 1
    assert get_adapter(store, "sentiment@candidate").version == 2
    with store.session() as session:
        session.execute(text("DROP TRIGGER refuse_events" + (" ON events" if postgres else "")))
    assert len(list_events(store)) == events_before

    previous = set_alias(store, "sentiment@2", "champion", reason="gate passed", clear="candidate")
    assert previous is not None and previous.version == 1
    assert find_alias(store, "sentiment", "candidate") is None
    [event] = list_events(store, kind="alias_champion_set", limit=1)
    assert event.payload == {"alias": "champion", "version": 2, "previous": 1}
    assert event.message == "champion of sentiment -> sentiment@2 (gate passed)"


def test_only_lora_can_be_champion(store: Store, config: Config, tmp_path: Path) -> None:
    version = register_adapter(store, config.data_path, _trained(tmp_path, "p"), _card(method="prompt-tuning"))
    assert version.aliases == []
    assert find_alias(store, "sentiment", "champion") is None
    with pytest.raises(AdapterError, match="only LoRA adapters"):
        set_alias(store, "sentiment@1", "champion")


def test_unknown_versions_and_bad_refs(store: Store, config: Config, tmp_path: Path) -> None:
    register_adapter(store, config.data_path, _trained(tmp_path, "a"), _card())
    with pytest.raises(AdapterError, match=r"no adapter sentiment@9; registered for 'sentiment': \['sentiment@1'\]"):
        get_adapter(store, "sentiment@9")
    with pytest.raises(AdapterError, match="write task@N"):
        parse_ref("sentiment")
    with pytest.raises(AdapterError, match="neither a version number nor an alias"):
        get_adapter(store, "sentiment@best")


def test_corrupt_or_missing_adapter_is_detected(store: Store, config: Config, tmp_path: Path) -> None:
    version = register_adapter(store, config.data_path, _trained(tmp_path, "a"), _card())
    verify_adapter(version)
    (version.path / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(AdapterError, match="do not match the checksum"):
        verify_adapter(version)
    (version.path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        verify_adapter(version)
    for file in version.path.iterdir():
        file.unlink()
    version.path.rmdir()
    with pytest.raises(AdapterError, match="is missing"):
        verify_adapter(version)
