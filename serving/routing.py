"""Which adapter answers a request: task name -> champion (or, for a canary share, the candidate), `task@N` ->
that version if the engine has it loaded, the base model's served name -> no adapter.

The alias table is read from the registry and cached; it is refreshed after every promotion and rollback made
through this gateway, and a flip made elsewhere (another gateway on the same database, `tuneloop promote` with
no gateway) is followed by `HotSwapper.follow`, polled every serving.alias_poll_s.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from tuneloop.config import Config
from tuneloop.errors import AdapterUnavailable, ModelNotFound
from tuneloop.parsing import is_integer
from tuneloop.registry import Alias, alias_versions
from tuneloop.store import Store

RouteKind = Literal["champion", "candidate", "explicit", "base", "shadow"]


@dataclass(frozen=True)
class Route:
    """Who answers: `target` is the name vLLM knows (`task@N` or the base model's served name)."""

    task: str | None
    version: int | None
    target: str = ""
    kind: RouteKind = "champion"

    @property
    def adapter(self) -> str:
        return f"{self.task}@{self.version}" if self.task and self.version else "base"


class Router:
    def __init__(self, config: Config, store: Store, loaded: Callable[[], set[str]], *,
                 seed: int | None = None) -> None:
        self.config = config
        self.store = store
        self.loaded = loaded
        self.base_name = config.base_model.name
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.champions: dict[str, int] = {}
        self.candidates: dict[str, int] = {}

    def refresh(self) -> None:
        """Route by the registry's aliases as they are now."""
        self.apply(alias_versions(self.store))

    def apply(self, aliases: dict[tuple[str, Alias], int]) -> None:
        """Route by `aliases` ((task, alias) -> version; tasks not configured here are ignored)."""
        configured = self.config.tasks
        champions = {task: v for (task, alias), v in aliases.items() if alias == "champion" and task in configured}
        candidates = {task: v for (task, alias), v in aliases.items() if alias == "candidate" and task in configured}
        with self._lock:
            self.champions, self.candidates = champions, candidates

    def current(self) -> dict[tuple[str, Alias], int]:
        """What routing uses now, in `apply`'s shape."""
        with self._lock:
            return {**{(t, "champion"): v for t, v in self.champions.items()},
                    **{(t, "candidate"): v for t, v in self.candidates.items()}}

    def resolve(self, model: str) -> Route:
        if model == self.base_name:
            return Route(task=None, version=None, target=self.base_name, kind="base")
        task, _, version = model.partition("@")
        if task not in self.config.tasks:
            raise ModelNotFound(f"The model '{model}' does not exist. Use a task name ({sorted(self.config.tasks)}), "
                                f"task@N, or '{self.base_name}'.")
        with self._lock:
            champion = self.champions.get(task)
            candidate = self.candidates.get(task)
        if version:
            if not is_integer(version):
                raise ModelNotFound(f"The model '{model}' does not exist: write task@N.")
            name = f"{task}@{int(version)}"
            if name not in self.loaded():
                raise ModelNotFound(f"The model '{name}' is not loaded; load it with POST /admin/adapters/load.")
            return Route(task=task, version=int(version), target=name, kind="explicit")
        if champion is None:
            raise ModelNotFound(f"Task '{task}' has no champion adapter yet; train one with "
                                f"`tuneloop train --task {task}`.")
        share = self.config.tasks[task].rollout.canary_share
        loaded = self.loaded()
        if candidate is not None and share > 0 and self._rng.random() < share and f"{task}@{candidate}" in loaded:
            return Route(task=task, version=candidate, target=f"{task}@{candidate}", kind="candidate")
        if f"{task}@{champion}" not in loaded:
            # A champion whose files failed the serving checks at start-up (or that vLLM refused) is not in the
            # engine: say so, rather than pass the request on for vLLM's bare 404.
            raise AdapterUnavailable(f"task '{task}': its champion {task}@{champion} is not loaded in the engine "
                                     "(see the gateway log for why; `tuneloop rollback` restores the previous one)")
        return Route(task=task, version=champion, target=f"{task}@{champion}", kind="champion")

    def shadow_for(self, route: Route) -> Route | None:
        """The candidate that shadows a champion request, if the task has shadowing on and a candidate."""
        if route.kind != "champion" or route.task is None or not self.config.tasks[route.task].rollout.shadow:
            return None
        with self._lock:
            candidate = self.candidates.get(route.task)
        if candidate is None or candidate == route.version or f"{route.task}@{candidate}" not in self.loaded():
            return None
        return Route(task=route.task, version=candidate, target=f"{route.task}@{candidate}", kind="shadow")
