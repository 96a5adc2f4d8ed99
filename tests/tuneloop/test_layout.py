"""The package graph docs/architecture.md draws, checked on every import in the source (module level and inside
functions): serving, monitoring and retraining never import each other, the shared core imports none of them, the
conductor is the only place they meet below the CLI, and every import uses the one `tuneloop.` namespace."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUBSYSTEMS = ("serving", "evaluators", "challenger_sets", "monitor", "retrain")
# Which layer may import which (besides itself). The core is tuneloop/ minus cli/ and conductor/.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "challenger_sets": {"core"},
    "serving": {"core", "challenger_sets"},
    "evaluators": {"core", "challenger_sets", "serving"},
    "monitor": {"core", "challenger_sets", "evaluators"},
    "retrain": {"core", "challenger_sets", "evaluators"},
    "conductor": {"core", *SUBSYSTEMS},
    "cli": {"core", "conductor", *SUBSYSTEMS},
}


def layer_of_file(path: Path) -> str:
    top = path.relative_to(REPO).parts
    if top[0] in SUBSYSTEMS:
        return top[0]
    if top[0] == "tuneloop" and len(top) > 2 and top[1] in ("cli", "conductor"):
        return top[1]
    if top == ("tuneloop", "__main__.py"):  # `python -m tuneloop` is the CLI
        return "cli"
    return "core"


def layer_of_module(name: str) -> str | None:
    """The layer an imported module belongs to; None for third-party and standard-library modules."""
    parts = name.split(".")
    if parts[0] != "tuneloop":
        return None
    if len(parts) > 1 and parts[1] in (*SUBSYSTEMS, "cli", "conductor"):
        return parts[1]
    return "core"


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def source_files() -> list[Path]:
    roots = [REPO / "tuneloop", *(REPO / name for name in SUBSYSTEMS)]
    return sorted(p for root in roots for p in root.rglob("*.py"))


def test_every_import_follows_the_package_graph() -> None:
    broken = []
    for path in source_files():
        own = layer_of_file(path)
        for line, module in imports(path):
            target = layer_of_module(module)
            if target is not None and target != own and target not in ALLOWED[own]:
                broken.append(f"{path.relative_to(REPO)}:{line}: {own} imports {module} ({target})")
    assert broken == [], "imports against docs/architecture.md's graph:\n" + "\n".join(broken)


def test_no_module_imports_a_subsystem_by_its_top_level_folder_name() -> None:
    """`import serving` works from the checkout (its root is on sys.path) but not from the installed wheel."""
    stale = [f"{path.relative_to(REPO)}:{line}: {module}"
             for root in (REPO / "tests", REPO / "bench", *source_files())
             for path in ([root] if root.is_file() else sorted(root.rglob("*.py")))
             if "experiments" not in path.parts
             for line, module in imports(path) if module.split(".")[0] in SUBSYSTEMS]
    assert stale == []


def test_the_graph_is_checked_against_real_imports() -> None:
    """The rule above would pass vacuously if the walk found nothing: it sees the imports the design relies on."""
    seen = {(layer_of_file(p), layer_of_module(m)) for p in source_files() for _, m in imports(p)}
    assert ("conductor", "serving") in seen and ("conductor", "retrain") in seen and ("conductor", "monitor") in seen
    assert ("retrain", "evaluators") in seen and ("evaluators", "serving") in seen
    assert not {("serving", "retrain"), ("serving", "monitor"), ("retrain", "serving"), ("monitor", "serving"),
                ("monitor", "retrain"), ("retrain", "monitor")} & seen


def test_the_cli_starts_without_the_heavy_libraries() -> None:
    """`tuneloop --help` and every read command start in about a second: torch (~2 s), Evidently (~4.5 s) and vLLM
    are imported by the commands that use them, never at start-up."""
    import subprocess
    import sys

    probe = "import sys, tuneloop.cli; print(sorted(m for m in ('torch', 'evidently', 'vllm', 'transformers') " \
            "if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
