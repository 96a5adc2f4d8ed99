"""One real vLLM + gateway for the whole serving test session, with real adapters trained for two tasks.

The engine and gateway run in this process (uvicorn on a thread, vLLM as the supervised child), so tests can kill
vLLM and watch the supervisor bring it back.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tuneloop.challenger_sets.catalog import add_dataset
from tuneloop.challenger_sets.records import Example, Message
from tuneloop.config import Config, parse_config
from tuneloop.store import Store

ADMIN_TOKEN = "test-admin-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveGateway:
    url: str
    config: Config
    store: Store
    ctx: object
    engine: object


def _tiny_sets(store: Store, data_dir: Path) -> None:
    tweets = [("@united lost my bag again", "negative"), ("@JetBlue lovely crew, thanks!", "positive"),
              ("@Delta flight leaves at 5pm", "neutral"), ("@united 3 hour delay, awful", "negative"),
              ("@SouthwestAir smooth landing, great job", "positive"), ("@AmericanAir which gate?", "neutral"),
              ("@USAirways rude staff", "negative"), ("@VirginAmerica love it", "positive")] * 2
    add_dataset(store, data_dir, [Example(id=str(i), input=t, reference=r) for i, (t, r) in enumerate(tweets)],
                task="sentiment", name="tiny", kind="train", source="test", check_leakage=False)
    chats = [Example(id=str(i), messages=[Message(role="user", content=f"hi, how was day {i}?")],
                     reference="pretty good, thanks! you?") for i in range(16)]
    add_dataset(store, data_dir, chats, task="chat", name="tiny", kind="train", source="test", check_leakage=False)


@pytest.fixture(scope="session")
def live_gateway(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path) -> Iterator[LiveGateway]:
    from tuneloop.retrain.finetune import finetune
    from tuneloop.serving.server import running_server

    root = tmp_path_factory.mktemp("serving")
    gateway_port, vllm_port = free_port(), free_port()
    config = parse_config(
        f"data_dir: data\nbase_model:\n  path: {base_model_dir}\n"
        f"serving:\n  gateway_port: {gateway_port}\n  vllm_port: {vllm_port}\n  max_model_len: 512\n"
        f"  kv_cache_gib: 1\n  admin_token: {ADMIN_TOKEN}\n  unload_grace_s: 1\n"
        "tasks:\n  sentiment:\n    train:\n      batch_size: 4\n      validation_examples: 2\n      eval_every: 100\n"
        "  chat:\n    train:\n      batch_size: 4\n      validation_examples: 2\n      eval_every: 100\n",
        config_dir=root)
    store = Store(config.resolved_database_url)
    _tiny_sets(store, config.data_path)
    for task, steps in (("sentiment", 2), ("sentiment", 3), ("chat", 2)):
        finetune(config, store, task, max_steps=steps, dataset=f"{task}/tiny", progress=False)
    with running_server(config, store, seed=0) as running:
        yield LiveGateway(url=running.url, config=config, store=store, ctx=running.ctx, engine=running.engine)
    store.close()
