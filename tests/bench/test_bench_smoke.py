"""Every benchmark runs end to end at smoke size, so none can rot between measurements (`make bench-smoke`); and
the README's benchmark tables are exactly what the committed result files say (`make test`).

Every smoke run is marked `long_bench`: the six that start vLLM engines take a minute or more per engine on 2 CPU
cores, and the four without one (training, budget, lora_quality, drift) took 396 s together in the last fresh-clone
`make test`, a quarter of the 25 minutes the suite may take on CI. Their code paths are covered by the serving,
evaluator, monitor and retrain tests; what only they cover is each bench's own table code, which `make bench-smoke`
runs (before any `make bench` is committed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import BENCHMARKS
from bench.report import FILES, regenerate
from bench.results import REPO
from tests.conftest import CACHE


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.long_bench
@pytest.mark.parametrize("name", BENCHMARKS)
def test_the_bench_runs_at_smoke_size_and_saves_tables_with_provenance(name: str, tmp_path: Path,
                                                                        base_model_dir: Path) -> None:
    env = {**os.environ, "TUNELOOP_BENCH_RESULTS": str(tmp_path), "TUNELOOP_BENCH_CACHE": str(CACHE),
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "bench", name, "--quick"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    provenance = saved["provenance"]
    assert provenance["quick"] is True and len(provenance["commit"]) == 40
    assert provenance["cpu"]["model"] and provenance["cpu"]["cores"] >= 1 and "flags" in provenance["cpu"]
    assert saved["tables"], "a bench that measured nothing"
    for table in saved["tables"]:
        assert table["rows"] and all(len(row) == len(table["headers"]) for row in table["rows"]), table["title"]
        assert not any("nan" in str(cell).lower() for row in table["rows"] for cell in row), table["title"]
    assert (tmp_path / f"{name}.md").read_text().startswith(f"# bench {name}")
    assert not (REPO / "bench" / "results" / f"{name}.json").exists() or \
        json.loads((REPO / "bench" / "results" / f"{name}.json").read_text())["provenance"]["quick"] is False, \
        "a smoke run must never overwrite a measurement"


def test_the_benchmark_numbers_in_the_docs_and_readme_are_generated_from_the_committed_results() -> None:
    cited: set[str] = set()
    for relative in FILES:
        path = REPO / relative
        regenerated, names = regenerate(path)
        assert regenerated == path.read_text(), f"{relative} differs from bench/results: run `python -m bench report`"
        cited.update(names)
    assert {"serving", "retrain", "labels"} <= cited
    for name in cited:
        saved = json.loads((REPO / "bench" / "results" / f"{name}.json").read_text())
        assert saved["provenance"]["quick"] is False and saved["provenance"]["commit"], name