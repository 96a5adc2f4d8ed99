"""A function run every few seconds on a daemon thread until stopped; failures are logged and retried next time.

For the gateway's own upkeep (following promotions made elsewhere): work that must not run on the event loop and
must outlive a database that is briefly away."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    def __init__(self, name: str, every_s: float, fn: Callable[[], object]) -> None:
        self.name, self.every_s, self.fn = name, every_s, fn
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.fn()
            except Exception as exc:  # noqa: BLE001 - the database may be away; the next round retries
                log.warning("%s: %s", self.name, exc)
