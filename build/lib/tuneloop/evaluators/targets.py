"""What answers an evaluation, and where: a task's champion, a given version, or the base model, through the
gateway users call.

A registered version the gateway does not route yet (the usual case: a freshly trained challenger) is loaded into
the running engine through the gateway's admin API, i.e. through the one engine client and its checks (same
base model, rank and target modules the engine serves, files matching their checksum), and is then evaluated
through the gateway by its `task@N` name. `--endpoint` sends the requests elsewhere as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneloop.config import Config
from tuneloop.errors import AdapterError, AuthError, EvaluationError
from tuneloop.registry import AdapterVersion, find_alias, get_adapter
from tuneloop.serving.admin_client import AdminClient, gateway_url
from tuneloop.store import Store


@dataclass(frozen=True)
class EvalTarget:
    """What answers: a model name as the endpoint knows it, for one task."""

    task: str
    model: str
    adapter_version: int | None
    base_url: str


def resolve_version(config: Config, store: Store, *, task: str | None, adapter: str | None,
                    base: bool) -> tuple[str, AdapterVersion | None]:
    """(task, version) from the CLI's options; version None = the base model. Default: the task's champion."""
    if base and adapter:
        raise EvaluationError("give --adapter or --base, not both")
    if adapter and adapter != "base":
        version = get_adapter(store, adapter)
        if task and task != version.task:
            raise EvaluationError(f"{version.ref} is an adapter of task '{version.task}', not '{task}'")
        config.task(version.task)
        return version.task, version
    if not task:
        raise EvaluationError("--task is needed with --base or without --adapter")
    config.task(task)
    if base or adapter == "base":
        return task, None
    champion = find_alias(store, task, "champion")
    if champion is None:
        raise EvaluationError(f"task '{task}' has no champion; train one or pass --adapter/--base")
    return task, champion


def ensure_served(config: Config, version: AdapterVersion | None) -> str:
    """The gateway's URL, after asking it to load `version` if it does not serve it yet."""
    admin = AdminClient(config)
    if version is None or version.ref in admin.served_models():
        return gateway_url(config)
    if version.method != "lora":
        raise AdapterError(f"{version.ref} is a {version.method} model; only LoRA adapters can be served")
    if not config.admin_token:
        raise AuthError(f"{version.ref} is not loaded in the gateway, and loading it for evaluation needs the admin "
                        "token: set TUNELOOP_ADMIN_TOKEN (or serving.admin_token)")
    admin.load(version.ref)
    return gateway_url(config)


def resolve_target(config: Config, store: Store, *, task: str | None, adapter: str | None = None,
                   base: bool = False, endpoint: str | None = None) -> EvalTarget:
    task_name, version = resolve_version(config, store, task=task, adapter=adapter, base=base)
    url = endpoint.rstrip("/") if endpoint else ensure_served(config, version)
    if version is None:
        return EvalTarget(task_name, config.base_model.name, None, url)
    return EvalTarget(task_name, version.ref, version.version, url)
