"""Promotion and rollback on a running engine: load the new adapter, flip the alias atomically, unload the old
one after a grace period so in-flight requests finish on it.

An adapter is checked before vLLM sees it: it must be a registered LoRA version whose files match their
checksum, trained on the served base model, with a rank and target modules the running engine was started for.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from tuneloop.errors import AdapterError
from tuneloop.events import list_events, record_event
from tuneloop.registry import AdapterVersion, clear_alias, find_alias, get_adapter, set_alias, verify_adapter
from tuneloop.store import Store

log = logging.getLogger(__name__)


@dataclass
class SwapResult:
    task: str
    champion: str
    previous: str | None
    seconds: float = 0.0


def check_servable(version: AdapterVersion, *, base_sha256: str, max_rank: int, target_modules: list[str]) -> None:
    if version.method != "lora":
        raise AdapterError(f"{version.ref} is a {version.method} model; only LoRA adapters are served")
    verify_adapter(version)
    if version.base_model_sha256 != base_sha256:
        raise AdapterError(f"{version.ref} was trained on base model {version.base_model_sha256[:12]}, but the "
                           f"engine serves {base_sha256[:12]}; retrain it on the served base")
    rank = int(version.card.hyperparameters.get("rank", 0))
    if rank > max_rank:
        raise AdapterError(f"{version.ref} has LoRA rank {rank}, above the engine's --max-lora-rank {max_rank}; "
                           "raise serving.max_lora_rank and restart `tuneloop serve`")
    targets = set(version.card.hyperparameters.get("target_modules", []))
    if target_modules and not targets <= set(target_modules):
        raise AdapterError(f"{version.ref} adapts {sorted(targets)}, but the engine was started for "
                           f"{sorted(target_modules)}; restart `tuneloop serve` to serve it")


class HotSwapper:
    """Promotions for one gateway; `engine` is an EngineSupervisor (None: no engine runs, flip the registry only)."""

    def __init__(self, store: Store, engine: Any | None, router: Any, *, base_sha256: str, grace_s: float) -> None:
        self.store, self.engine, self.router = store, engine, router
        self.base_sha256 = base_sha256
        self.grace_s = grace_s
        self._lock = threading.Lock()

    def check(self, version: AdapterVersion) -> None:
        max_rank = self.engine.spec.max_lora_rank if self.engine else 10**6
        targets = self.engine.spec.lora_target_modules if self.engine else []
        check_servable(version, base_sha256=self.base_sha256, max_rank=max_rank, target_modules=targets)

    def load(self, ref: str) -> AdapterVersion:
        version = get_adapter(self.store, ref)
        self.check(version)
        if self.engine is not None:
            self.engine.load_adapter(version.ref, version.path)
        return version

    def promote(self, ref: str, *, reason: str = "promoted") -> SwapResult:
        with self._lock:
            version = self.load(ref)
            previous = set_alias(self.store, version.ref, "champion", reason=reason)
            candidate = find_alias(self.store, version.task, "candidate")
            if candidate and candidate.version == version.version:
                clear_alias(self.store, version.task, "candidate")
            if self.router is not None:
                self.router.refresh()
        if self.engine is not None and previous and previous.version != version.version:
            self._unload_later(previous.ref)
        return SwapResult(task=version.task, champion=version.ref, previous=previous.ref if previous else None)

    def rollback(self, task: str) -> SwapResult:
        """Make the champion before the current one champion again (undo the last promotion)."""
        current = find_alias(self.store, task, "champion")
        if current is None:
            raise AdapterError(f"task '{task}' has no champion to roll back")
        for event in list_events(self.store, kind="alias_champion_set", task=task, limit=1000):
            if event.payload.get("version") == current.version and event.payload.get("previous"):
                target = f"{task}@{event.payload['previous']}"
                result = self.promote(target, reason=f"rollback from {current.ref}")
                record_event(self.store, "rollback", f"{task}: {current.ref} -> {target}", task=task,
                             payload={"from": current.version, "to": event.payload["previous"]})
                return result
        raise AdapterError(f"{current.ref} has no previous champion to roll back to")

    def _unload_later(self, name: str) -> None:
        def unload() -> None:
            task = name.split("@")[0]
            active = {f"{task}@{v.version}" for v in (find_alias(self.store, task, "champion"),
                                                      find_alias(self.store, task, "candidate")) if v}
            if name in active:
                return
            if self.engine is None:
                return
            try:
                self.engine.unload_adapter(name)
                log.info("unloaded %s after the %.0f s grace period", name, self.grace_s)
            except Exception as exc:
                log.warning("could not unload %s: %s", name, exc)

        timer = threading.Timer(self.grace_s, unload)
        timer.daemon = True
        timer.start()
