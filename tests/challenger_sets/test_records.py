from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tuneloop.challenger_sets.records import (
    MAX_LINE_BYTES,
    Example,
    normalize_text,
    parse_csv,
    parse_jsonl,
    read_examples,
)
from tuneloop.errors import DatasetError


def test_valid_jsonl_with_messages_and_input() -> None:
    data = (b'{"id": "a", "input": "great flight", "reference": "positive", "meta": {"topic": "airline"}}\n'
            b'\n'
            b'{"id": "b", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"},'
            b' {"role": "user", "content": "how are you"}], "reference": "good"}\n')
    numbered = parse_jsonl(data)
    assert [line for line, _ in numbered] == [1, 3], "blank lines are skipped but keep their numbers"
    examples = [e for _, e in numbered]
    assert [e.id for e in examples] == ["a", "b"]
    assert examples[0].meta == {"topic": "airline"}
    assert examples[1].last_user_text() == "how are you"
    assert examples[1].chat_messages("SYS")[0] == {"role": "system", "content": "SYS"}


@pytest.mark.parametrize(("line", "fragment"), [
    (b'{"id": "b", "input": 3, "reference": "x"}', "field 'input'"),
    (b'{"id": "b", "input": "x"}', "field 'reference': required field is missing"),
    (b'{"id": "b", "input": "   ", "reference": "x"}', "must not be empty"),
    (b'{"id": "b", "reference": "x"}', "exactly one of 'messages' or 'input'"),
    (b'{"id": "b", "messages": [{"role": "assistant", "content": "x"}], "reference": "x"}', "end with a user turn"),
    (b'{"id": "b", "input": "x", "reference": "x", "label": 1}', "field 'label': unknown field"),
    (b'{"id": "b", "input": "x", ', "not valid JSON"),
    (b'["not", "an", "object"]', "expected a JSON object"),
    (b'{"id": "b", "input": "caf\xe9", "reference": "x"}', "not valid UTF-8"),
    (b'{"id": "a", "input": "dup", "reference": "x"}', "duplicate id 'a' (first on line 1)"),
])
def test_bad_line_is_named_with_line_and_field(line: bytes, fragment: str) -> None:
    data = b'{"id": "a", "input": "fine", "reference": "positive"}\n' + line + b"\n"
    with pytest.raises(DatasetError) as caught:
        parse_jsonl(data, source="bad.jsonl")
    message = str(caught.value)
    assert "bad.jsonl" in message and "line 2" in message and fragment in message
    assert caught.value.line == 2


def test_every_bad_line_is_reported() -> None:
    data = b'{"id": "a", "input": 1, "reference": "x"}\nnope\n{"id": "c", "input": "ok", "reference": "x"}\n'
    with pytest.raises(DatasetError, match=r"2 invalid row\(s\)") as caught:
        parse_jsonl(data, source="f.jsonl")
    assert "line 1" in str(caught.value) and "line 2" in str(caught.value)


def test_huge_text_and_huge_lines_are_refused() -> None:
    huge_text = b'{"id": "a", "input": "' + b"x" * 40_000 + b'", "reference": "x"}\n'
    with pytest.raises(DatasetError, match="at most 32000 characters"):
        parse_jsonl(huge_text)
    huge_line = b'{"id": "a", "input": "' + b"x" * (MAX_LINE_BYTES + 10) + b'", "reference": "x"}\n'
    with pytest.raises(DatasetError, match="over the 1,000,000-byte limit"):
        parse_jsonl(huge_line)


def test_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DatasetError, match="no examples"):
        read_examples(path)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        read_examples(tmp_path / "gone.jsonl")


def test_csv_import_maps_extra_columns_to_meta() -> None:
    data = b"input,reference,topic\nnice one,positive,apple\n\"multi\nline\",neutral,apple\n"
    examples = [e for _, e in parse_csv(data)]
    assert examples[0].meta == {"topic": "apple"} and examples[1].input == "multi\nline"
    with pytest.raises(DatasetError, match="lacks column"):
        parse_csv(b"text,label\na,b\n")
    with pytest.raises(DatasetError, match="line 2"):
        parse_csv(b"input,reference\n,positive\n")


def test_normalization_ignores_case_width_and_spacing() -> None:
    assert normalize_text("  Hello\tWORLD ") == normalize_text("hello world") == normalize_text("ｈｅｌｌｏ world")


def test_example_is_immutable() -> None:
    example = Example(id="a", input="x", reference="y")
    with pytest.raises(ValidationError):
        example.id = "b"
