"""The one way adapters get into and out of vLLM: checked, locked per adapter name, decided from vLLM's own list.

Every caller (the admin API, hot-swap, the evaluators' unrouted-version path through the admin API, and the
promotion gate) loads through `EngineClient.load`, so every path applies the same checks before vLLM sees an
adapter: a registered LoRA version whose files still match their checksum, trained on the served base model,
with a rank and target modules the running engine was started for. Whether an adapter is already loaded is read
from vLLM's `/v1/models`, never guessed from an error message.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tuneloop.errors import AdapterError, EngineUnavailable
from tuneloop.registry import AdapterVersion, verify_adapter


@dataclass(frozen=True)
class EngineLimits:
    """What an engine can serve: the base model it runs and the LoRA shapes it was started for."""

    base_sha256: str
    max_lora_rank: int
    target_modules: tuple[str, ...] = field(default=(), metadata={"help": "Empty: any (no engine yet)."})


def check_servable(version: AdapterVersion, limits: EngineLimits) -> None:
    """Raise AdapterError unless `version` can be served within `limits` (same checks on every path)."""
    if version.method != "lora":
        raise AdapterError(f"{version.ref} is a {version.method} model; only LoRA adapters are served")
    verify_adapter(version)
    if version.base_model_sha256 != limits.base_sha256:
        raise AdapterError(f"{version.ref} was trained on base model {version.base_model_sha256[:12]}, but the "
                           f"engine serves {limits.base_sha256[:12]}; retrain it on the served base")
    rank = int(version.card.hyperparameters.get("rank", 0))
    if rank > limits.max_lora_rank:
        raise AdapterError(f"{version.ref} has LoRA rank {rank}, above the engine's --max-lora-rank "
                           f"{limits.max_lora_rank}; raise serving.max_lora_rank and restart `tuneloop serve`")
    targets = set(version.card.hyperparameters.get("target_modules", []))
    if limits.target_modules and not targets <= set(limits.target_modules):
        raise AdapterError(f"{version.ref} adapts {sorted(targets)}, but the engine was started for "
                           f"{sorted(limits.target_modules)}; restart `tuneloop serve` to serve it")


class EngineClient:
    """Adapter management for one vLLM server. Thread-safe; `loaded` is what this client put there (or adopted
    from the command line), so a supervisor can hand the same set to a restarted engine."""

    def __init__(self, base_url: str, limits: EngineLimits, *, ready: Callable[[], bool] | None = None,
                 timeout_s: float = 120.0, transport: httpx.BaseTransport | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = dict(headers or {})
        self.limits = limits
        self.loaded: dict[str, Path] = {}
        self._ready = ready
        self._timeout_s = timeout_s
        self._transport = transport
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def _http(self) -> httpx.Client:
        """A short-lived client per call: adapter changes are rare, and nothing is left open between them."""
        return httpx.Client(base_url=self.base_url, timeout=self._timeout_s, transport=self._transport,
                            headers=self._headers)

    def adopt(self, name: str, path: Path) -> None:
        """Record an adapter the engine was started with (`--lora-modules`)."""
        self.loaded[name] = path

    def served_models(self) -> set[str]:
        """Every model name vLLM answers to: the base model and each loaded adapter."""
        try:
            with self._http() as http:
                response = http.get("/v1/models", timeout=10.0)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"vLLM at {self.base_url} is not answering ({exc.__class__.__name__})") from None
        if response.status_code != 200:
            raise EngineUnavailable(f"vLLM at {self.base_url} answered {response.status_code} to /v1/models")
        return {str(m["id"]) for m in response.json().get("data", [])}

    def load(self, version: AdapterVersion) -> bool:
        """Check `version` and load it under its ref; False if vLLM already had it. Idempotent."""
        check_servable(version, self.limits)
        with self._lock_for(version.ref):
            self._require_ready()
            if version.ref in self.served_models():
                self.loaded[version.ref] = version.path
                return False
            with self._http() as http:
                response = http.post("/v1/load_lora_adapter",
                                     json={"lora_name": version.ref, "lora_path": str(version.path)})
            if response.status_code != 200:
                raise AdapterError(f"vLLM refused to load {version.ref} from {version.path}: {response.text[:500]}")
            self.loaded[version.ref] = version.path
            return True

    def unload(self, name: str) -> bool:
        """Unload an adapter; False if vLLM did not have it."""
        with self._lock_for(name):
            self._require_ready()
            if name not in self.served_models():
                self.loaded.pop(name, None)
                return False
            with self._http() as http:
                response = http.post("/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60.0)
            if response.status_code != 200:
                raise AdapterError(f"vLLM refused to unload {name}: {response.text[:500]}")
            self.loaded.pop(name, None)
            return True

    def _lock_for(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def _require_ready(self) -> None:
        if self._ready is not None and not self._ready():
            raise EngineUnavailable("vLLM is not ready (starting or restarting); try again shortly")
