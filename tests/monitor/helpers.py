"""Store fixtures for monitor tests: captured traffic rows and registered adapters, written as the gateway and
the registry write them (real database, real tables)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import httpx

from tuneloop.challenger_sets.catalog import DatasetKind, DatasetVersion, add_dataset
from tuneloop.challenger_sets.records import Example
from tuneloop.config import Config
from tuneloop.evaluators.runner import EvalRunner, EvalTarget
from tuneloop.store import Store
from tuneloop.tables import AdapterVersionRow, AliasRow, TrafficRow


def capture(store: Store, task: str, prompts: Sequence[str], *, completions: Sequence[str] | None = None,
            adapter_version: int | None = None, route: str = "champion", status: int = 200) -> None:
    with store.session() as session:
        for i, prompt in enumerate(prompts):
            session.add(TrafficRow(
                request_id=uuid.uuid4().hex, created_at=datetime.now(UTC), task=task, adapter_version=adapter_version,
                route=route, endpoint="chat", prompt_text=prompt, messages=[{"role": "user", "content": prompt}],
                completion=completions[i] if completions else None, latency_ms=1.0, status=status))


def register_version(store: Store, task: str, version: int, *, champion: bool = False) -> None:
    """An adapter row without files: enough for aliases, routing, the exporter, the policy and the gate's runs."""
    with store.session() as session:
        row = AdapterVersionRow(task=task, version=version, method="lora", path=f"/nowhere/{task}-{version}",
                                base_model_sha256="0" * 64,
                                card={"task": task, "version": version, "method": "lora", "datasets": [],
                                      "base_model": {"name": "test", "sha256": "0" * 64}, "hyperparameters": {}})
        session.add(row)
        session.flush()
        if not champion:
            return
        existing = session.get(AliasRow, (task, "champion"))
        if existing is not None:
            existing.adapter_id = row.id
        else:
            session.add(AliasRow(task=task, alias="champion", adapter_id=row.id))


def register_champion(store: Store, task: str, version: int = 1) -> None:
    """An adapter row made champion, without files."""
    register_version(store, task, version, champion=True)


def answer_by_rule(wrong_every: dict[str, int]) -> Callable[[str, str], str]:
    """For a stub endpoint: the right label of make_dataset's examples, except every k-th for model -> k (0: never)."""
    def answer(model: str, text: str) -> str:
        i = int(text.rsplit(" ", 1)[1])
        k = wrong_every.get(model, 0)
        return LABELS[(i + 1) % 3] if k and i % k == 0 else LABELS[i % 3]

    return answer


LABELS = ["negative", "neutral", "positive"]


def make_dataset(store: Store, config: Config, name: str, n: int, kind: DatasetKind = "challenger",
                 offset: int = 0) -> DatasetVersion:
    examples = [Example(id=f"{name}-{i + offset}", input=f"{name} tweet {i + offset}", reference=LABELS[i % 3])
                for i in range(n)]
    return add_dataset(store, config.data_path, examples, task="sentiment", name=name, kind=kind, source="test")


def evaluate_champion(config: Config, store: Store, dataset: DatasetVersion, accuracy_every: int,
                      version: int = 1) -> int:
    """Run the champion over the dataset; every `accuracy_every`-th answer is wrong (1 = all wrong)."""
    answers = {e.input: (LABELS[(i + 1) % 3] if i % accuracy_every == 0 else e.reference)
               for i, e in enumerate(dataset.load())}

    async def endpoint(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        answer = answers[body["messages"][-1]["content"]]
        return httpx.Response(200, json={"choices": [{"message": {"content": answer}}],
                                         "usage": {"completion_tokens": 1}})

    cfg = config.model_copy(update={"evaluation": config.evaluation.model_copy(update={"bootstrap_resamples": 300})})
    runner = EvalRunner(cfg, store, progress=False, transport=httpx.MockTransport(endpoint))
    return runner.run(EvalTarget("sentiment", f"sentiment@{version}", version, "http://endpoint.test"),
                      dataset).run_id
