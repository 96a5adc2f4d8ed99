"""API keys on the gateway (stub vLLM, real SQLite): scopes per route, rate limits with OpenAI's headers, the key
id on captured traffic and in the metrics, revocation, and the local admin credential. The same keys against a
real vLLM are exercised by test_eval_live.py (feedback) and `../shared/checks/reliability`."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.serving.test_gateway import TOKEN, Gateway, _gateway
from tuneloop.config import parse_config
from tuneloop.errors import ApiKeyError, ConfigError, RateLimited
from tuneloop.keys import Caller, create_key, list_keys, revoke_key, verify_key
from tuneloop.serving.ratelimit import RateLimiter
from tuneloop.tables import ApiKeyRow, TrafficRow


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[Gateway]:
    yield from _gateway(tmp_path, "  require_api_key: true\n")


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    yield from _gateway(tmp_path)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _chat(gateway: Gateway, key: str | None, model: str = "chat") -> int:
    return gateway.http.post("/v1/chat/completions", headers=_bearer(key) if key else {},
                             json={"model": model, "messages": [{"role": "user", "content": "hi"}]}).status_code


def test_keys_are_stored_as_digests_and_checked_whole(locked: Gateway) -> None:
    key, secret = create_key(locked.store, "app", ["inference"])
    with locked.store.session() as session:
        row = session.get(ApiKeyRow, key.id)
        assert row is not None and secret not in (row.secret_sha256, row.name) and len(row.secret_sha256) == 64
    assert verify_key(locked.store, secret) == Caller(key.id, "app", frozenset({"inference"}))
    assert verify_key(locked.store, secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert verify_key(locked.store, "tl_" + key.id + "_" + "x" * 43) is None
    with pytest.raises(ApiKeyError, match="exists"):
        create_key(locked.store, "app", ["inference"])
    with pytest.raises(ApiKeyError, match="unknown scope"):
        create_key(locked.store, "other", ["root"])
    with pytest.raises(ApiKeyError, match="rpm"):
        create_key(locked.store, "other", ["inference"], rpm=0)
    assert [k.name for k in list_keys(locked.store)] == ["app"]


def test_each_route_needs_its_scope_and_the_key_id_is_on_the_capture(locked: Gateway) -> None:
    _, app = create_key(locked.store, "app", ["inference"])
    _, labeller = create_key(locked.store, "labeller", ["feedback"])
    _, alerts = create_key(locked.store, "alerts", ["webhook"])
    admin_key, admin = create_key(locked.store, "ops", ["admin"])
    assert _chat(locked, None) == 401 and _chat(locked, "tl_nope") == 401
    assert _chat(locked, labeller) == 403 and _chat(locked, alerts) == 403
    assert _chat(locked, app) == 200 and _chat(locked, admin) == 200 and _chat(locked, TOKEN) == 200
    assert locked.vllm.bodies and len(locked.vllm.bodies) == 3, "refused requests reach nothing"
    assert set(locked.vllm.authorizations) == {"Bearer engine-key"}, \
        "vLLM sees its own key, never the client's"
    promote = {"version": "sentiment@2"}
    for key in (app, labeller, alerts):
        answer = locked.http.post("/admin/promote", json=promote, headers=_bearer(key))
        assert answer.status_code == 403 and answer.json()["error"]["type"] == "permission_error"
    assert locked.http.post("/admin/promote", json=promote, headers=_bearer(admin)).status_code == 200
    feedback = {"request_id": "0" * 32, "reference": "hello"}
    assert locked.http.post("/v1/feedback", json=feedback).status_code == 401
    assert locked.http.post("/v1/feedback", json=feedback, headers=_bearer(app)).status_code == 403
    assert locked.http.post("/v1/feedback", json=feedback, headers=_bearer(labeller)).status_code == 404
    locked.ctx.capture.close()
    with locked.store.session() as session:
        key_ids = list(session.scalars(select(TrafficRow.key_id).order_by(TrafficRow.id)))
    app_id = verify_key(locked.store, app).key_id  # type: ignore[union-attr]
    assert key_ids == [app_id, admin_key.id, "admin-token"]
    assert locked.sample("tuneloop_gateway_key_requests_total", key=app_id, status="200") == 1
    assert locked.sample("tuneloop_gateway_refused_requests_total", type="permission_error") >= 5


def test_a_revoked_key_is_refused_once_the_cache_lets_go(locked: Gateway) -> None:
    _, app = create_key(locked.store, "app", ["inference"])
    locked.ctx.auth.ttl_s = 0.2
    assert _chat(locked, app) == 200
    revoke_key(locked.store, "app")
    time.sleep(0.3)
    assert _chat(locked, app) == 401


def test_without_require_api_key_no_key_is_fine_but_a_revoked_one_is_not(gateway: Gateway) -> None:
    key, secret = create_key(gateway.store, "app", ["inference"])
    assert _chat(gateway, None) == 200 and _chat(gateway, "EMPTY") == 200, "what the OpenAI client is given"
    assert _chat(gateway, secret) == 200
    revoke_key(gateway.store, "app")
    gateway.ctx.auth._cache.clear()
    assert _chat(gateway, secret) == 401, "a tuneloop key that is sent must be valid"
    gateway.ctx.capture.close()
    with gateway.store.session() as session:
        assert list(session.scalars(select(TrafficRow.key_id).order_by(TrafficRow.id))) == [None, None, key.id]


def test_a_key_over_its_requests_per_minute_gets_429_with_openai_headers(locked: Gateway) -> None:
    _, slow = create_key(locked.store, "slow", ["inference"], rpm=2)
    _, other = create_key(locked.store, "other", ["inference"])
    assert _chat(locked, slow) == 200 and _chat(locked, slow) == 200
    refused = locked.http.post("/v1/chat/completions", headers=_bearer(slow),
                               json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-limit-requests"] == "2"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert _chat(locked, other) == 200, "one key's limit is not another's"


def test_tokens_per_minute_are_charged_from_usage_and_age_out() -> None:
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    caller = Caller("k1", "k", frozenset({"inference"}), tpm=20)
    limiter.admit(caller)
    limiter.charge(caller, 13)
    headers = limiter.admit(caller)
    assert headers["x-ratelimit-remaining-tokens"] == "7"
    limiter.charge(caller, 13)
    with pytest.raises(RateLimited) as refused:
        limiter.admit(caller)
    assert refused.value.headers["Retry-After"] == "60" and "tokens per minute" in str(refused.value)
    now[0] = 60.5
    assert limiter.admit(caller)["x-ratelimit-remaining-tokens"] == "20"


def test_init_writes_an_owner_only_admin_credential_the_cli_reads(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNELOOP_ADMIN_TOKEN", raising=False)
    config = parse_config("data_dir: data\n", config_dir=tmp_path)
    assert config.admin_token is None
    path = config.ensure_local_credential()
    assert path is not None and (path.stat().st_mode & 0o777) == 0o600
    token = config.admin_token
    assert token and len(token) >= 40 and config.ensure_local_credential() is None, "written once"
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="readable by other users"):
        _ = config.admin_token


def test_while_the_database_is_away_a_key_seen_recently_keeps_working(locked: Gateway) -> None:
    """A Postgres restart must not turn inference into 503s: a key looked up in the last `stale_s` keeps its
    answer while the database refuses connections; a key never seen gets the database's 503."""
    from tuneloop.store import Store

    _, known = create_key(locked.store, "known", ["inference"])
    _, unseen = create_key(locked.store, "unseen", ["inference"])
    locked.ctx.auth.ttl_s = 0.0
    assert _chat(locked, known) == 200
    away = Store(f"postgresql+psycopg://tuneloop@127.0.0.1:{_closed_port()}/gone", migrate=False)  # refused
    locked.ctx.auth.store = away
    try:
        assert _chat(locked, known) == 200
        assert _chat(locked, unseen) == 503
        locked.ctx.auth.stale_s = 0.0
        assert _chat(locked, known) == 503, "beyond stale_s the database must answer"
    finally:
        away.close()


def _closed_port() -> int:
    from tuneloop.ports import free_port

    return free_port()  # bound and released: nothing listens there
