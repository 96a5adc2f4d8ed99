"""The supervisor ends an engine's whole process group: vLLM's API server is the group leader and its EngineCore
and Worker children outlive it when it is killed alone (the OOM killer's way). Real processes, no vLLM: a shell
leader with two children stands in for the three vLLM processes; the live version is in test_gateway_live.py."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from tuneloop.serving.engine import end_process_group, process_group_members


def _engine_like_group() -> subprocess.Popen[bytes]:
    leader = subprocess.Popen(["bash", "-c", "sleep 300 & sleep 300 & wait"], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(process_group_members(leader.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(process_group_members(leader.pid)) == 3
    return leader


def test_children_orphaned_by_a_killed_leader_are_ended_with_the_group() -> None:
    leader = _engine_like_group()
    os.kill(leader.pid, signal.SIGKILL)
    leader.wait(5)
    orphans = process_group_members(leader.pid)
    assert len(orphans) == 2, "the children outlive their leader: what a crashed vLLM leaves behind"
    end_process_group(leader.pid, timeout_s=5)
    assert process_group_members(leader.pid) == []


def test_a_child_that_ignores_sigterm_is_killed() -> None:
    leader = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 300 & wait"], start_new_session=True)
    time.sleep(0.3)
    end_process_group(leader.pid, timeout_s=0.5)
    leader.wait(5)
    assert process_group_members(leader.pid) == []


def test_vllm_inherits_only_what_it_needs_and_gets_its_own_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from tuneloop.serving.engine import EngineSpec, build_command, engine_env

    for name, value in {"TUNELOOP_ADMIN_TOKEN": "admin-secret", "TUNELOOP_DATABASE_URL": "postgresql://u:pw@db/x",
                        "AWS_SECRET_ACCESS_KEY": "aws", "OMP_NUM_THREADS": "2", "VLLM_LOGGING_LEVEL": "INFO"}.items():
        monkeypatch.setenv(name, value)
    spec = EngineSpec(model_path=Path("/models/base"), served_name="base")
    env = engine_env(spec)
    assert "admin-secret" not in env.values() and "TUNELOOP_DATABASE_URL" not in env
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert env["OMP_NUM_THREADS"] == "2" and env["VLLM_LOGGING_LEVEL"] == "INFO" and env["PATH"]
    assert spec.api_key and env["VLLM_API_KEY"] == spec.api_key and len(spec.api_key) >= 32
    assert spec.api_key not in " ".join(build_command(spec)), "the key is not on the command line ps shows"
    assert EngineSpec(model_path=Path("/m"), served_name="b").api_key != spec.api_key


def test_orphans_that_ignore_sigterm_do_not_hold_up_a_stop_for_the_whole_timeout() -> None:
    leader = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 300 & exec sleep 0.2"], start_new_session=True)
    time.sleep(0.5)  # the leader has exited; its child ignores SIGTERM, like an orphaned engine core
    ending = threading.Thread(target=end_process_group, args=(leader.pid, 600), daemon=True,
                              kwargs={"leader": leader, "after_leader_s": 0.5})
    ending.start()
    ending.join(timeout=60)  # a hang detector: the bug waited out all 600 s for a group whose leader was gone
    assert not ending.is_alive() and process_group_members(leader.pid) == []


GUARDED_PARENT = """
import os, subprocess, sys, time
engine = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 300 & sleep 300 & wait"], start_new_session=True)
subprocess.run([sys.executable, "-m", "tuneloop.serving.engine_guard", str(os.getpid()), str(engine.pid)],
               check=True, env={**os.environ, "TUNELOOP_ENGINE_GUARD_GRACE_S": "1"})
print(engine.pid, flush=True)
time.sleep(300)
"""


def test_a_guarded_engine_is_ended_whole_when_its_parent_and_the_parents_children_are_sigkilled() -> None:
    # What an engine replica needs: Ray SIGKILLs the actor that started vLLM and then the actor's children (vLLM's
    # API server, here a leader that ignores SIGTERM); vLLM's own children must not outlive them.
    import sys

    parent = subprocess.Popen([sys.executable, "-c", GUARDED_PARENT], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    engine = int(parent.stdout.readline())
    deadline = time.monotonic() + 20
    while len(process_group_members(engine)) < 3 and time.monotonic() < deadline:  # bash and two sleeps
        time.sleep(0.05)
    assert len(process_group_members(engine)) == 3
    parent.kill()
    os.kill(engine, signal.SIGKILL)  # Ray's kill of the dead worker's child processes
    parent.wait(5)
    parent.stdout.close()
    deadline = time.monotonic() + 30
    while process_group_members(engine) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process_group_members(engine) == [], "the guard ended vLLM's whole group"
