"""The one record format every dataset uses, and strict reading of JSONL and CSV files into it.

A record is a chat-style example: either `messages` (the conversation so far, ending with the user's turn) or
`input` (a single user message), plus the `reference` answer and free-form `meta` (topic, time, ...). Reading
validates every line and collects the errors, so a bad file is refused whole with each problem's line and field,
and nothing of it is imported.
"""

from __future__ import annotations

import csv
import io
import json
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuneloop.errors import DatasetError

MAX_TEXT_CHARS = 32_000
MAX_LINE_BYTES = 1_000_000
MAX_ERRORS_SHOWN = 20


class Message(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)


class Example(BaseModel):
    """One example: model input (messages or input), the reference answer, and metadata."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=200, description="Unique within the dataset.")
    messages: list[Message] | None = Field(default=None, description="Conversation ending with a user turn.")
    input: str | None = Field(default=None, max_length=MAX_TEXT_CHARS, description="A single user message.")
    reference: str = Field(max_length=MAX_TEXT_CHARS, description="The expected answer (label or reply).")
    meta: dict[str, Any] = Field(default_factory=dict, description="Slicing metadata: topic, time, source ...")

    @field_validator("input", "reference")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty or only whitespace")
        return value

    @model_validator(mode="after")
    def _one_input(self) -> Example:
        if (self.messages is None) == (self.input is None):
            raise ValueError("give exactly one of 'messages' or 'input'")
        if self.messages is not None:
            if not self.messages:
                raise ValueError("'messages' must not be empty")
            if self.messages[-1].role != "user":
                raise ValueError("'messages' must end with a user turn")
        return self

    def chat_messages(self, system_prompt: str | None = None) -> list[dict[str, str]]:
        """The conversation to send a model, with the task's system prompt unless one is already there."""
        turns = [m.model_dump() for m in self.messages] if self.messages else [{"role": "user",
                                                                                "content": self.input or ""}]
        if system_prompt and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": system_prompt})
        return turns

    def last_user_text(self) -> str:
        """The text monitored for drift: the last user message."""
        if self.messages:
            return self.messages[-1].content
        return self.input or ""

    def input_text(self) -> str:
        """Everything the model is given (except a system prompt), for leakage checks."""
        if self.messages:
            return "\n".join(m.content for m in self.messages if m.role != "system")
        return self.input or ""


def normalize_text(text: str) -> str:
    """Casefolded NFKC with whitespace collapsed: two texts that differ only in these ways are the same example."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def read_examples(path: str | Path) -> list[Example]:
    """Read a JSONL or CSV dataset file, validating every row; raises DatasetError listing every problem."""
    return [example for _, example in read_numbered_examples(path)]


def read_numbered_examples(path: str | Path) -> list[tuple[int, Example]]:
    """Like `read_examples`, with each example's line number in the file (for errors found later)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError("file does not exist", path=str(path)) from None
    except OSError as exc:
        raise DatasetError(f"cannot read ({exc.strerror})", path=str(path)) from None
    if path.suffix.lower() == ".csv":
        return parse_csv(data, source=str(path))
    return parse_jsonl(data, source=str(path))


def parse_jsonl(data: bytes, *, source: str = "<jsonl>") -> list[tuple[int, Example]]:
    errors: list[DatasetError] = []
    rows: list[tuple[int, Any]] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        if len(raw) > MAX_LINE_BYTES:
            errors.append(DatasetError(f"line is {len(raw):,} bytes, over the {MAX_LINE_BYTES:,}-byte limit",
                                       path=source, line=number))
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors.append(DatasetError(f"not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})",
                                       path=source, line=number))
            continue
        try:
            rows.append((number, json.loads(text)))
        except json.JSONDecodeError as exc:
            errors.append(DatasetError(f"not valid JSON ({exc.msg} at column {exc.colno})", path=source,
                                       line=number))
    return _validate_rows(rows, errors, source)


def parse_csv(data: bytes, *, source: str = "<csv>") -> list[tuple[int, Example]]:
    """CSV with columns `input` and `reference` (optional `id`); any other column becomes `meta`."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetError(f"not valid UTF-8 (byte {exc.start})", path=source, line=line) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    missing = [c for c in ("input", "reference") if c not in header]
    if missing:
        raise DatasetError(f"CSV header lacks column(s) {missing}; found {header}", path=source, line=1)
    rows: list[tuple[int, Any]] = []
    for record in reader:
        line = reader.line_num
        meta = {k: v for k, v in record.items() if k not in ("id", "input", "reference") and k is not None}
        row: dict[str, Any] = {"id": record.get("id") or f"row-{line}", "input": record["input"],
                               "reference": record["reference"], "meta": meta}
        if None in record:
            rows.append((line, {**row, "_extra": record[None]}))
        else:
            rows.append((line, row))
    return _validate_rows(rows, [], source)


def _validate_rows(rows: Iterable[tuple[int, Any]], errors: list[DatasetError],
                   source: str) -> list[tuple[int, Example]]:
    examples: list[tuple[int, Example]] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        if not isinstance(row, dict):
            errors.append(DatasetError(f"expected a JSON object, got {type(row).__name__}", path=source, line=line))
            continue
        if "_extra" in row:
            errors.append(DatasetError("row has more cells than the header", path=source, line=line))
            continue
        try:
            example = Example.model_validate(row)
        except ValidationError as exc:
            for err in exc.errors():
                field = ".".join(str(p) for p in err["loc"]) or None
                errors.append(DatasetError(_message(err), path=source, line=line, field=field))
            continue
        if example.id in seen:
            errors.append(DatasetError(f"duplicate id '{example.id}' (first on line {seen[example.id]})",
                                       path=source, line=line, field="id"))
            continue
        seen[example.id] = line
        examples.append((line, example))
    if errors:
        raise_all(errors, source)
    if not examples:
        raise DatasetError("no examples in the file", path=source)
    return examples


def raise_all(errors: list[DatasetError], source: str) -> None:
    """One DatasetError listing every problem (the first MAX_ERRORS_SHOWN, sorted by line)."""
    errors = sorted(errors, key=lambda e: e.line or 0)
    shown = "\n  - ".join(str(e) for e in errors[:MAX_ERRORS_SHOWN])
    more = f"\n  ... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
    raise DatasetError(f"{len(errors)} invalid row(s); nothing was imported:\n  - {shown}{more}", path=source,
                       line=errors[0].line)


def _message(err: Any) -> str:
    if err["type"] == "missing":
        return "required field is missing"
    if err["type"] == "extra_forbidden":
        return "unknown field (allowed: id, messages, input, reference, meta)"
    return str(err["msg"]).removeprefix("Value error, ")


def write_jsonl(examples: Iterable[Example], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(example.model_dump_json(exclude_none=True) + "\n")
