"""Retraining's `Deployment` (retrain/deployment.py) on the real serving side.

Versions are loaded into, promoted in and rolled back through a running gateway's admin API, i.e. through the one
engine client and its checks; with no gateway running, promotion and rollback change the registry alone (with the
same checks against the limits the next `tuneloop serve` will have), and there is no endpoint to evaluate on.
"""

from __future__ import annotations

import logging
import time

from tuneloop.config import Config
from tuneloop.errors import EngineUnavailable
from tuneloop.evaluators.targets import ensure_served
from tuneloop.registry import AdapterVersion, Promotion
from tuneloop.serving.admin_client import AdminClient, GatewayNotRunning
from tuneloop.serving.promotion import promote, rollback
from tuneloop.store import Store

log = logging.getLogger(__name__)
GATEWAY_POLL_S = 5.0


class GatewayDeployment:
    def __init__(self, config: Config, store: Store) -> None:
        self.config, self.store = config, store

    def endpoint_for(self, version: AdapterVersion) -> str:
        """The gateway's URL once it serves `version`, waiting up to jobs.gateway_wait_s for a gateway that is
        restarting: a job of an hour must not fail because `tuneloop run` was restarted during it."""
        deadline = time.monotonic() + self.config.jobs.gateway_wait_s
        while True:
            try:
                return ensure_served(self.config, version)
            except (GatewayNotRunning, EngineUnavailable) as exc:
                if time.monotonic() >= deadline:
                    raise
                log.warning("waiting for the gateway to serve %s: %s", version.ref, exc)
                time.sleep(GATEWAY_POLL_S)

    def promote(self, version: AdapterVersion) -> Promotion:
        return promote(self.config, self.store, version.ref)

    def rollback(self, task: str) -> Promotion:
        return rollback(self.config, self.store, task)

    def release(self, version: AdapterVersion) -> None:
        try:
            AdminClient(self.config).unload(version.ref)
        except Exception as exc:  # noqa: BLE001 - costs only an adapter slot; the decision stands
            log.warning("could not unload %s: %s", version.ref, exc)
