"""Promotion and rollback: load the new adapter through the engine client, flip the alias atomically, unload the
old one after a grace period so in-flight requests finish on it.

With no engine (`tuneloop promote` while nothing serves) the same checks run against the limits the next
`tuneloop serve` will start with, and only the registry changes.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from tuneloop import failpoints
from tuneloop.errors import AdapterError
from tuneloop.events import list_events, record_event
from tuneloop.registry import AdapterVersion, alias_versions, find_alias, get_adapter, set_alias
from tuneloop.serving.engine_client import EngineClient, EngineLimits, check_servable
from tuneloop.serving.routing import Router
from tuneloop.store import Store

log = logging.getLogger(__name__)


@dataclass
class SwapResult:
    task: str
    champion: str
    previous: str | None


class HotSwapper:
    """Promotions for one gateway (`client` and `router` set) or for the registry alone (both None)."""

    def __init__(self, store: Store, limits: EngineLimits, *, client: EngineClient | None = None,
                 router: Router | None = None, grace_s: float = 0.0) -> None:
        self.store, self.limits, self.client, self.router = store, limits, client, router
        self.grace_s = grace_s
        self._lock = threading.Lock()
        self._timers: list[threading.Timer] = []

    def load(self, ref: str) -> AdapterVersion:
        """Check a version and, with an engine, load it (no routing change)."""
        version = get_adapter(self.store, ref)
        if self.client is not None:
            self.client.load(version)
        else:
            check_servable(version, self.limits)
        return version

    def promote(self, ref: str, *, reason: str = "promoted") -> SwapResult:
        with self._lock:
            version = self.load(ref)
            failpoints.reach("promotion.after_load")
            previous = set_alias(self.store, version.ref, "champion", reason=reason, clear="candidate")
            failpoints.reach("promotion.after_alias")
            if self.router is not None:
                self.router.refresh()
        if self.client is not None and previous and previous.version != version.version:
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

    def follow(self) -> list[str]:
        """Serve what the registry says now, when it was changed elsewhere (another gateway on this database):
        load each champion and candidate this engine lacks, then route to them; a version that fails to load
        keeps the task on what it was routed to before (logged, retried next time), so a bad promotion elsewhere
        never turns into 404s here. Returns the refs that changed routing."""
        if self.router is None or self.client is None:
            return []
        with self._lock:
            configured = self.router.config.tasks
            wanted = {key: v for key, v in alias_versions(self.store).items() if key[0] in configured}
            routed = self.router.current()
            if wanted == routed:
                return []
            applied = dict(wanted)
            for (task, alias), version in wanted.items():
                ref = f"{task}@{version}"
                if routed.get((task, alias)) == version or ref in self.client.loaded:
                    continue
                try:
                    self.load(ref)
                except Exception as exc:  # noqa: BLE001 - any failure: keep routing what works, retry next poll
                    log.error("cannot follow %s of %s to %s: %s", alias, task, ref, exc)
                    applied.pop((task, alias))
                    if (task, alias) in routed:
                        applied[(task, alias)] = routed[(task, alias)]
            self.router.apply(applied)
            changed = sorted(f"{task}@{v}" for (task, alias), v in applied.items() if routed.get((task, alias)) != v)
            replaced = {f"{task}@{v}" for (task, alias), v in routed.items() if applied.get((task, alias)) != v}
        for name in replaced:
            self._unload_later(name)
        if changed:
            log.info("following the registry: now routing %s", ", ".join(changed))
        return changed

    def _unload_later(self, name: str) -> None:
        client = self.client
        if client is None:
            return

        def unload() -> None:
            # Under the swap lock: a promotion or rollback back to `name` in the meantime either finished (then
            # `name` is active again and stays) or waits for this unload (then it finds it gone and loads it).
            with self._lock:
                task = name.split("@")[0]
                active = {v.ref for v in (find_alias(self.store, task, "champion"),
                                          find_alias(self.store, task, "candidate")) if v}
                if name in active:
                    return
                try:
                    client.unload(name)
                    log.info("unloaded %s after the %.0f s grace period", name, self.grace_s)
                except Exception as exc:  # noqa: BLE001 - a failed unload only costs memory; say so and go on
                    log.warning("could not unload %s: %s", name, exc)

        timer = threading.Timer(self.grace_s, unload)
        timer.daemon = True
        self._timers = [t for t in self._timers if t.is_alive()] + [timer]
        timer.start()

    def close(self) -> None:
        """Cancel the unloads still waiting out their grace period: this gateway is stopping, and with engine
        replicas that other gateways share, an unload from a gateway that has gone would change what they
        serve."""
        for timer in self._timers:
            timer.cancel()
        self._timers = []
