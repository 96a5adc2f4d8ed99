from __future__ import annotations

from pathlib import Path

import pytest

from tuneloop.challenger_sets.catalog import add_dataset, get_dataset, import_dataset_file, list_datasets
from tuneloop.challenger_sets.records import Example
from tuneloop.config import Config
from tuneloop.errors import DatasetError, DatasetNotFound, LeakageError
from tuneloop.store import Store


def _examples(*texts: str, label: str = "positive") -> list[Example]:
    return [Example(id=f"e{i}", input=t, reference=label) for i, t in enumerate(texts)]


def test_versions_are_immutable_and_identical_content_is_not_duplicated(store: Store, config: Config) -> None:
    first = add_dataset(store, config.data_path, _examples("a", "b"), task="sentiment", name="mine",
                        kind="challenger", source="test")
    again = add_dataset(store, config.data_path, _examples("a", "b"), task="sentiment", name="mine",
                        kind="challenger", source="test")
    second = add_dataset(store, config.data_path, _examples("a", "b", "c"), task="sentiment", name="mine",
                         kind="challenger", source="test")
    assert (first.manifest.version, again.manifest.version, second.manifest.version) == (1, 1, 2)
    assert first.path.read_text().count("\n") == 2
    manifest = first.path.with_name("v1.manifest.json").read_text()
    assert first.manifest.sha256 in manifest and '"kind": "challenger"' in manifest
    assert get_dataset(store, "sentiment/mine@1").manifest.rows == 2
    assert get_dataset(store, "mine", task="sentiment").manifest.version == 2
    assert [d.manifest.ref for d in list_datasets(store)] == ["sentiment/mine@2"]


def test_leakage_against_training_data_is_refused_with_the_overlap_count(store: Store, config: Config) -> None:
    add_dataset(store, config.data_path, _examples("Flight was late", "great crew", "ok"), task="sentiment",
                name="train", kind="train", source="test")
    leaky = _examples("flight  WAS late", "Great crew", "something new")
    with pytest.raises(LeakageError, match=r"2 of 3 examples also occur in sentiment/train@1"):
        add_dataset(store, config.data_path, leaky, task="sentiment", name="eval", kind="challenger", source="t")
    assert [d.manifest.name for d in list_datasets(store)] == ["sentiment/train"]
    assert not (config.data_path / "datasets" / "sentiment" / "eval").exists() or not any(
        (config.data_path / "datasets" / "sentiment" / "eval").iterdir())
    clean = add_dataset(store, config.data_path, _examples("something new"), task="sentiment", name="eval",
                        kind="challenger", source="t")
    assert clean.manifest.version == 1


def test_bad_file_imports_nothing(store: Store, config: Config, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id":"a","input":"hello","reference":"positive"}\n{"id":"b", "input": 3\nnot json\n')
    with pytest.raises(DatasetError, match="line 2"):
        import_dataset_file(store, config.data_path, bad, task="sentiment", task_config=config.tasks["sentiment"],
                            name="hostile", kind="challenger")
    assert list_datasets(store) == []
    assert not (config.data_path / "datasets").exists()


def test_a_label_task_refuses_references_that_are_not_its_labels(store: Store, config: Config,
                                                                  tmp_path: Path) -> None:
    lines = ['{"id": "a", "input": "lost my bag", "reference": "Negative"}',
             '{"id": "b", "input": "meh", "reference": "mixed"}',
             '',
             '{"id": "c", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, '
             '{"role": "user", "content": "great"}], "reference": "positive"}',
             '{"id": "d", "input": "ok", "reference": "furious"}']
    bad = tmp_path / "labels.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    task = config.tasks["sentiment"]
    with pytest.raises(DatasetError) as caught:
        import_dataset_file(store, config.data_path, bad, task="sentiment", task_config=task, name="x",
                            kind="challenger")
    message = str(caught.value)
    assert "3 invalid row(s); nothing was imported" in message
    assert "line 2, field 'reference': 'mixed' is not a label of task 'sentiment'" in message
    assert "line 4, field 'messages'" in message and "line 5, field 'reference': 'furious'" in message
    assert "line 1" not in message, "'Negative' is the label 'negative' in another case"
    assert list_datasets(store) == [] and not (config.data_path / "datasets").exists()

    good = tmp_path / "good.jsonl"
    good.write_text(lines[0] + "\n" + '{"id": "e", "input": "fine", "reference": " NEUTRAL "}\n')
    version = import_dataset_file(store, config.data_path, good, task="sentiment", task_config=task, name="x",
                                  kind="challenger")
    assert [e.reference for e in version.load()] == ["negative", "neutral"], "stored in the labels' spelling"
    chat = import_dataset_file(store, config.data_path, bad, task="chat", task_config=config.tasks["chat"],
                               name="anything", kind="challenger")
    assert chat.manifest.rows == 4, "a generation task takes any reply as its reference"


def test_unknown_dataset_lists_the_known_ones(store: Store, config: Config) -> None:
    add_dataset(store, config.data_path, _examples("x"), task="chat", name="a", kind="heldout", source="t")
    with pytest.raises(DatasetNotFound, match=r"no dataset chat/b; known: \['chat/a'\]"):
        get_dataset(store, "chat/b")


def test_kind_cannot_change_between_versions(store: Store, config: Config) -> None:
    add_dataset(store, config.data_path, _examples("x"), task="chat", name="a", kind="heldout", source="t")
    with pytest.raises(DatasetError, match="is a heldout set"):
        add_dataset(store, config.data_path, _examples("y"), task="chat", name="a", kind="train", source="t")


def test_bad_dataset_names_are_refused(store: Store, config: Config) -> None:
    with pytest.raises(DatasetError, match="must be letters"):
        add_dataset(store, config.data_path, _examples("x"), task="chat", name="bad name!", kind="heldout",
                    source="t")
    with pytest.raises(DatasetError, match="belongs to another task"):
        add_dataset(store, config.data_path, _examples("x"), task="chat", name="../../etc", kind="heldout",
                    source="t")
    assert not (config.data_path / "datasets").exists()
