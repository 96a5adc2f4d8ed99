"""The docs site: its generated reference pages are current, it builds with `mkdocs build --strict` (a broken link
or anchor fails), every `tuneloop ...` command the operator pages quote parses against the real command tree, and
no help text is mangled by Rich's markup."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

from tuneloop.cli.app import app
from tuneloop.cli.docgen import PAGES, REFERENCE_DIR

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
QUOTED = re.compile(r"`(tuneloop [^`]+)`")
# Placeholders the pages use in commands, and a value of the right type for each.
PLACEHOLDERS = {"T": "sentiment", "ID": "1", "URL": "https://wiki.example.org/runbooks.md", "N": "1",
                "FILE.jsonl": "feedback.jsonl", "A": "sentiment@1", "B": "sentiment@2", "D": "heldout"}
OPERATOR_PAGES = ("runbooks.md", "operations.md", "guide.md", "getting-started.md", "your-own-stack.md")


def test_the_generated_reference_pages_are_current() -> None:
    for name, build in PAGES.items():
        assert (REFERENCE_DIR / name).read_text() == build(), \
            f"docs/reference/{name} is stale: run `python -m tuneloop.cli.docgen`"


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "your-own-stack" / "index.html").exists()
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").exists()


def _commands() -> list[tuple[str, str]]:
    found = []
    for page in OPERATOR_PAGES:
        for quoted in QUOTED.findall((DOCS / page).read_text()):
            if "|" in quoted or "[" in quoted or "COMMAND" in quoted or "..." in quoted:
                continue  # a synopsis (alternatives, optional parts), not a command to type
            found.append((page, quoted))
    return found


@pytest.mark.parametrize("page, command", _commands())
def test_every_quoted_command_parses_against_the_real_cli(page: str, command: str) -> None:
    root = typer.main.get_command(app)
    args = [PLACEHOLDERS.get(word, word) for word in shlex.split(command)[1:]]
    resolved: Any = root
    while args and getattr(resolved, "commands", None) and args[0] in resolved.commands:
        resolved = resolved.commands[args.pop(0)]
    assert not getattr(resolved, "commands", None) or not args, f"{page}: `{command}` names no command"
    if not args and len(shlex.split(command)) > 1:
        return  # the command's name in prose ("`tuneloop compare` reads ..."): the path exists, nothing to parse
    try:
        resolved.make_context(command.split()[0], list(args))
    except Exception as exc:  # typer vendors click: its UsageError is not importable by a stable name
        pytest.fail(f"{page}: `{command}` does not parse: {exc}")


def test_no_help_text_loses_a_bracketed_word_to_rich_markup() -> None:
    markup = re.compile(r"\[/?(bold|italic|dim|red|green|yellow|link)[^\]]*\]")
    bracketed = re.compile(r"\[[a-z_]+\]")

    def walk(command: Any, path: str) -> list[str]:
        bad = []
        texts = [command.help or "", *(getattr(p, "help", None) or "" for p in command.params)]
        for text in texts:
            if bracketed.search(markup.sub("", text)):
                bad.append(f"{path}: {text!r}")
        for name, sub in (getattr(command, "commands", None) or {}).items():
            bad += walk(sub, f"{path} {name}")
        return bad

    assert walk(typer.main.get_command(app), "tuneloop") == []


def _untraced(page: Path) -> list[str]:
    from bench.report import committed_numbers, sections, untraced_numbers

    text = page.read_text()
    if page.name == "benchmarks.md":  # each section's numbers come from the benches it names, nothing else
        found = [(start + line - 1, number) for start, part, names in sections(text)
                 for line, number in untraced_numbers(part, committed_numbers(names))]
    else:
        found = untraced_numbers(text, committed_numbers())
    return [f"{page.relative_to(REPO)}:{line}: {number}" for line, number in found]


def test_every_measured_number_in_prose_comes_from_a_committed_results_file() -> None:
    pages = [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]
    untraced = [entry for page in pages for entry in _untraced(page)]
    assert untraced == [], "numbers no bench/results file holds (quote a cell or remove them):\n" + "\n".join(untraced)


def test_the_number_check_catches_an_invented_measurement_and_passes_a_quoted_one() -> None:
    from bench.report import sections, untraced_numbers

    committed = [0.664, 636.0, 1.63]
    text = ("Zero-shot reaches 0.664, the loop took 636 s, 1.6x as fast; status 409 and 3 seeds are not measurements.\n"
            "Then it took 12.5 s and 7 % more, <!-- cell:x/y/0/z -->99.9<!-- /cell --> and `0.123` in code.\n")
    assert untraced_numbers(text, committed) == [(2, "12.5 s"), (2, "7 %")]
    assert [names for _, _, names in sections("## A (`bench eval`)\ntext\n## B\nsee `bench lora`\n")] == \
        [[], ["eval"], ["lora"]]
