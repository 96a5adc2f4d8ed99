"""The gateway's side of engine replicas on Ray Serve (`serving.replicas.engine: ray-serve`).

`ReplicatedEngine` is a `ServingEngine` like the supervised single vLLM: the gateway sends requests to its
`base_url` (Serve's HTTP proxy, which picks a healthy replica) and changes adapters through its `client`. Placement,
health checks and restarts are Serve's; this module only tells Serve what to run, through the Serve REST API on
Ray's dashboard, so the gateway process never joins the Ray cluster.

Consistency: the adapter set is the Serve deployment's `user_config`, applied by every replica
(serving/replicas.py). Loading an adapter is one config change that Serve rolls out to all replicas; the client
returns only once the deployment reports the change complete on every one of them, so a promotion's alias flips
after its candidate is loaded everywhere. If any replica fails to load it, the previous set is put back and the
load raises: the old champion never left the set, and no route changed. A replica that Serve starts later (a
restart, a scale-up) is configured with the current set before it takes requests.

Serve's REST API is declarative for the whole Serve instance: the cluster's Serve runs tuneloop's application
only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tuneloop.config import RAY_ADDRESS_ENV, Config
from tuneloop.errors import AdapterError, ConfigError, EngineUnavailable
from tuneloop.registry import AdapterVersion
from tuneloop.serving.engine import EngineSpec, EngineState
from tuneloop.serving.engine_client import EngineClient, EngineLimits, check_servable

log = logging.getLogger(__name__)
ENGINE_KEY_FILE = "engine-key"
DEPLOYMENT = "EngineReplica"
POLL_S = 1.0


def engine_key(data_dir: Path) -> str:
    """The key gateways send to the replicas, shared through the data dir (owner-only), made once."""
    path = data_dir / ENGINE_KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


Adapters = dict[str, dict[str, str]]  # ref -> {"path": ..., "sha256": ...}: what a replica is told to serve


def revision_of(adapters: Adapters) -> str:
    """The set's own name: the same set is the same revision whichever gateway puts it, so any gateway can tell
    whether the replicas run exactly the set it asked for."""
    return hashlib.sha256(json.dumps(adapters, sort_keys=True).encode()).hexdigest()[:16]


class ServeApplication:
    """tuneloop's Serve application, through the Serve REST API (`/api/serve/applications/`)."""

    def __init__(self, config: Config, spec: EngineSpec, key: str) -> None:
        settings = config.serving.replicas
        address = settings.ray_address or config.resolved_ray_address
        if address is None:
            raise ConfigError("serving.replicas.engine is 'ray-serve' but no Ray cluster is named: set "
                              f"serving.replicas.ray_address, jobs.ray_address or {RAY_ADDRESS_ENV}")
        self.address, self.settings, self.spec = address.rstrip("/"), settings, spec
        self.key_sha256 = hashlib.sha256(key.encode()).hexdigest()
        self.start_timeout_s = config.serving.start_timeout_s

    def _http(self) -> httpx.Client:
        return httpx.Client(base_url=self.address, timeout=30.0)

    def body(self, adapters: Adapters) -> dict[str, Any]:
        spec, settings = self.spec, self.settings
        engine = {"model_path": str(spec.model_path), "served_name": spec.served_name,
                  "max_model_len": spec.max_model_len, "max_lora_rank": spec.max_lora_rank,
                  "max_loras": spec.max_loras, "max_cpu_loras": spec.max_cpu_loras,
                  "lora_target_modules": list(spec.lora_target_modules),
                  "kv_cache_gib": spec.kv_cache_gib, "lora_ops": spec.lora_ops,
                  "lora_compile": spec.lora_compile, "base_sha256": spec.base_sha256,
                  "cpu_reserved_cores": spec.cpu_reserved_cores, "start_timeout_s": self.start_timeout_s}
        return {
            "http_options": {"host": settings.http_host, "port": settings.http_port},
            "applications": [{
                "name": settings.app_name, "route_prefix": f"/{settings.app_name}",
                "import_path": "tuneloop.serving.replicas:build",
                "args": {"engine": engine, "key_sha256": self.key_sha256},
                "runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "VLLM_NO_USAGE_STATS": "1"}},
                "deployments": [{
                    "name": DEPLOYMENT, "num_replicas": settings.count,
                    "user_config": {"adapters": dict(sorted(adapters.items())), "revision": revision_of(adapters)},
                    "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
                    "health_check_period_s": settings.health_check_period_s, "health_check_timeout_s": 30,
                    "graceful_shutdown_timeout_s": 20, "max_ongoing_requests": 256}],
            }],
        }

    def details(self) -> dict[str, Any]:
        """The application's entry in Serve's status (empty when Serve runs no such application)."""
        try:
            with self._http() as http:
                response = http.get("/api/serve/applications/")
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"Ray's dashboard at {self.address} is not answering "
                                    f"({exc.__class__.__name__})") from None
        if response.status_code != 200:
            raise EngineUnavailable(f"Ray's dashboard at {self.address} answered {response.status_code} for Serve's "
                                    "status")
        app: dict[str, Any] = response.json().get("applications", {}).get(self.settings.app_name, {})
        return app

    def deployment(self) -> dict[str, Any]:
        deployment: dict[str, Any] = self.details().get("deployments", {}).get(DEPLOYMENT, {})
        return deployment

    def put(self, body: dict[str, Any]) -> None:
        with self._http() as http:
            response = http.put("/api/serve/applications/", json=body)
        if response.status_code != 200:
            raise EngineUnavailable(f"Serve at {self.address} refused the engine's config: {response.text[:500]}")

    def deployed(self) -> Adapters:
        """The adapter set in the deployment's config now (put by this gateway or another)."""
        config = self.deployment().get("deployment_config", {}).get("user_config") or {}
        adapters: Adapters = config.get("adapters", {})
        return adapters

    def wait_applied(self, done: Callable[[Adapters], bool], what: str, timeout_s: float) -> Adapters:
        """Until the set in Serve's config is `done` (it holds what was loaded, lacks what was unloaded) and every
        replica runs it (the deployment HEALTHY with all its replicas), then that set; raises AdapterError with
        Serve's message when the deployment fails or the time runs out. The set is judged by what it holds, not
        by whose change it is: another gateway may have put a later set that holds this one's change too."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.deployment()
            config = last.get("deployment_config", {}).get("user_config") or {}
            status = last.get("status")
            held: Adapters = config.get("adapters", {})
            if done(held):
                running = [r for r in last.get("replicas", []) if r.get("state") == "RUNNING"]
                if status == "HEALTHY" and len(running) >= self.settings.count:
                    return held
                if status == "HEALTHY" and time.monotonic() > deadline - timeout_s / 2:
                    log.info("waiting for %d replicas (%d running)", self.settings.count, len(running))
                if status in ("DEPLOY_FAILED", "UNHEALTHY") and last.get("status_trigger") != "HEALTH_CHECK_FAILED":
                    raise AdapterError(f"the replicas could not apply {what}: "
                                       f"{status}: {str(last.get('message', ''))[:500]}")
            time.sleep(POLL_S)
        states = [r.get("state") for r in last.get("replicas", [])]
        raise AdapterError(f"the replicas did not all apply {what} within {timeout_s:.0f} s (last: "
                           f"{last.get('status')}, replicas {states}: {str(last.get('message', ''))[:300]})")


class ReplicatedEngineClient(EngineClient):
    """Adapter changes for every replica at once: `loaded` is the set the replicas are configured with.

    Several gateways may share the replicas: a change reads the set Serve holds now and changes only its own
    adapter in it, so one gateway's load does not undo another's (a change at the same instant as another's may
    still have to be repeated: Serve's config is put whole)."""

    def __init__(self, app: ServeApplication, limits: EngineLimits, base_url: str, headers: dict[str, str],
                 apply_timeout_s: float) -> None:
        super().__init__(base_url, limits, headers=headers)
        self.app, self.apply_timeout_s = app, apply_timeout_s
        self._wanted: Adapters = {}
        self._change = threading.Lock()

    @staticmethod
    def _entry(version: AdapterVersion) -> dict[str, str]:
        return {"path": str(version.path), "sha256": version.card.weights_sha256 or ""}

    def adopt_version(self, version: AdapterVersion) -> None:
        """An adapter the replicas start with (the registry's champions and candidates)."""
        self._wanted[version.ref] = self._entry(version)

    def deploy(self, timeout_s: float) -> None:
        """Put the registry's set (merged with what other gateways put) in Serve's config and wait until every
        replica serves it."""
        with self._change:
            try:
                current = self.app.deployed()
            except EngineUnavailable:
                current = {}
            wanted = dict(self._wanted)
            self._apply({**current, **wanted}, lambda held: all(held.get(r) == e for r, e in wanted.items()),
                        "the registry's adapters", timeout_s)

    def _apply(self, adapters: Adapters, done: Callable[[Adapters], bool], what: str, timeout_s: float) -> None:
        self.app.put(self.app.body(adapters))
        held = self.app.wait_applied(done, what, timeout_s)
        self.loaded = {ref: Path(entry["path"]) for ref, entry in held.items()}

    def served_models(self) -> set[str]:
        return {*self.loaded, self.app.spec.served_name}

    def load(self, version: AdapterVersion) -> bool:
        """Load `version` on every replica, or on none: a replica that cannot puts the previous set back."""
        check_servable(version, self.limits)
        with self._change:
            previous = self.app.deployed()
            if version.ref in previous and version.ref in self.loaded:
                return False
            entry = self._entry(version)
            try:
                self._apply({**previous, version.ref: entry}, lambda held: held.get(version.ref) == entry,
                            version.ref, self.apply_timeout_s)
            except (AdapterError, EngineUnavailable) as exc:
                log.error("loading %s on the replicas failed (%s); restoring the previous adapter set", version.ref,
                          exc)
                try:
                    self._apply(previous, lambda held: version.ref not in held, f"the set without {version.ref}",
                                self.apply_timeout_s)
                except (AdapterError, EngineUnavailable) as again:
                    log.error("restoring the previous adapter set failed too: %s", again)
                raise AdapterError(f"{version.ref} could not be loaded on every replica: {exc}") from None
            return True

    def unload(self, name: str) -> bool:
        with self._change:
            current = self.app.deployed()
            if name not in current:
                self.loaded.pop(name, None)
                return False
            self._apply({ref: entry for ref, entry in current.items() if ref != name}, lambda held: name not in held,
                        f"the set without {name}", self.apply_timeout_s)
            return True


class ReplicatedEngine:
    """`ServingEngine` over Serve's replicas: `state` is ready while at least one replica runs."""

    def __init__(self, config: Config, spec: EngineSpec, adapters: list[AdapterVersion]) -> None:
        key = engine_key(config.data_path)
        settings = config.serving.replicas
        self.spec = spec
        self.app = ServeApplication(config, spec, key)
        self._base_url = f"http://{settings.http_host}:{settings.http_port}/{settings.app_name}"
        self._headers = {"Authorization": f"Bearer {key}"}
        self.client = ReplicatedEngineClient(self.app, spec.limits, self._base_url, self._headers,
                                             settings.apply_timeout_s)
        for version in adapters:
            self.client.adopt_version(version)
        self.state: EngineState = "stopped"
        self.restarts = 0
        self._dead_seen: set[str] = set()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.start_timeout_s = config.serving.start_timeout_s

    @property
    def base_url(self) -> str:
        return self._base_url

    @property
    def auth_headers(self) -> dict[str, str]:
        return dict(self._headers)

    def start(self) -> None:
        """Deploy (or re-apply) the application and block until every replica serves the current set."""
        self.state = "starting"
        log.info("deploying %d engine replicas through Ray Serve at %s", self.app.settings.count, self.app.address)
        self.client.deploy(self.start_timeout_s)
        self.state = "ready"
        self._stop.clear()
        self._watcher = threading.Thread(target=self._watch, name="replicas-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        """Follow Serve's view: ready while a replica runs; every replica Serve replaced counts as a restart."""
        while not self._stop.wait(2.0):
            try:
                deployment = self.app.deployment()
            except EngineUnavailable as exc:
                log.warning("replicas: %s", exc)
                continue
            running = [r for r in deployment.get("replicas", []) if r.get("state") == "RUNNING"]
            self.state = "ready" if running else "restarting"
            for dead in deployment.get("recent_dead_replicas", []) or []:
                replica = str(dead.get("replica_id"))
                if replica not in self._dead_seen:
                    self._dead_seen.add(replica)
                    self.restarts += 1

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop following the replicas; they belong to the cluster and keep serving other gateways."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout_s)
        self.state = "stopped"
