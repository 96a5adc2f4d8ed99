"""Talking to a running gateway from another process (the CLI, the evaluators): health and the admin API.

Errors come back as the gateway's error body; they are turned back into the exception type that produced them
(serving/protocol.py's table), so `tuneloop promote` exits with the same code whether it ran the promotion
itself or asked a gateway to.
"""

from __future__ import annotations

from typing import Any

import httpx

from tuneloop.config import Config
from tuneloop.errors import EngineUnavailable, TuneloopError
from tuneloop.serving.protocol import ERROR_TYPES


class GatewayNotRunning(EngineUnavailable):
    """Nothing answers at the gateway's address."""


def gateway_url(config: Config) -> str:
    return f"http://{config.serving.gateway_host}:{config.serving.gateway_port}"


class AdminClient:
    def __init__(self, config: Config, *, timeout_s: float = 180.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = gateway_url(config)
        self.token = config.admin_token
        self._timeout_s = timeout_s
        self._transport = transport

    def _http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=self._timeout_s, transport=self._transport)

    def health(self) -> dict[str, Any]:
        """The gateway's /healthz body, or {"status": "not running"}."""
        try:
            with self._http() as http:
                response = http.get("/healthz", timeout=3.0)
        except httpx.HTTPError:
            return {"status": "not running", "url": self.url}
        body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
        return {"url": self.url, **body}

    def served_models(self) -> set[str]:
        return {str(m["id"]) for m in self._call("GET", "/v1/models").get("data", [])}

    def promote(self, version: str) -> dict[str, Any]:
        return self._call("POST", "/admin/promote", {"version": version})

    def rollback(self, task: str) -> dict[str, Any]:
        return self._call("POST", "/admin/rollback", {"task": task})

    def load(self, version: str) -> dict[str, Any]:
        return self._call("POST", "/admin/adapters/load", {"version": version})

    def unload(self, version: str) -> dict[str, Any]:
        return self._call("POST", "/admin/adapters/unload", {"version": version})

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            with self._http() as http:
                response = http.request(method, path, json=body, headers=headers)
        except httpx.ConnectError:
            raise GatewayNotRunning(f"no gateway answers at {self.url}; start `tuneloop serve`") from None
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"the gateway at {self.url} did not answer ({exc.__class__.__name__})") from None
        if response.status_code >= 400:
            raise _error_from(response)
        result: dict[str, Any] = response.json()
        return result


def _error_from(response: httpx.Response) -> TuneloopError:
    try:
        error = response.json().get("error", {})
        message, kind = str(error.get("message", response.text)), str(error.get("type", ""))
    except ValueError:
        message, kind = response.text[:500], ""
    for error_type, status, name in ERROR_TYPES:
        if name == kind and status == response.status_code:
            return error_type(message)
    return TuneloopError(f"the gateway answered {response.status_code}: {message}")
