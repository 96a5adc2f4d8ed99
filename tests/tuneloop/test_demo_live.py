"""`tuneloop demo --fast` from a fresh workspace, as a user runs it: the whole loop, unattended, ends with a
recorded gate decision on a job that both incidents joined, and its narration shows every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_fast_demo_runs_the_whole_loop(tmp_path: Path, base_model_dir: Path) -> None:
    (tmp_path / "tuneloop.yaml").write_text(f"serving:\n  gateway_port: {free_port()}\n  vllm_port: {free_port()}\n")
    models = tmp_path / ".tuneloop" / "models"
    models.mkdir(parents=True)
    (models / base_model_dir.name).symlink_to(base_model_dir, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "TUNELOOP_ADMIN_TOKEN"}
    done = subprocess.run([sys.executable, "-m", "tuneloop", "demo", "--fast"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1500)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    for step in ("1. base model", "2. fine-tune sentiment", "2. fine-tune chat", "3. serve", "4. baseline",
                 "5. traffic shifts", "6. incident -> retraining job", "7. retraining job", "8. after the decision"):
        assert step in out, f"missing step {step!r}"
    assert "drift check: DRIFT" in out and "labels arrive" in out and "gate: " in out
    assert "tuneloop_drift_detected{task=\"sentiment\"} 1.0" in out
    listed = subprocess.run([sys.executable, "-m", "tuneloop", "jobs", "list", "--json"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    [job] = json.loads(listed.stdout)["jobs"]
    assert job["state"] in ("promoted", "rejected"), job
    assert [t["source"] for t in job["triggers"]] == ["incident", "incident"], "the second incident joined"
    assert {t["reason"].split(": ", 1)[1] for t in job["triggers"]} == {"drift", "floor:macro_f1:other-topics"}
    checks = job["decision"]["checks"]
    assert [c["role"] for c in checks] == ["heldout", "challenger"]
    assert checks[1]["dataset"].startswith("sentiment/other-topics-gate@")
    assert all(c["delta"] is not None and c["p_value"] is not None and c["mde"] is not None for c in checks)
    assert set(job["stages"]) >= {"assemble", "train", "evaluate"}
