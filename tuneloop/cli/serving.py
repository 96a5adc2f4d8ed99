"""`tuneloop serve | status | promote | rollback`."""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import typer

from tuneloop.cli.context import STATE
from tuneloop.cli.output import console, print_json, print_table
from tuneloop.errors import AdapterError, AuthError, TuneloopError


def serve() -> None:
    """Start vLLM with every task's champion (and candidate) and the gateway, in the foreground."""
    from serving.server import serve as run_server

    config = STATE.config
    console.print(f"starting vLLM on {config.serving.vllm_host}:{config.serving.vllm_port} and the gateway on "
                  f"http://{config.serving.gateway_host}:{config.serving.gateway_port} (Ctrl-C stops both)")
    run_server(config, STATE.store)


def status(
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Tasks, their champion and candidate versions, and the health of a running gateway/engine."""
    from serving.capture import spilled_records
    from tuneloop.registry import find_alias

    config = STATE.config
    tasks = []
    for task in config.tasks:
        champion = find_alias(STATE.store, task, "champion")
        candidate = find_alias(STATE.store, task, "candidate")
        tasks.append({"task": task, "champion": champion.ref if champion else None,
                      "candidate": candidate.ref if candidate else None,
                      "canary_share": config.tasks[task].rollout.canary_share,
                      "shadow": config.tasks[task].rollout.shadow})
    gateway = _gateway_health()
    result = {"tasks": tasks, "gateway": gateway,
              "spilled_traffic_records": len(spilled_records(config.data_path / "spill" / "traffic-spill.jsonl"))}
    if json_output:
        print_json(result)
        return
    print_table("tasks", ["task", "champion", "candidate", "canary", "shadow"],
                [[t["task"], t["champion"], t["candidate"], t["canary_share"], t["shadow"]] for t in tasks])
    console.print(f"gateway: {gateway['status']} (engine: {gateway.get('engine', 'unknown')})")
    if result["spilled_traffic_records"]:
        console.print(f"{result['spilled_traffic_records']} captured records wait in the spill file for replay")


def promote(
    version: Annotated[str, typer.Argument(help="task@N to make champion.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Make a version champion: hot-swapped into a running gateway, or flipped in the registry if none runs."""
    result = _admin("/admin/promote", {"version": version})
    if result is None:
        from tuneloop.registry import set_alias

        previous = set_alias(STATE.store, version, "champion", reason="promoted (no gateway running)")
        result = {"task": version.split("@")[0], "champion": version,
                  "previous": previous.ref if previous else None, "gateway": "not running"}
    _print_swap(result, json_output)


def rollback(
    task: Annotated[str, typer.Argument(help="Task whose last promotion to undo.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Make the previous champion of a task champion again."""
    STATE.config.task(task)
    result = _admin("/admin/rollback", {"task": task})
    if result is None:
        from serving.hotswap import HotSwapper

        swapper = HotSwapper(STATE.store, None, None, base_sha256=_current_base_sha(), grace_s=0)
        swap = swapper.rollback(task)
        result = {"task": swap.task, "champion": swap.champion, "previous": swap.previous, "gateway": "not running"}
    _print_swap(result, json_output)


def _current_base_sha() -> str:
    from tuneloop.basemodel import ensure_base_model

    return ensure_base_model(STATE.config).sha256


def _print_swap(result: dict[str, Any], json_output: bool) -> None:
    if json_output:
        print_json(result)
        return
    console.print(f"{result['task']}: champion is now {result['champion']} (was {result['previous']})")


def _gateway_url() -> str:
    serving = STATE.config.serving
    return f"http://{serving.gateway_host}:{serving.gateway_port}"


def _gateway_health() -> dict[str, Any]:
    try:
        response = httpx.get(f"{_gateway_url()}/healthz", timeout=3.0)
    except httpx.HTTPError:
        return {"status": "not running", "url": _gateway_url()}
    body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    return {"url": _gateway_url(), **body}


def _admin(path: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """Call the running gateway's admin API; None when no gateway answers."""
    token = STATE.config.admin_token
    try:
        response = httpx.post(f"{_gateway_url()}{path}", json=body, timeout=180.0,
                              headers={"Authorization": f"Bearer {token}"} if token else {})
    except httpx.ConnectError:
        return None
    if response.status_code == 401:
        raise AuthError(f"the gateway refused the admin call: {response.json()['error']['message']}")
    if response.status_code >= 400:
        message = response.json().get("error", {}).get("message", response.text)
        raise (AdapterError if response.status_code < 500 else TuneloopError)(message)
    return dict(response.json())
