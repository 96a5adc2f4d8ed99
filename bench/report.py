"""`python -m bench report`: rewrite the benchmark tables of the docs site and the README's headline numbers
from the committed results files.

docs/benchmarks.md marks each generated block with `<!-- bench:NAME -->` ... `<!-- /bench:NAME -->`; everything
between the markers is replaced by the provenance line and the tables of `bench/results/NAME.json`. A single
number quoted in prose (the README's headline results) is marked `<!-- cell:NAME/TABLE/ROW/COLUMN -->` ...
`<!-- /cell -->` (TABLE a table's key, ROW its 0-based row, COLUMN a header) and replaced by that cell. So every
benchmark number in either file traces to a file and a commit; prose outside the markers is written by people.
`--check` fails when a file differs from what the results say (run by the tests).
"""

from __future__ import annotations

import re
from pathlib import Path

from bench.results import REPO, describe, load_results

BLOCK = re.compile(r"(<!-- bench:(?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /bench:(?P=name) -->)", re.DOTALL)
CELL = re.compile(r"(<!-- cell:(?P<name>[a-z_]+)/(?P<table>[^/]+)/(?P<row>\d+)/(?P<column>[^>]+?) -->)"
                  r"(?P<body>.*?)(<!-- /cell -->)")
FILES = ("README.md", "docs/benchmarks.md", "docs/architecture.md", "docs/reliability.md", "docs/estimates.md")


class UnknownCell(LookupError):
    """A cell marker names a table, row or column its results file does not have."""


def render_block(name: str, results: Path | None = None) -> str:
    meta, tables = load_results(name, results)
    body = f"_Measured at {describe(meta)}; file `bench/results/{name}.json`._\n\n"
    return body + "\n".join(t.to_markdown() for t in tables)


def render_cell(name: str, table_key: str, row: int, column: str, results: Path | None = None) -> str:
    _meta, tables = load_results(name, results)
    for table in tables:
        if (table.key or table.title) == table_key:
            if column not in table.headers or row >= len(table.rows):
                raise UnknownCell(f"{name}/{table_key}: no row {row} / column {column!r} (headers {table.headers})")
            return str(table.rows[row][table.headers.index(column)])
    raise UnknownCell(f"bench/results/{name}.json has no table {table_key!r}")


def regenerate(path: Path, results: Path | None = None) -> tuple[str, list[str]]:
    """The file's text with every bench block and cell re-rendered, and the result names they cite."""
    text = path.read_text()
    names: list[str] = []

    def block(match: re.Match[str]) -> str:
        names.append(match.group("name"))
        return match.group(1) + render_block(match.group("name"), results) + match.group(4)

    def cell(match: re.Match[str]) -> str:
        names.append(match.group("name"))
        value = render_cell(match.group("name"), match.group("table"), int(match.group("row")),
                            match.group("column"), results)
        return match.group(1) + value + match.group(7)

    return CELL.sub(cell, BLOCK.sub(block, text)), names


def main(check: bool = False) -> int:
    stale = []
    for relative in FILES:
        path = REPO / relative
        new, names = regenerate(path)
        if new == path.read_text():
            print(f"{relative}: benchmark numbers match bench/results ({', '.join(sorted(set(names)))})")
            continue
        if check:
            stale.append(relative)
            continue
        path.write_text(new)
        print(f"{relative}: rewrote {len(names)} benchmark block(s) and cell(s)")
    if stale:
        print(f"{', '.join(stale)}: benchmark numbers differ from bench/results/*.json; run `python -m bench report`")
        return 1
    return 0


# A number that reads as a measurement: it has a decimal point, or a unit of time, rate or ratio follows it.
MEASURED = re.compile(r"(?<![\w.\-/#@])(?<!Python )(?P<number>[+\-−]?\d[\d,]*(?:\.\d+)?(?:e-?\d+)?)(?!\.\d)"
                      r"(?P<unit>\s?(?:ms|µs|s|x|×|minutes?|tok/s|req/s|requests/s|prompts/s|%)(?![\w/]))?")
UNQUOTED = (re.compile(r"<!-- bench:(\w+) -->.*?<!-- /bench:\1 -->", re.DOTALL),
            re.compile(r"<!-- cell:.*?<!-- /cell -->", re.DOTALL),
            re.compile(r"```.*?```", re.DOTALL), re.compile(r"`[^`\n]*`"), re.compile(r"\]\([^)]*\)"))
PROSE_FILES = ("README.md", "docs")


def _value(token: str) -> float | None:
    try:
        return float(token.replace("−", "-").replace(",", "").lstrip("+-"))
    except ValueError:
        return None


def _decimals(token: str) -> int:
    digits = token.split("e")[0]
    return len(digits.split(".")[1]) if "." in digits else 0


def committed_numbers(names: list[str] | None = None, results: Path | None = None) -> list[float]:
    """Every number in the committed results files of `names` (all of them when None; tables, notes, provenance)
    and in the one-off experiments' logs."""
    root = results or REPO / "bench" / "results"
    files = root.glob("*.json") if names is None else (root / f"{name}.json" for name in names)
    values: set[float] = set()
    for path in [*(f for f in files if f.exists()), *(root / "experiments").glob("*.log")]:
        for token in re.findall(r"\d[\d,]*(?:\.\d+)?(?:e-?\d+)?", path.read_text()):
            value = _value(token)
            if value is not None:
                values.add(value)
    return sorted(values)


def untraced_numbers(text: str, committed: list[float]) -> list[tuple[int, str]]:
    """(line, number) for each measurement-looking number in prose that no results file holds, exactly or rounded
    to the decimals the prose shows. Generated blocks, cells, code and link targets are not prose."""
    for pattern in UNQUOTED:
        text = pattern.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    found = []
    for number, line in ((m, text.count("\n", 0, m.start()) + 1) for m in MEASURED.finditer(text)):
        token = number.group("number")
        if "." not in token and not number.group("unit"):
            continue
        value, decimals = _value(token), _decimals(token)
        if value is None or any(abs(round(c, decimals) - value) < 1e-9 or abs(c - value) < 1e-9 for c in committed):
            continue
        found.append((line, token + (number.group("unit") or "")))
    return found


def sections(text: str) -> list[tuple[int, str, list[str]]]:
    """(first line, text, cited result names) for each `## ` section: a section's numbers must come from the results
    of the benches it names (`bench NAME`), so a number cannot pass by matching some unrelated file."""
    found, line = [], 1
    for part in re.split(r"(?m)^(?=## )", text):
        found.append((line, part, sorted(set(re.findall(r"`bench (\w+)`", part)))))
        line += part.count("\n")
    return found
