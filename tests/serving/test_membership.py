"""Gateways sharing a database share each key's rate limit: each counts the gateways seen in the last three polls
and enforces its part, so two gateways together admit the key's limit, not twice it; one that stops or dies gives
its part back."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from tuneloop.errors import RateLimited
from tuneloop.keys import Caller
from tuneloop.serving.membership import GatewayMembership
from tuneloop.serving.ratelimit import RateLimiter, share_of
from tuneloop.store import Store
from tuneloop.tables import GatewayRow


def _admitted(limiter: RateLimiter, caller: Caller, tries: int) -> int:
    admitted = 0
    for _ in range(tries):
        try:
            limiter.admit(caller)
            admitted += 1
        except RateLimited:
            pass
    return admitted


def _live_count(membership: GatewayMembership) -> Callable[[], int]:
    return lambda: membership.live


def test_two_gateways_on_one_database_admit_a_keys_limit_in_total(store: Store) -> None:
    first = GatewayMembership(store, "http://127.0.0.1:1", poll_s=2)
    second = GatewayMembership(store, "http://127.0.0.1:2", poll_s=2)
    assert first.beat() == 1, "alone"
    assert second.beat() == 2 and first.beat() == 2
    caller = Caller("k1", "app", frozenset({"inference"}), rpm=10)
    limiters = [RateLimiter(clock=lambda: 0.0, gateways=_live_count(m)) for m in (first, second)]
    assert sum(_admitted(limiter, caller, 50) for limiter in limiters) == 10
    with pytest.raises(RateLimited, match="5 on this gateway: the limit shared by 2 gateways"):
        limiters[0].admit(caller)
    second.leave()
    assert first.beat() == 1, "a stopped gateway gives its share back at the next poll"
    assert _admitted(limiters[0], caller, 50) == 5, "the whole limit again (5 already in this window)"


def test_a_dead_gateway_ages_out_and_small_limits_never_round_to_zero(store: Store) -> None:
    alive = GatewayMembership(store, "http://127.0.0.1:1", poll_s=2)
    dead = GatewayMembership(store, "http://127.0.0.1:2", poll_s=2)
    dead.beat()
    assert alive.beat() == 2
    with store.session() as session:  # its last beat, seven seconds ago: more than three polls
        row = session.get(GatewayRow, dead.gateway_id)
        assert row is not None
        row.seen_at = datetime.now(UTC) - timedelta(seconds=7)
    assert alive.beat() == 1
    assert share_of(3, 2) == 1 and share_of(1, 4) == 1 and share_of(None, 2) is None and share_of(100, 3) == 33
