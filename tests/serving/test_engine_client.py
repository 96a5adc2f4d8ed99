"""The one engine client against a scripted vLLM (httpx transport), on a real registry with real adapter files:
every load runs the servability checks first, "already loaded" is decided from /v1/models (not from an error
message), a refused load or an engine that is not ready changes nothing, and unloading what vLLM lacks is a no-op."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.serving.test_hotswap import BASE, _register
from tuneloop.config import Config
from tuneloop.errors import AdapterError, EngineUnavailable
from tuneloop.registry import get_adapter
from tuneloop.serving.engine_client import EngineClient, EngineLimits
from tuneloop.store import Store


class ScriptedVllm:
    """vLLM's adapter endpoints: what is loaded, what it was asked, and whether it refuses."""

    def __init__(self) -> None:
        self.loaded: set[str] = set()
        self.calls: list[str] = []
        self.refuse = False
        self.slow_s = 0.0
        self.concurrent = 0
        self.max_concurrent = 0
        self._guard = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.calls.append(path)
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "base"}, *({"id": n} for n in sorted(self.loaded))]})
        body = json.loads(request.content)
        if path == "/v1/load_lora_adapter":
            with self._guard:
                self.concurrent += 1
                self.max_concurrent = max(self.max_concurrent, self.concurrent)
            time.sleep(self.slow_s)
            with self._guard:
                self.concurrent -= 1
            if self.refuse:
                return httpx.Response(400, text="The lora adapter is corrupt")
            self.loaded.add(body["lora_name"])
            return httpx.Response(200, text="ok")
        if path == "/v1/unload_lora_adapter":
            self.loaded.discard(body["lora_name"])
            return httpx.Response(200, text="ok")
        return httpx.Response(404)


def client(vllm: ScriptedVllm, *, ready: bool = True) -> EngineClient:
    return EngineClient("http://vllm.test", EngineLimits(BASE, 8, ("q_proj", "v_proj")), ready=lambda: ready,
                        transport=httpx.MockTransport(vllm))


def test_a_load_is_checked_then_sent_once_and_already_loaded_comes_from_the_model_list(
        store: Store, config: Config, tmp_path: Path) -> None:
    vllm = ScriptedVllm()
    engine = client(vllm)
    version = get_adapter(store, _register(store, config, tmp_path, "one"))
    assert engine.load(version) is True and vllm.loaded == {version.ref}
    assert engine.loaded[version.ref] == version.path
    assert engine.load(version) is False, "the model list says it is there: no second load"
    assert vllm.calls.count("/v1/load_lora_adapter") == 1
    vllm.loaded.clear()  # vLLM restarted without it: the model list, not our memory, decides
    assert engine.load(version) is True


def test_refusals_change_nothing(store: Store, config: Config, tmp_path: Path) -> None:
    vllm = ScriptedVllm()
    high = get_adapter(store, _register(store, config, tmp_path, "high", rank=16))
    with pytest.raises(AdapterError, match="rank 16, above the engine's --max-lora-rank 8"):
        client(vllm).load(high)
    assert vllm.calls == [], "a version that fails the checks never reaches vLLM"
    version = get_adapter(store, _register(store, config, tmp_path, "ok"))
    with pytest.raises(EngineUnavailable, match="not ready"):
        client(vllm, ready=False).load(version)
    assert vllm.calls == []
    vllm.refuse = True
    engine = client(vllm)
    with pytest.raises(AdapterError, match="vLLM refused to load .* corrupt"):
        engine.load(version)
    assert version.ref not in engine.loaded and vllm.loaded == set()


def test_unloading_what_vllm_lacks_is_a_no_op_and_an_unreachable_engine_is_unavailable(
        store: Store, config: Config, tmp_path: Path) -> None:
    vllm = ScriptedVllm()
    engine = client(vllm)
    version = get_adapter(store, _register(store, config, tmp_path, "one"))
    engine.load(version)
    assert engine.unload(version.ref) is True and version.ref not in engine.loaded
    assert engine.unload(version.ref) is False and vllm.calls.count("/v1/unload_lora_adapter") == 1

    def down(_: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    dead = EngineClient("http://vllm.test", EngineLimits(BASE, 8, ()), transport=httpx.MockTransport(down))
    with pytest.raises(EngineUnavailable, match="is not answering"):
        dead.served_models()


def test_concurrent_loads_of_one_adapter_reach_vllm_once(store: Store, config: Config, tmp_path: Path) -> None:
    vllm = ScriptedVllm()
    vllm.slow_s = 0.2
    engine = client(vllm)
    version = get_adapter(store, _register(store, config, tmp_path, "one"))
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(engine.load(version))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False, False, False, True], "one load; the others see it in the model list"
    assert vllm.calls.count("/v1/load_lora_adapter") == 1 and vllm.max_concurrent == 1
