"""Store fixtures for monitor tests: captured traffic rows and registered adapters, written as the gateway and
the registry write them (real database, real tables)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from tuneloop.store import Store
from tuneloop.tables import AdapterVersionRow, AliasRow, TrafficRow


def capture(store: Store, task: str, prompts: Sequence[str], *, completions: Sequence[str] | None = None,
            adapter_version: int | None = None, route: str = "champion") -> None:
    with store.session() as session:
        for i, prompt in enumerate(prompts):
            session.add(TrafficRow(
                request_id=uuid.uuid4().hex, created_at=datetime.now(UTC), task=task, adapter_version=adapter_version,
                route=route, endpoint="chat", prompt_text=prompt, messages=[{"role": "user", "content": prompt}],
                completion=completions[i] if completions else None, latency_ms=1.0, status=200))


def register_champion(store: Store, task: str, version: int = 1) -> None:
    """An adapter row made champion, without files: enough for aliases, exporter and policy."""
    with store.session() as session:
        row = AdapterVersionRow(task=task, version=version, method="lora", path=f"/nowhere/{task}-{version}",
                                base_model_sha256="0" * 64,
                                card={"task": task, "version": version, "method": "lora", "datasets": [],
                                      "base_model": {"name": "test", "sha256": "0" * 64}, "hyperparameters": {}})
        session.add(row)
        session.flush()
        existing = session.get(AliasRow, (task, "champion"))
        if existing is not None:
            existing.adapter_id = row.id
        else:
            session.add(AliasRow(task=task, alias="champion", adapter_id=row.id))
