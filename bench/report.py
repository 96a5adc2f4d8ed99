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
FILES = ("README.md", "docs/benchmarks.md")


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
