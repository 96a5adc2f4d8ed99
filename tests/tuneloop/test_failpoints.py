"""Failpoints: a mistyped TUNELOOP_FAILPOINTS is refused with every mistake named; a set point SIGKILLs the process
at its step. A promotion killed at each step, in a real child process on a real SQLite registry, leaves either
the old champion (killed after the engine load) or the new one with its event (killed after the flip), never a flip
without the event a rollback reads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.serving.test_hotswap import BASE, _register
from tuneloop import failpoints
from tuneloop.config import Config
from tuneloop.errors import ConfigError
from tuneloop.events import list_events
from tuneloop.registry import find_alias
from tuneloop.serving.engine_client import EngineLimits
from tuneloop.serving.hotswap import HotSwapper
from tuneloop.store import Store


def test_a_bad_failpoint_setting_names_every_mistake() -> None:
    assert failpoints.parse_failpoints("") == {}
    assert failpoints.parse_failpoints(" promotion.after_load=kill , ") == {"promotion.after_load": "kill"}
    with pytest.raises(ConfigError) as refused:
        failpoints.parse_failpoints("promotion.after_lod=kill,worker.after_promote=pause")
    assert refused.value.problems == [
        "unknown failpoint 'promotion.after_lod'; known: promotion.after_load, promotion.after_alias, "
        "worker.after_promote",
        "failpoint 'worker.after_promote' has action 'pause'; known: kill"]
    with pytest.raises(ValueError, match="unknown failpoint"):
        failpoints.reach("nowhere")
    failpoints.reach("promotion.after_load")  # unset in the test environment: nothing happens


PROMOTE = textwrap.dedent("""
    import sys
    from tuneloop.serving.engine_client import EngineLimits
    from tuneloop.serving.hotswap import HotSwapper
    from tuneloop.store import Store

    HotSwapper(Store(sys.argv[1]), EngineLimits(sys.argv[2], 8)).promote("sentiment@2")
    print("promotion finished")
""")


def _promote_in_a_child(store: Store, point: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, failpoints.FAILPOINTS_ENV: f"{point}=kill"}
    return subprocess.run([sys.executable, "-c", PROMOTE, store.url, BASE], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize(("point", "champion_after"), [("promotion.after_load", 1), ("promotion.after_alias", 2)])
def test_a_promotion_killed_at_each_step_leaves_a_consistent_registry(store: Store, config: Config, tmp_path: Path,
                                                                      point: str, champion_after: int) -> None:
    _register(store, config, tmp_path, "one")
    _register(store, config, tmp_path, "two")
    killed = _promote_in_a_child(store, point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "promotion finished" not in killed.stdout
    champion = find_alias(store, "sentiment", "champion")
    assert champion is not None and champion.version == champion_after
    flips = [e for e in list_events(store, kind="alias_champion_set", task="sentiment")
             if e.payload.get("version") == 2]
    assert len(flips) == (champion_after == 2), "the flip and its event commit together or not at all"
    if champion_after == 2:
        restored = HotSwapper(store, EngineLimits(BASE, 8)).rollback("sentiment")
        assert restored.champion == "sentiment@1", "the rollback finds the event the flip wrote"
