"""Promote and roll back from outside the gateway (`tuneloop promote|rollback`): through a running gateway's
admin API when one answers, otherwise in the registry alone, with the same checks the admin API applies."""

from __future__ import annotations

from tuneloop.basemodel import ensure_base_model
from tuneloop.config import Config
from tuneloop.registry import Promotion
from tuneloop.serving.admin_client import AdminClient, GatewayNotRunning
from tuneloop.serving.hotswap import HotSwapper
from tuneloop.serving.server import offline_limits
from tuneloop.store import Store


def _offline(config: Config, store: Store) -> HotSwapper:
    return HotSwapper(store, offline_limits(config, ensure_base_model(config).sha256))


def promote(config: Config, store: Store, version: str) -> Promotion:
    try:
        result = AdminClient(config).promote(version)
        return Promotion(result["task"], result["champion"], result["previous"], through_gateway=True)
    except GatewayNotRunning:
        swap = _offline(config, store).promote(version, reason="promoted (no gateway running)")
        return Promotion(swap.task, swap.champion, swap.previous, through_gateway=False)


def rollback(config: Config, store: Store, task: str) -> Promotion:
    config.task(task)
    try:
        result = AdminClient(config).rollback(task)
        return Promotion(result["task"], result["champion"], result["previous"], through_gateway=True)
    except GatewayNotRunning:
        swap = _offline(config, store).rollback(task)
        return Promotion(swap.task, swap.champion, swap.previous, through_gateway=False)
