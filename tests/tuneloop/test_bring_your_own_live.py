"""A team's own stack through the whole loop, driven by docs/your-own-stack.md: its command blocks run exactly as
written, in a folder whose `models/my-base` is a base model that is not SmolLM2 (a Qwen2 made here, random weights:
the path is what is tested). Then what they did is checked from the outside: the imported adapter served and
evaluated, the retrain continued from it. A second architecture (GPT-NeoX, fused `query_key_value`) trains with
its own projection names and refuses Llama's with them."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.tiny_models import make_tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "your-own-stack.md"
FENCE = re.compile(r"^```bash\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def guide_blocks() -> list[str]:
    blocks = FENCE.findall(GUIDE.read_text())
    assert len(blocks) >= 6, "the guide's command blocks were not found"
    return blocks


def _env() -> dict[str, str]:
    """The user's shell after `source .venv/bin/activate`: tuneloop and python from this environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("TUNELOOP_ADMIN_TOKEN", "TUNELOOP_CONFIG")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.end_to_end
def test_the_guide_runs_as_written_on_a_qwen2_base_with_an_imported_adapter(tmp_path: Path,
                                                                          base_model_dir: Path) -> None:
    assert _port_free(8400) and _port_free(8401), "the guide serves on the default ports 8400/8401; free them"
    make_tiny_model(tmp_path / "models" / "my-base", "qwen2", base_model_dir)
    script = "set -euo pipefail\n" + "\n".join(guide_blocks())
    log = tmp_path / "guide.log"
    with open(log, "w") as out:
        shell = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=_env(), stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = shell.wait(timeout=1200)
        finally:
            _stop_group(shell)
    output = log.read_text()
    assert code == 0, f"the guide's commands failed:\n{output[-5000:]}"

    assert "Qwen2ForCausalLM" in output and "q_proj, k_proj, v_proj, o_proj (the model has" in output, \
        "task check resolved Qwen2's own projection names"
    reply = json.loads(next(line for line in output.splitlines() if line.startswith('{"id"')))
    assert reply["model"] == "intent@2", "the imported champion answered through the gateway"
    assert reply["choices"][0]["message"]["content"] in ("billing", "delivery", "other")

    from tuneloop.config import load_config
    from tuneloop.registry import get_adapter
    from tuneloop.retrain.jobs import JobStore
    from tuneloop.store import Store

    config = load_config(tmp_path / "tuneloop.yaml")
    store = Store(config.resolved_database_url)
    trained, imported = get_adapter(store, "intent@1").card, get_adapter(store, "intent@2").card
    assert trained.origin == "trained" and imported.origin == "imported"
    assert imported.imported_from is not None and imported.imported_from.path == str((tmp_path / "team-adapter")
                                                                                      .resolve())
    assert trained.device == "cpu" and trained.precision in ("fp32", "bf16-autocast")
    assert trained.hyperparameters["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert "intent@2 on intent/heldout@1, n=30" in output, "eval scored the imported champion through vLLM"

    [job] = JobStore(store).recent(task="intent")
    assert job.state in ("promoted", "rejected") and job.decision is not None, job
    assert [c.role for c in job.decision.checks] == ["heldout", "challenger"]
    candidate = get_adapter(store, f"intent@{job.candidate_version}").card
    assert candidate.parent_version == 2
    assert candidate.hyperparameters["rank"] == 4, "continued from the imported r=4 adapter, not a fresh r=8"
    assert candidate.hyperparameters["target_modules"] == ["q_proj", "v_proj"]
    store.close()


def _stop_group(shell: subprocess.Popen[bytes]) -> None:
    """The guide's background `tuneloop serve` stays in the script's process group: SIGTERM lets it stop vLLM,
    whether the script got to its `kill %1` or failed before."""
    for sig, grace in ((signal.SIGTERM, 60.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(shell.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(shell.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


def test_gpt_neox_trains_with_its_own_projection_names_and_refuses_llamas(tmp_path: Path,
                                                                          base_model_dir: Path) -> None:
    from tuneloop.challenger_sets.catalog import add_dataset
    from tuneloop.challenger_sets.records import Example
    from tuneloop.config import parse_config
    from tuneloop.errors import TrainingError
    from tuneloop.registry import list_adapters
    from tuneloop.retrain.finetune import finetune
    from tuneloop.store import Store

    model = make_tiny_model(tmp_path / "neox", "gpt_neox", base_model_dir)
    task = {"kind": "classification", "labels": ["yes", "no"], "system_prompt": "Answer yes or no.",
            "metrics": ["accuracy"], "primary_metric": "accuracy", "train_dataset": "yn/train",
            "heldout_dataset": "yn/heldout", "train": {"max_steps": 1, "batch_size": 4, "validation_examples": 2}}

    def configured(**train: object) -> Any:
        text = yaml.safe_dump({"data_dir": "data", "base_model": {"path": str(model), "name": "neox"},
                               "tasks": {"yn": {**task, "train": {**task["train"], **train}}}})  # type: ignore[dict-item]
        return parse_config(text, config_dir=tmp_path)

    llama_names = configured(target_modules=["q_proj", "v_proj"])
    store = Store(llama_names.resolved_database_url)
    add_dataset(store, llama_names.data_path, [Example(id=str(i), input=f"message {i}", reference=("yes", "no")[i % 2])
                                               for i in range(24)], task="yn", name="train", kind="train",
                source="test")
    with pytest.raises(TrainingError) as refused:
        finetune(llama_names, store, "yn", progress=False)
    message = str(refused.value)
    assert message.startswith("tasks.yn.train.target_modules: 'q_proj'") and "GPTNeoXForCausalLM" in message
    assert "query_key_value, dense, dense_h_to_4h, dense_4h_to_h" in message
    assert list_adapters(store, "yn") == [], "nothing registered"
    version = finetune(configured(), store, "yn", progress=False)
    assert version.card.hyperparameters["target_modules"] == ["query_key_value", "dense"]
    saved = json.loads((version.path / "adapter_config.json").read_text())["target_modules"]
    assert sorted(saved) == ["dense", "query_key_value"], "PEFT adapted the model's own projections"
    store.close()
