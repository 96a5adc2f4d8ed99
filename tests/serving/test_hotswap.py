"""Adapters are checked before vLLM sees them (registry + files, no engine needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneloop.config import Config
from tuneloop.errors import AdapterError
from tuneloop.registry import AdapterCard, find_alias, get_adapter, register_adapter, set_alias
from tuneloop.serving.engine import RESERVED_CORES_ENV, EngineSpec, build_command, engine_env, vllm_rank
from tuneloop.serving.engine_client import EngineLimits, check_servable
from tuneloop.serving.hotswap import HotSwapper
from tuneloop.store import Store

BASE = "b" * 64


def _register(store: Store, config: Config, tmp_path: Path, name: str, *, rank: int = 8, base: str = BASE,
              targets: tuple[str, ...] = ("q_proj", "v_proj")) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(name.encode())
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank}))
    card = AdapterCard(task="sentiment", method="lora", base_model={"name": "b", "sha256": base}, datasets=[],
                       hyperparameters={"rank": rank, "target_modules": list(targets)})
    return register_adapter(store, config.data_path, folder, card).ref


def test_incompatible_adapters_are_refused_with_the_reason(store: Store, config: Config, tmp_path: Path) -> None:
    ok = get_adapter(store, _register(store, config, tmp_path, "ok"))
    check_servable(ok, EngineLimits(BASE, 8, ("q_proj", "v_proj", "o_proj")))
    high = get_adapter(store, _register(store, config, tmp_path, "high", rank=16))
    with pytest.raises(AdapterError, match="rank 16, above the engine's --max-lora-rank 8"):
        check_servable(high, EngineLimits(BASE, 8))
    other = get_adapter(store, _register(store, config, tmp_path, "other", base="c" * 64))
    with pytest.raises(AdapterError, match="trained on base model cccccccccccc"):
        check_servable(other, EngineLimits(BASE, 8))
    mlp = get_adapter(store, _register(store, config, tmp_path, "mlp", targets=("up_proj",)))
    with pytest.raises(AdapterError, match="adapts \\['up_proj'\\]"):
        check_servable(mlp, EngineLimits(BASE, 8, ("q_proj", "v_proj")))
    (ok.path / "adapter_model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(AdapterError, match="do not match the checksum"):
        check_servable(ok, EngineLimits(BASE, 8))


def test_registry_only_promotion_and_rollback(store: Store, config: Config, tmp_path: Path) -> None:
    _register(store, config, tmp_path, "one")
    _register(store, config, tmp_path, "two")
    swapper = HotSwapper(store, EngineLimits(BASE, 8))
    result = swapper.promote("sentiment@2")
    assert (result.champion, result.previous) == ("sentiment@2", "sentiment@1")
    assert swapper.rollback("sentiment").champion == "sentiment@1"
    champion = find_alias(store, "sentiment", "champion")
    assert champion is not None and champion.version == 1
    set_alias(store, "sentiment@2", "candidate")
    swapper.promote("sentiment@2")
    assert find_alias(store, "sentiment", "candidate") is None, "a promoted candidate stops being candidate"
    high = _register(store, config, tmp_path, "high", rank=16)
    with pytest.raises(AdapterError, match="rank 16"):
        swapper.promote(high)
    champion = find_alias(store, "sentiment", "champion")
    assert champion is not None and champion.version == 2, "a refused promotion changes nothing"


def test_engine_flags_follow_the_served_adapters(tmp_path: Path) -> None:
    assert vllm_rank(4) == 8 and vllm_rank(8) == 8 and vllm_rank(12) == 16
    command = build_command(EngineSpec(model_path=tmp_path, served_name="base", max_lora_rank=8,
                                       lora_target_modules=["q_proj", "v_proj"],
                                       lora_modules={"sentiment@1": tmp_path / "a"}))
    joined = " ".join(command)
    assert "--max-lora-rank 8" in joined and "--lora-target-modules q_proj v_proj" in joined
    assert f"--lora-modules sentiment@1={tmp_path / 'a'}" in joined and "--host 127.0.0.1" in joined


def test_vllm_keeps_no_core_for_its_scheduler_on_two_cores_unless_told(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RESERVED_CORES_ENV, raising=False)
    spec = EngineSpec(model_path=tmp_path, served_name="base")
    monkeypatch.setattr("tuneloop.serving.engine.usable_cpu_cores", lambda: 2)
    assert engine_env(spec)[RESERVED_CORES_ENV] == "0"
    monkeypatch.setattr("tuneloop.serving.engine.usable_cpu_cores", lambda: 16)
    assert RESERVED_CORES_ENV not in engine_env(spec), "vLLM's own default on bigger machines"
    assert engine_env(EngineSpec(model_path=tmp_path, served_name="base", cpu_reserved_cores=1))[
        RESERVED_CORES_ENV] == "1"
    monkeypatch.setattr("tuneloop.serving.engine.usable_cpu_cores", lambda: 2)
    monkeypatch.setenv(RESERVED_CORES_ENV, "1")
    assert engine_env(spec)[RESERVED_CORES_ENV] == "1", "the operator's environment wins over the default"


def test_a_rollback_inside_the_unload_grace_period_keeps_the_champion_loaded(store: Store, config: Config,
                                                                              tmp_path: Path) -> None:
    """Promote B over A, roll back to A before A's delayed unload ran: the unload must not land after the rollback
    decided A was still loaded (seen in the live loop test: vLLM then had no adapter for the task's champion). vLLM's
    model list answers slowly here, so the unload timer fires while the rollback is between its check and its flip."""
    import threading
    import time

    import httpx

    from tuneloop.serving.engine_client import EngineClient

    loaded = {"sentiment@1"}

    def vllm(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            time.sleep(0.3)
            return httpx.Response(200, json={"data": [{"id": n} for n in sorted(loaded)]})
        name = json.loads(request.content)["lora_name"]
        (loaded.add if request.url.path == "/v1/load_lora_adapter" else loaded.discard)(name)
        return httpx.Response(200, text="ok")

    _register(store, config, tmp_path, "one")
    _register(store, config, tmp_path, "two")
    client = EngineClient("http://vllm.test", EngineLimits(BASE, 8, ("q_proj", "v_proj")),
                          transport=httpx.MockTransport(vllm))
    client.adopt("sentiment@1", tmp_path / "one")
    swapper = HotSwapper(store, client.limits, client=client, grace_s=0.45)
    swapper.promote("sentiment@2")  # A's unload is due 0.45 s from now
    rolled = threading.Thread(target=lambda: swapper.rollback("sentiment"))
    time.sleep(0.2)
    rolled.start()  # its /v1/models check (0.3 s) straddles the moment A's unload fires
    rolled.join()
    time.sleep(1.0)  # every delayed unload has run
    champion = find_alias(store, "sentiment", "champion")
    assert champion is not None and champion.ref == "sentiment@1"
    assert "sentiment@1" in loaded, "the champion must be loaded in the engine after the rollback"
    assert "sentiment@2" not in loaded, "the replaced champion was unloaded after its grace period"
    swapper.promote("sentiment@2")
    swapper.close()  # the gateway stops before sentiment@1's grace period ends
    time.sleep(1.0)
    assert "sentiment@1" in loaded, "a stopped gateway unloads nothing from an engine others may share"
