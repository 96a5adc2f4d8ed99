"""`tuneloop run` as a user starts it: a real vLLM with a trained adapter, the gateway, the scheduler running the
real eval and drift jobs; `tuneloop status` shows them; SIGTERM stops the whole process tree and frees the lease."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from tuneloop.challenger_sets.catalog import add_dataset
from tuneloop.challenger_sets.records import Example
from tuneloop.config import parse_config
from tuneloop.ports import free_port
from tuneloop.store import Store
from tuneloop.tables import EvalRunRow, JobRunRow, LeaseRow

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TWEETS = [("@united lost my bag again", "negative"), ("@JetBlue lovely crew, thanks!", "positive"),
          ("@Delta flight leaves at 5pm", "neutral"), ("@united 3 hour delay, awful", "negative"),
          ("@SouthwestAir smooth landing, great job", "positive"), ("@AmericanAir which gate?", "neutral")]


def _cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tuneloop", "--config", str(config_path), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.end_to_end
def test_run_schedules_real_jobs_and_stops_cleanly_on_sigterm(tmp_path: Path, base_model_dir: Path) -> None:
    from tuneloop.retrain.finetune import finetune

    gateway_port, vllm_port = free_port(), free_port()
    config_path = tmp_path / "tuneloop.yaml"
    config_path.write_text(
        f"data_dir: data\nbase_model:\n  path: {base_model_dir}\n"
        f"serving:\n  gateway_port: {gateway_port}\n  vllm_port: {vllm_port}\n  max_model_len: 512\n"
        "  kv_cache_gib: 1\n"
        "monitor:\n  lease_s: 3\n"
        "tasks:\n  sentiment:\n    train_dataset: sentiment/tiny\n    heldout_dataset: sentiment/tiny-heldout\n"
        "    challenger_datasets: []\n    schedule: {eval: 1h, drift: 1h}\n"
        "    train: {batch_size: 4, validation_examples: 2, eval_every: 100}\n"
        "  chat:\n    schedule: {eval: null, drift: null}\n")
    config = parse_config(config_path.read_text(), config_dir=tmp_path)
    store = Store(config.resolved_database_url)
    train = [Example(id=str(i), input=t, reference=r) for i, (t, r) in enumerate(TWEETS * 3)]
    add_dataset(store, config.data_path, train, task="sentiment", name="tiny", kind="train", source="test",
                check_leakage=False)
    heldout = [Example(id=f"h{i}", input=f"{t} (again)", reference=r) for i, (t, r) in enumerate(TWEETS)]
    add_dataset(store, config.data_path, heldout, task="sentiment", name="tiny-heldout", kind="heldout",
                source="test", check_leakage=False)
    finetune(config, store, "sentiment", max_steps=2, progress=False)

    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tuneloop", "--config", str(config_path), "run"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        done: list[JobRunRow] = []
        while time.monotonic() < deadline and proc.poll() is None:
            with store.session() as session:
                done = list(session.scalars(select(JobRunRow).where(JobRunRow.status != "running")))
            if {r.job for r in done} == {"eval", "drift"}:
                break
            time.sleep(2)
        assert proc.poll() is None, f"tuneloop run exited early:\n{log.read_text()[-3000:]}"
        by_job = {r.job: r for r in done}
        assert set(by_job) == {"eval", "drift"}, f"jobs did not run in time:\n{log.read_text()[-3000:]}"
        assert by_job["eval"].status == "ok", by_job["eval"].error
        assert by_job["drift"].status == "ok"  # no traffic yet: a quiet skip, not a failure
        with store.session() as session:
            [run] = session.scalars(select(EvalRunRow)).all()
        assert (run.model, run.status, run.dataset_ref) == ("sentiment@1", "complete", "sentiment/tiny-heldout@1")

        metrics = httpx.get(f"http://127.0.0.1:{gateway_port}/metrics", timeout=10).text
        assert 'tuneloop_scheduler_job_runs_total{schedule="eval",status="ok",task="sentiment"} 1.0' in metrics
        assert 'tuneloop_eval_score{adapter="sentiment@1",dataset="tiny-heldout",metric="macro_f1"' in metrics
        assert "tuneloop_scheduler_lease_held 1.0" in metrics

        status = _cli(config_path, "status", "--json")
        assert status.returncode == 0, status.stderr
        monitor = json.loads(status.stdout)["monitor"]
        assert monitor["scheduler_holder"] is not None
        jobs = {j["id"]: j for j in monitor["jobs"]}
        assert jobs["eval:sentiment"]["schedule"] == "1h" and jobs["eval:sentiment"]["next_run"] is not None
        assert jobs["eval:sentiment"]["last_status"] == "ok"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, log.read_text()[-3000:]
    children = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert children == [], "vLLM or another child outlived tuneloop run"
    with store.session() as session:
        assert session.get(LeaseRow, "scheduler") is None  # released, so a standby takes over at once
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{gateway_port}/healthz", timeout=2)
