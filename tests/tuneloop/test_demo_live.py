"""`tuneloop demo --fast` from a fresh workspace, as a user runs it: the whole loop, unattended, ends with a
recorded gate decision on a job that both incidents joined, its narration shows every step, and the gate reuses the
scheduled eval's champion runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from tuneloop.config import load_config
from tuneloop.evaluators.runs import RunStore
from tuneloop.ports import free_port
from tuneloop.store import Store
from tuneloop.timewindow import as_utc

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.end_to_end
def test_the_fast_demo_runs_the_whole_loop(tmp_path: Path, base_model_dir: Path) -> None:
    (tmp_path / "tuneloop.yaml").write_text(f"serving:\n  gateway_port: {free_port()}\n  vllm_port: {free_port()}\n")
    models = tmp_path / ".tuneloop" / "models"
    models.mkdir(parents=True)
    (models / base_model_dir.name).symlink_to(base_model_dir, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "TUNELOOP_ADMIN_TOKEN"}
    done = subprocess.run([sys.executable, "-m", "tuneloop", "demo", "--fast", "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1500)
    out = done.stderr  # under --json the narration goes to stderr and stdout is the result alone
    assert done.returncode == 0, (done.stdout + out)[-4000:]
    summary = json.loads(done.stdout)
    for step in ("1. base model", "2. fine-tune sentiment", "2. fine-tune chat", "3. serve", "4. baseline",
                 "5. traffic shifts", "the scheduled eval", "6. incidents -> one retraining job", "7. retraining job",
                 "8. after the decision"):
        assert step in out, f"missing step {step!r}"
    assert "drift check: DRIFT" in out and "labels arrive" in out and "gate: " in out
    assert "tuneloop_drift_detected{task=\"sentiment\"} 1.0" in out
    listed = subprocess.run([sys.executable, "-m", "tuneloop", "jobs", "list", "--json"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    [job] = json.loads(listed.stdout)["jobs"]
    assert summary["fast"] is True and summary["job"]["id"] == job["id"]
    assert summary["job"]["state"] == job["state"] and summary["job"]["decision"] == job["decision"]
    assert job["state"] in ("promoted", "rejected"), job
    triggers = [t["trigger"] for t in job["triggers"]]
    assert {t["source"] for t in triggers} == {"incident"}, "later incidents joined the first one's job"
    # drift and the floor always breach; the live-traffic estimate's rule (monitor/policy.py) does when the labels
    # that arrived put its prediction-powered interval wholly under the floor
    rules = [t["rule"] for t in triggers]
    assert len(rules) == len(set(rules)) and {"drift", "floor:macro_f1:other-topics"} <= set(rules) <= {
        "drift", "floor:macro_f1:other-topics", "estimate:macro_f1:live"}, rules
    checks = job["decision"]["checks"]
    assert [c["role"] for c in checks] == ["heldout", "challenger"]
    assert checks[1]["dataset"].startswith("sentiment/other-topics-gate@")
    assert all(c["comparison"]["delta"] is not None and c["comparison"]["p_value"] is not None for c in checks)
    assert all(c["mde"] > 0 for c in checks)
    assert set(job["stages"]) >= {"assemble", "train", "evaluate"}
    # The scheduled eval judged the champion on the same judge split, so the gate reused those runs: the champion's
    # runs behind both checks are older than the gate, the candidate's were asked by it.
    config = load_config(tmp_path / "tuneloop.yaml")
    store = Store(config.resolved_database_url)
    runs = RunStore(store)
    gate_started = datetime.fromisoformat(job["stages"]["evaluate"]["started_at"])
    for check in checks:
        champion_run, candidate_run = (runs.get(run_id) for run_id in check["runs"])
        assert as_utc(champion_run.started_at) < gate_started <= as_utc(candidate_run.started_at), check
    store.close()
