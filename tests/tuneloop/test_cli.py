"""The CLI as a user runs it: a real subprocess, a real workspace, exit codes and messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TUNELOOP = [sys.executable, "-m", "tuneloop"]


def run(workspace: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TUNELOOP_CONFIG": ""}
    done = subprocess.run([*TUNELOOP, *args], cwd=workspace, capture_output=True, text=True, env=env, timeout=900)
    if ok:
        assert done.returncode == 0, f"{args} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ws")
    run(path, "init")
    return path


def test_init_writes_a_valid_config_and_registers_the_embedded_datasets(workspace: Path) -> None:
    assert (workspace / "tuneloop.yaml").read_text().startswith("# tuneloop configuration")
    assert "valid (2 tasks" in run(workspace, "config", "validate").stdout
    listed = json.loads(run(workspace, "datasets", "list", "--json").stdout)
    names = {d["name"] for d in listed}
    assert names == {"sentiment/train", "sentiment/heldout", "sentiment/other-topics", "chat/train",
                     "chat/heldout", "chat/autumn-2018"}
    shown = json.loads(run(workspace, "datasets", "show", "sentiment/other-topics", "--json").stdout)
    assert shown["manifest"]["kind"] == "challenger" and len(shown["head"]) == 3


def test_bad_config_is_refused_naming_every_key(workspace: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_key: 1\nserving:\n  gateway_port: 0\n")
    done = run(workspace, "--config", str(bad), "config", "validate", ok=False)
    assert done.returncode == 2
    assert "no_such_key" in done.stderr and "serving.gateway_port" in done.stderr
    as_json = json.loads(run(workspace, "--config", str(bad), "config", "validate", "--json", ok=False).stdout)
    assert as_json["valid"] is False and len(as_json["problems"]) == 2
    done = run(workspace, "--config", str(bad), "datasets", "list", ok=False)
    assert done.returncode == 2 and "no_such_key" in done.stderr and "Traceback" not in done.stderr


def test_bad_import_names_the_line_and_imports_nothing(workspace: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id":"a","input":"hello","reference":"positive"}\n{"id":"b", "input": 3\nnot json\n')
    done = run(workspace, "datasets", "add", str(bad), "--task", "sentiment", "--kind", "challenger",
               "--name", "hostile", ok=False)
    assert done.returncode == 3 and "line 2" in done.stderr and "line 3" in done.stderr
    assert "hostile" not in run(workspace, "datasets", "list").stdout
    good = tmp_path / "good.jsonl"
    good.write_text('{"id":"a","input":"my new phone is great","reference":"positive"}\n')
    added = json.loads(run(workspace, "datasets", "add", str(good), "--task", "sentiment", "--name", "fresh",
                           "--json").stdout)
    assert added["name"] == "sentiment/fresh" and added["version"] == 1 and added["rows"] == 1


def test_leaky_import_is_refused(workspace: Path, tmp_path: Path) -> None:
    train = json.loads(run(workspace, "datasets", "show", "sentiment/train", "--head", "2", "--json").stdout)
    leaky = tmp_path / "leaky.jsonl"
    leaky.write_text("".join(json.dumps({"id": e["id"], "input": e["input"].upper(), "reference": e["reference"]})
                             + "\n" for e in train["head"]))
    done = run(workspace, "datasets", "add", str(leaky), "--task", "sentiment", "--name", "leaky", ok=False)
    assert "2 of 2 examples also occur in sentiment/train@1" in done.stderr


def test_unknown_task_and_bad_hyperparameters_are_clean_errors(workspace: Path) -> None:
    done = run(workspace, "train", "--task", "nope", ok=False)
    assert done.returncode == 2 and "unknown task 'nope'" in done.stderr
    done = run(workspace, "train", "--task", "sentiment", "--rank", "64", ok=False)
    assert "rank 64 exceeds serving.max_lora_rank 8" in done.stderr
    done = run(workspace, "train", "--task", "sentiment", "--learning-rate", "-1", ok=False)
    assert "learning_rate" in done.stderr and "Traceback" not in done.stderr
    done = run(workspace, "adapters", "show", "sentiment@3", ok=False)
    assert done.returncode == 5 and "no adapter sentiment@3" in done.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_train_registers_a_champion_with_a_card(workspace: Path, base_model_dir: Path) -> None:
    config = workspace / "small.yaml"
    config.write_text(
        f"data_dir: {workspace / '.tuneloop'}\nbase_model:\n  path: {base_model_dir}\n"
        "tasks:\n  sentiment:\n    train:\n      batch_size: 4\n      validation_examples: 8\n      eval_every: 2\n")
    run(workspace, "--config", str(config), "train", "--task", "sentiment", "--max-steps", "2", "--quiet")
    listed = json.loads(run(workspace, "--config", str(config), "adapters", "list", "--json").stdout)
    assert [(a["ref"], a["aliases"]) for a in listed] == [("sentiment@1", ["champion"])]
    card = json.loads(run(workspace, "--config", str(config), "adapters", "show", "sentiment@champion",
                          "--json").stdout)["card"]
    assert card["steps"] == 2 and card["method"] == "lora" and card["hyperparameters"]["rank"] == 8
    assert card["datasets"][0]["ref"] == "sentiment/train@1" and len(card["datasets"][0]["sha256"]) == 64
    assert len(card["base_model"]["sha256"]) == 64 and card["weights_sha256"]
    assert card["curve"][-1]["val_loss"] is not None


def _register_fake_adapter(workspace: Path, task: str, *, rank: int = 8, base_sha256: str = "f" * 64) -> str:
    """A registered LoRA version without training (its files are placeholders): enough for the CLI's checks."""
    from tuneloop.config import load_config
    from tuneloop.registry import AdapterCard, register_adapter
    from tuneloop.store import Store

    config = load_config(workspace / "tuneloop.yaml")
    store = Store(config.resolved_database_url)
    folder = workspace / f"fake-{task}-{rank}-{base_sha256[:4]}"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(b"placeholder")
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank}))
    card = AdapterCard(task=task, method="lora", base_model={"name": "b", "sha256": base_sha256}, datasets=[],
                       hyperparameters={"rank": rank, "target_modules": ["q_proj", "v_proj"]})
    try:
        return register_adapter(store, config.data_path, folder, card).ref
    finally:
        store.close()


def test_eval_and_compare_refuse_bad_requests_before_sending_anything(workspace: Path) -> None:
    both = run(workspace, "eval", "--task", "sentiment", "--base", "--adapter", "sentiment@1", ok=False)
    assert both.returncode == 12 and "not both" in both.stderr
    no_champion = run(workspace, "eval", "--task", "chat", ok=False)
    assert no_champion.returncode == 12 and "no champion" in no_champion.stderr
    _register_fake_adapter(workspace, "sentiment")
    not_serving = run(workspace, "eval", "--task", "sentiment", ok=False)
    assert not_serving.returncode == 9 and "start `tuneloop serve`" in not_serving.stderr, not_serving.stderr
    no_dataset = run(workspace, "eval", "--task", "sentiment", "--base", "--dataset", "nope", ok=False)
    assert no_dataset.returncode == 4 and "sentiment/nope" in no_dataset.stderr
    unknown = run(workspace, "compare", "sentiment@7", "sentiment@8", ok=False)
    assert unknown.returncode != 0 and "sentiment@7" in unknown.stderr
    # Two tries instead of the default six: the default's backoff waits ~25 s before giving up, by design.
    impatient = workspace / "impatient.yaml"
    impatient.write_text((workspace / "tuneloop.yaml").read_text().replace("max_attempts: 6", "max_attempts: 2"))
    down = run(workspace, "--config", str(impatient), "eval", "--task", "sentiment", "--base", "--limit", "2",
               "--endpoint", "http://127.0.0.1:9", ok=False)
    assert down.returncode == 9 and "after 2 attempts" in down.stderr and "resume" in down.stderr, down.stderr


@pytest.mark.integration
def test_offline_promote_applies_the_admin_api_checks_and_changes_nothing_when_refused(
        workspace: Path, base_model_dir: Path) -> None:
    from tuneloop.basemodel import ensure_base_model
    from tuneloop.config import load_config, parse_config
    from tuneloop.registry import find_alias
    from tuneloop.store import Store

    config_file = workspace / "served-base.yaml"
    config_file.write_text(f"data_dir: {workspace / '.tuneloop'}\nbase_model:\n  path: {base_model_dir}\n")
    base_sha = ensure_base_model(parse_config(config_file.read_text(), config_dir=workspace)).sha256

    def champion() -> str | None:
        store = Store(load_config(workspace / "tuneloop.yaml").resolved_database_url)
        try:
            found = find_alias(store, "chat", "champion")
            return found.ref if found else None
        finally:
            store.close()

    first = _register_fake_adapter(workspace, "chat", base_sha256=base_sha)
    wrong_base = _register_fake_adapter(workspace, "chat", base_sha256="0" * 64)
    too_big = _register_fake_adapter(workspace, "chat", rank=32, base_sha256=base_sha)
    before = champion()
    assert before is not None
    for ref, reason in ((wrong_base, "trained on base model 000000000000"), (too_big, "rank 32")):
        done = run(workspace, "--config", str(config_file), "promote", ref, ok=False)
        assert done.returncode == 5 and reason in done.stderr, done.stderr
        assert champion() == before, "a refused promotion changes nothing"
    promoted = json.loads(run(workspace, "--config", str(config_file), "promote", first, "--json").stdout)
    assert promoted["champion"] == first and promoted["through_gateway"] is False


def test_feedback_import_reports_bad_lines(workspace: Path, tmp_path: Path) -> None:
    bad = tmp_path / "fb.jsonl"
    bad.write_text('{"request_id": "missing", "reference": "positive"}\n{"oops": 1}\n')
    done = run(workspace, "feedback", "import", str(bad), ok=False)
    assert done.returncode == 3
    assert "fb.jsonl:1: request_id: no captured request" in done.stderr and "fb.jsonl:2:" in done.stderr


def test_drift_and_monitor_commands_refuse_bad_requests_clearly(workspace: Path) -> None:
    no_traffic = run(workspace, "drift", "--task", "sentiment", ok=False)
    assert no_traffic.returncode == 16 and "has 0 captured user prompts" in no_traffic.stderr
    assert "Traceback" not in no_traffic.stderr
    as_json = run(workspace, "drift", "--task", "sentiment", "--json", ok=False)
    error = json.loads(as_json.stdout)["error"]  # under --json the error is JSON too, on stdout
    assert as_json.returncode == error["exit_code"] == 16 and "has 0 captured user prompts" in error["message"]
    assert error["type"] == "NotEnoughTraffic"
    small = run(workspace, "drift", "--task", "sentiment", "--window", "10", ok=False)
    assert small.returncode == 2 and "--window 10 is below monitor.min_window 30" in small.stderr
    unknown = run(workspace, "drift", "--task", "nope", ok=False)
    assert unknown.returncode == 2 and "unknown task 'nope'" in unknown.stderr
    both = run(workspace, "drift", "--task", "sentiment", "--window", "50", "--since", "1h", ok=False)
    assert both.returncode == 2 and "not both" in both.stderr
    bad_since = run(workspace, "drift", "--task", "sentiment", "--since", "yesterday", ok=False)
    assert bad_since.returncode == 2 and "--since" in bad_since.stderr and "15m" in bad_since.stderr
    assert json.loads(run(workspace, "incidents", "--json").stdout) == []
    status = json.loads(run(workspace, "status", "--json").stdout)
    assert status["monitor"]["scheduler_holder"] is None and status["monitor"]["open_incidents"] == []
    drift_help = run(workspace, "drift", "--help").stdout
    assert "--window" in drift_help and "retraining" in drift_help, "drift's help says it runs the policy"


def test_config_show_hides_secrets_and_ops_check_reports_as_json(workspace: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.yaml"
    secret.write_text("database_url: postgresql+psycopg://tuneloop:hunter2@127.0.0.1/db\n"
                      "serving:\n  admin_token: s3cret-token\n")
    shown = run(workspace, "--config", str(secret), "config", "show").stdout
    assert "hunter2" not in shown and "s3cret-token" not in shown and "admin_token: (set)" in shown
    as_json = json.loads(run(workspace, "--config", str(secret), "config", "show", "--json").stdout)
    assert as_json["database_url"] == "postgresql+psycopg://tuneloop:***@127.0.0.1/db"
    repo = Path(__file__).resolve().parents[2]
    report = json.loads(run(workspace, "ops", "check", "--root", str(repo), "--json").stdout)
    assert report == {"current": True, "differences": []}


def test_bad_schedule_and_monitor_config_name_the_key(workspace: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("monitor:\n  false_alarm_rate: 2\n  views: [domain_classifier, telepathy]\n"
                   "tasks:\n  sentiment:\n    schedule: {eval: every day}\n    policy: {drift_windows: -1}\n")
    done = run(workspace, "--config", str(bad), "config", "validate", ok=False)
    assert done.returncode == 2
    for key in ("monitor.false_alarm_rate", "monitor.views.1", "tasks.sentiment.schedule.eval",
                "tasks.sentiment.policy.drift_windows"):
        assert key in done.stderr, done.stderr


def test_retrain_and_jobs_commands_refuse_bad_requests_clearly(workspace: Path, tmp_path: Path) -> None:
    assert json.loads(run(workspace, "jobs", "list", "--json").stdout) == {"jobs": []}
    missing = run(workspace, "jobs", "show", "42", ok=False)
    assert missing.returncode == 4 and "no retraining job 42" in missing.stderr and "Traceback" not in missing.stderr
    unknown = run(workspace, "retrain", "--task", "nope", ok=False)
    assert unknown.returncode == 2 and "unknown task 'nope'" in unknown.stderr
    assert json.loads(run(workspace, "jobs", "list", "--json").stdout) == {"jobs": []}, "a refused call queued a job"
    bad = tmp_path / "bad-retrain.yaml"
    bad.write_text("jobs:\n  runner: kubernetes\ntasks:\n  sentiment:\n    retrain:\n"
                   "      judge_share: 1.5\n      gate: {margin: 0, level: 2}\n      replay_ratio: -1\n")
    done = run(workspace, "--config", str(bad), "config", "validate", ok=False)
    assert done.returncode == 2
    for key in ("jobs.runner", "tasks.sentiment.retrain.judge_share", "tasks.sentiment.retrain.gate.margin",
                "tasks.sentiment.retrain.gate.level", "tasks.sentiment.retrain.replay_ratio"):
        assert key in done.stderr, done.stderr
    assert "--reason" in run(workspace, "retrain", "--help").stdout
