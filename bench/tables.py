"""Benchmark tables: printed as Markdown while a bench runs, saved as JSON with the run's provenance."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Table:
    """One result table: what was measured (title), its columns and rows, and how to read it (notes)."""

    title: str
    headers: list[str]
    rows: list[list[Any]]
    notes: str = ""
    key: str = field(default="", metadata={"help": "Stable id the README refers to (defaults to the title)."})

    def to_markdown(self, *, heading: str = "####") -> str:
        cells = [[str(h) for h in self.headers]] + [["" if v is None else str(v) for v in row] for row in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.headers))]
        lines = [f"{heading} {self.title}", "",
                 "| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |",
                 "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        for row in cells[1:]:
            lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        text = "\n".join(lines) + "\n"
        return text + (f"\n{self.notes}\n" if self.notes else "")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Table:
        return cls(**data)


def emit(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]], *, notes: str = "",
         key: str = "") -> Table:
    """Build a table and print it at once, so a long bench shows each result as soon as it exists."""
    table = Table(title, list(headers), [list(r) for r in rows], notes, key or title)
    print(table.to_markdown(heading="###"), flush=True)
    return table
