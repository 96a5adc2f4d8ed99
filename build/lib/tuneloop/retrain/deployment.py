"""What retraining asks of the serving side, as a protocol the conductor implements.

The gate must have both versions answer through the endpoint users call, a passing candidate must be promoted, a
rejected one released, and a regressed promotion rolled back. Retraining never imports the gateway to do that: the
conductor hands in a `Deployment` (tuneloop/conductor/deployment.py talks to a running gateway, or flips the
registry when none runs), and the unit tests hand in one that records the calls.
"""

from __future__ import annotations

from typing import Protocol

from tuneloop.registry import AdapterVersion, Promotion


class Deployment(Protocol):
    def endpoint_for(self, version: AdapterVersion) -> str:
        """Base URL where `version` answers under its `task@N` name (loaded without routing users to it)."""
        ...

    def promote(self, version: AdapterVersion) -> Promotion:
        """Make `version` its task's champion."""
        ...

    def rollback(self, task: str) -> Promotion:
        """Undo the task's last promotion."""
        ...

    def release(self, version: AdapterVersion) -> None:
        """`version` will not be served (a rejected candidate): free its slot in the engine. Best effort."""
        ...
