"""Plain-text tables for benchmark output (pasted into the README and issue notes as they are)."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [f"### {title}", "", "| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines) + "\n"


def emit(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]], *, notes: str = "") -> str:
    text = format_table(title, headers, rows) + (f"\n{notes}\n" if notes else "")
    print(text, flush=True)
    return text
