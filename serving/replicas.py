"""Engine replicas on Ray Serve (`serving.engine: ray-serve`): N copies of vLLM's OpenAI server behind Serve's HTTP
proxy, placed, health-checked and restarted by Serve.

Each replica is a Serve deployment replica that runs one vLLM as its child process (started and stopped the way
`tuneloop serve` starts its own, `serving/engine.py`, but never restarted by us: a replica whose vLLM fails its
health check is replaced by Serve) and relays the gateway's requests to it. The adapters it serves are the
deployment's `user_config`: `{"adapters": {ref: {"path": ..., "sha256": ...}}, "revision": n}`. Serve hands it to
every replica, to a replica that starts later and to one that replaces a dead one, so every replica serves the same
set, and the gateway (serving/replicated_engine.py) changes it for all of them at once. An adapter is loaded only
after its weights match the checksum the registry holds: replicas on other nodes read it from shared storage,
where a stale or partial copy must not be served under a name that promises otherwise (names are immutable
versions, so a replaced adapter never hides behind a cached name either).

Who may call a replica: the gateway, which holds the engine key; the replica checks the key against the SHA-256
digest in its arguments (the Serve config, readable on Ray's dashboard, holds only the digest). Everything else
gets 401, as vLLM's own key does for the single engine.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from tuneloop.ports import free_port
from tuneloop.registry import adapter_weights_sha256
from tuneloop.serving.engine import EngineSpec, EngineSupervisor

log = logging.getLogger(__name__)
RELAYED_HEADERS = ("content-type",)




class EngineReplica:
    """One vLLM and the adapter set of the deployment's user_config."""

    def __init__(self, engine: dict[str, Any], key_sha256: str) -> None:
        spec = EngineSpec(model_path=Path(engine["model_path"]), served_name=engine["served_name"],
                          port=free_port(), max_model_len=engine["max_model_len"],
                          max_lora_rank=engine["max_lora_rank"], max_loras=engine["max_loras"],
                          max_cpu_loras=engine.get("max_cpu_loras"),
                          lora_target_modules=list(engine["lora_target_modules"]), kv_cache_gib=engine["kv_cache_gib"],
                          lora_ops=engine["lora_ops"], lora_compile=bool(engine.get("lora_compile", False)),
                          base_sha256=engine["base_sha256"],
                          cpu_reserved_cores=engine.get("cpu_reserved_cores"))
        self.key_sha256 = key_sha256
        log_dir = Path(tempfile.mkdtemp(prefix="tuneloop-replica-"))
        self.engine = EngineSupervisor(spec, log_dir / "vllm.log", restart=False, guarded=True,
                                       start_timeout_s=float(engine.get("start_timeout_s", 900)))
        self.engine.start()
        self.http = httpx.AsyncClient(base_url=spec.base_url, headers=spec.auth_headers,
                                      timeout=httpx.Timeout(600.0, connect=5.0))
        self.adapters: dict[str, str] = {}  # ref -> sha256 of what this replica's vLLM holds
        self.revision = ""
        self._lock = asyncio.Lock()

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve the adapter set in `config`: load what is missing (each checked against its checksum), unload what
        is no longer named. Raises on the first adapter that cannot be loaded: Serve then reports the update failed,
        and the gateway restores the previous set before it changes any route."""
        wanted: dict[str, dict[str, str]] = config.get("adapters", {})
        async with self._lock:
            for ref, adapter in wanted.items():
                if self.adapters.get(ref) == adapter["sha256"]:
                    continue
                path = Path(adapter["path"])
                actual = await asyncio.to_thread(adapter_weights_sha256, path)
                if actual != adapter["sha256"]:
                    raise RuntimeError(f"{ref}: the weights at {path} do not match the registry's checksum on this "
                                       f"node ({actual[:12]} != {adapter['sha256'][:12]}); is the shared storage "
                                       "complete here?")
                response = await self.http.post("/v1/load_lora_adapter",
                                                json={"lora_name": ref, "lora_path": str(path)})
                if response.status_code != 200 and "already been loaded" not in response.text:
                    raise RuntimeError(f"vLLM refused to load {ref}: {response.text[:300]}")
                self.adapters[ref] = adapter["sha256"]
            for ref in [r for r in self.adapters if r not in wanted]:
                response = await self.http.post("/v1/unload_lora_adapter", json={"lora_name": ref})
                if response.status_code != 200:
                    log.warning("vLLM refused to unload %s: %s", ref, response.text[:300])
                self.adapters.pop(ref, None)
            self.revision = str(config.get("revision", ""))

    async def check_health(self) -> None:
        """Serve's health check: a replica whose vLLM exited or stopped answering is replaced."""
        process = self.engine.process
        if process is None or process.poll() is not None:
            raise RuntimeError(f"vLLM exited with code {process.returncode if process else None}")
        response = await self.http.get("/health", timeout=10.0)
        if response.status_code != 200:
            raise RuntimeError(f"vLLM's health check answered {response.status_code}")

    async def __call__(self, request: Request) -> Response:
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(hashlib.sha256(bearer.encode()).hexdigest(), self.key_sha256):
            return JSONResponse({"error": {"message": "the engine's key is required", "type": "authentication_error",
                                           "code": 401}}, status_code=401)
        path = "/" + request.url.path.removeprefix(request.scope.get("root_path", "")).lstrip("/")
        if path == "/tuneloop/adapters":
            return JSONResponse({"revision": self.revision, "adapters": sorted(self.adapters)})
        body = await request.body()
        upstream = self.http.build_request(request.method, path, content=body,
                                           headers={"content-type": request.headers.get("content-type",
                                                                                        "application/json")})
        response = await self.http.send(upstream, stream=True)
        headers = {k: v for k, v in response.headers.items() if k.lower() in RELAYED_HEADERS}

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            finally:
                await response.aclose()

        return StreamingResponse(relay(), status_code=response.status_code, headers=headers)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop(timeout_s=10.0)


def build(args: dict[str, Any]) -> Any:
    """Serve's application builder (`import_path: tuneloop.serving.replicas:build`, `args` from the gateway)."""
    deployment = serve.deployment(name="EngineReplica")(EngineReplica)
    return deployment.bind(args["engine"], args["key_sha256"])
