"""What the live tests share: loopback ports, the admin token, the handle of the session's real gateway (the
`live_gateway` fixture in tests/conftest.py), and a bare engine of a test's own with its first-token probe."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.fakes import RecordingRunner
from tuneloop.challenger_sets.catalog import add_dataset
from tuneloop.challenger_sets.records import Example, Message
from tuneloop.conductor.loop import Loop
from tuneloop.config import Config
from tuneloop.serving.engine import EngineSpec, EngineSupervisor
from tuneloop.serving.state import GatewayContext
from tuneloop.store import Store

ADMIN_TOKEN = "test-admin-token"




@dataclass
class LiveGateway:
    """The session's vLLM + gateway, assembled by the conductor as `tuneloop serve` is (webhook, collectors); its
    retraining runner records jobs instead of starting workers."""

    url: str
    config: Config
    store: Store
    ctx: GatewayContext
    engine: EngineSupervisor
    loop: Loop
    runner: RecordingRunner


def add_tiny_sets(store: Store, data_dir: Path) -> None:
    tweets = [("@united lost my bag again", "negative"), ("@JetBlue lovely crew, thanks!", "positive"),
              ("@Delta flight leaves at 5pm", "neutral"), ("@united 3 hour delay, awful", "negative"),
              ("@SouthwestAir smooth landing, great job", "positive"), ("@AmericanAir which gate?", "neutral"),
              ("@USAirways rude staff", "negative"), ("@VirginAmerica love it", "positive")] * 2
    add_dataset(store, data_dir, [Example(id=str(i), input=t, reference=r) for i, (t, r) in enumerate(tweets)],
                task="sentiment", name="tiny", kind="train", source="test", check_leakage=False)
    chats = [Example(id=str(i), messages=[Message(role="user", content=f"hi, how was day {i}?")],
                     reference="pretty good, thanks! you?") for i in range(16)]
    add_dataset(store, data_dir, chats, task="chat", name="tiny", kind="train", source="test", check_leakage=False)


@contextmanager
def started_engine(spec: EngineSpec, log: Path) -> Iterator[EngineSupervisor]:
    """A vLLM of the test's own (no restarts: a crash should fail the test), stopped however the test ends."""
    engine = EngineSupervisor(spec, log, restart=False)
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


def first_token(engine: EngineSupervisor, model: str, prompt: str) -> tuple[str, float]:
    """The engine's greedy first token for `prompt` on `model`, and its log-probability."""
    response = httpx.post(f"{engine.spec.base_url}/v1/completions", headers=engine.spec.auth_headers, timeout=300,
                          json={"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 1})
    assert response.status_code == 200, response.text
    logprobs = response.json()["choices"][0]["logprobs"]
    return logprobs["tokens"][0], logprobs["token_logprobs"][0]
