"""Which URL an evaluation talks to: the gateway for routed models, vLLM itself for a version nobody routes yet.

A registered version that is neither champion nor candidate is not loaded in the engine, and the gateway never
loads adapters on a user request. To score such a version (the usual case: a freshly trained challenger), the
runner loads it into the running vLLM through vLLM's runtime LoRA API, after the same integrity checks the
registry applies (a LoRA adapter whose files still match their checksum), and sends its requests to vLLM
directly. Requests carry the task's system prompt explicitly, so both paths see identical input.
"""

from __future__ import annotations

import httpx

from tuneloop.config import Config
from tuneloop.errors import AdapterError, EngineUnavailable
from tuneloop.registry import AdapterVersion, verify_adapter


def gateway_url(config: Config) -> str:
    return f"http://{config.serving.gateway_host}:{config.serving.gateway_port}"


def vllm_url(config: Config) -> str:
    return f"http://{config.serving.vllm_host}:{config.serving.vllm_port}"


def served_models(url: str) -> set[str]:
    try:
        response = httpx.get(f"{url}/v1/models", timeout=10)
    except httpx.HTTPError as exc:
        raise EngineUnavailable(f"nothing answers at {url} ({exc.__class__.__name__}); start `tuneloop serve` "
                                "or pass --endpoint") from None
    if response.status_code != 200:
        raise EngineUnavailable(f"{url}/v1/models answered {response.status_code}; is the engine ready?")
    return {m["id"] for m in response.json().get("data", [])}


def endpoint_for(config: Config, version: AdapterVersion | None) -> str:
    """The gateway if it serves `version` (or the base model); otherwise vLLM, with the version loaded into it."""
    gateway = gateway_url(config)
    if version is None or version.ref in served_models(gateway):
        return gateway
    if version.method != "lora":
        raise AdapterError(f"{version.ref} is a {version.method} model; only LoRA adapters can be served")
    verify_adapter(version)
    engine = vllm_url(config)
    if version.ref in served_models(engine):
        return engine
    response = httpx.post(f"{engine}/v1/load_lora_adapter", timeout=120,
                          json={"lora_name": version.ref, "lora_path": str(version.path)})
    if response.status_code != 200 and "has already been" not in response.text:
        raise AdapterError(f"vLLM at {engine} refused to load {version.ref} for evaluation: {response.text[:400]}")
    return engine
