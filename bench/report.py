"""`python -m bench report`: rewrite the README's benchmark tables from the committed results files.

The README marks each generated block with `<!-- bench:NAME -->` ... `<!-- /bench:NAME -->`; everything between
the markers is replaced by the provenance line and the tables of `bench/results/NAME.json`, so every number in a
README table traces to a file and a commit. Prose outside the markers is written by people. `--check` fails
when the README differs from what the files say (run by the tests).
"""

from __future__ import annotations

import re
from pathlib import Path

from bench.results import REPO, describe, load_results

BLOCK = re.compile(r"(<!-- bench:(?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /bench:(?P=name) -->)", re.DOTALL)


def render_block(name: str, results: Path | None = None) -> str:
    meta, tables = load_results(name, results)
    body = f"_Measured at {describe(meta)}; file `bench/results/{name}.json`._\n\n"
    return body + "\n".join(t.to_markdown() for t in tables)


def regenerate(readme: Path, results: Path | None = None) -> tuple[str, list[str]]:
    """The README's text with every bench block re-rendered, and the names of the blocks found."""
    text = readme.read_text()
    names: list[str] = []

    def replace(match: re.Match[str]) -> str:
        names.append(match.group("name"))
        return match.group(1) + render_block(match.group("name"), results) + match.group(4)

    return BLOCK.sub(replace, text), names


def main(check: bool = False) -> int:
    readme = REPO / "README.md"
    new, names = regenerate(readme)
    if check:
        if new != readme.read_text():
            print("README.md benchmark tables differ from bench/results/*.json; run `python -m bench report`")
            return 1
        print(f"README.md benchmark tables match bench/results ({', '.join(names)})")
        return 0
    readme.write_text(new)
    print(f"rewrote {len(names)} benchmark block(s) in README.md: {', '.join(names)}")
    return 0
