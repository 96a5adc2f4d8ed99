"""Routing on a real SQLite registry, no engine: task names go to the champion (or, for the canary share, the
candidate), `task@N` only to a loaded version, the base model's name to no adapter; a promotion in the store is a
routing change after `refresh`, and shadowing mirrors champion requests to the candidate only."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.monitor.helpers import register_champion
from tuneloop.config import Config
from tuneloop.errors import AdapterUnavailable, ModelNotFound
from tuneloop.registry import set_alias
from tuneloop.serving.routing import Route, Router
from tuneloop.store import Store

EVERY_VERSION = {f"{task}@{version}" for task in ("sentiment", "chat") for version in range(1, 10)}


def router(config: Config, store: Store, loaded: set[str] | None = None, seed: int | None = 0) -> Router:
    """A router over `loaded` (default: every version the tests register is in the engine)."""
    in_engine = EVERY_VERSION if loaded is None else loaded
    routes = Router(config, store, lambda: in_engine, seed=seed)
    routes.refresh()
    return routes


def test_a_task_name_goes_to_its_champion_and_follows_a_promotion_after_refresh(config: Config, store: Store) -> None:
    register_champion(store, "sentiment", 1)
    routes = router(config, store)
    assert routes.resolve("sentiment") == Route("sentiment", 1, "sentiment@1", "champion")
    register_champion(store, "sentiment", 2)  # promoted in the store
    assert routes.resolve("sentiment").version == 1, "the cached table routes until refreshed"
    routes.refresh()
    assert routes.resolve("sentiment") == Route("sentiment", 2, "sentiment@2", "champion")
    assert routes.resolve(config.base_model.name) == Route(None, None, config.base_model.name, "base")
    assert routes.resolve(config.base_model.name).adapter == "base"


def test_unknown_unloaded_and_champion_less_models_are_not_found_with_the_way_out(config: Config,
                                                                                   store: Store) -> None:
    register_champion(store, "sentiment", 1)
    routes = router(config, store, loaded={"sentiment@1"})
    with pytest.raises(ModelNotFound, match="Use a task name"):
        routes.resolve("gpt-4")
    with pytest.raises(ModelNotFound, match="is not loaded; load it with POST /admin/adapters/load"):
        routes.resolve("sentiment@7")
    with pytest.raises(ModelNotFound, match="write task@N"):
        routes.resolve("sentiment@latest")
    with pytest.raises(ModelNotFound, match="has no champion adapter yet"):
        routes.resolve("chat")
    assert routes.resolve("sentiment@1") == Route("sentiment", 1, "sentiment@1", "explicit")


def test_the_canary_share_goes_to_the_candidate_and_is_reproducible_with_a_seed(config: Config, store: Store) -> None:
    register_champion(store, "sentiment", 1)
    register_champion(store, "sentiment", 2)
    set_alias(store, "sentiment@1", "champion")
    set_alias(store, "sentiment@2", "candidate")
    config.tasks["sentiment"].rollout.canary_share = 0.2
    first, second = router(config, store, seed=7), router(config, store, seed=7)
    assert [first.resolve("sentiment").kind for _ in range(50)] == [second.resolve("sentiment").kind
                                                                     for _ in range(50)], "same seed, same split"
    routes = router(config, store, seed=3)
    shares = Counter(routes.resolve("sentiment").kind for _ in range(2000))
    assert set(shares) == {"champion", "candidate"} and 0.15 < shares["candidate"] / 2000 < 0.25
    config.tasks["sentiment"].rollout.canary_share = 0.0
    assert {routes.resolve("sentiment").kind for _ in range(200)} == {"champion"}


def test_shadowing_mirrors_champion_requests_to_the_candidate_only(config: Config, store: Store) -> None:
    register_champion(store, "sentiment", 1)
    register_champion(store, "sentiment", 2)
    set_alias(store, "sentiment@1", "champion")
    routes = router(config, store, loaded={"sentiment@1", "sentiment@2"})
    champion = routes.resolve("sentiment")
    assert routes.shadow_for(champion) is None, "no shadow unless the task asks for it"
    config.tasks["sentiment"].rollout.shadow = True
    assert routes.shadow_for(champion) is None, "no candidate, nothing to shadow"
    set_alias(store, "sentiment@2", "candidate")
    routes.refresh()
    assert routes.shadow_for(champion) == Route("sentiment", 2, "sentiment@2", "shadow")
    assert routes.shadow_for(routes.resolve("sentiment@2")) is None, "an explicit request is not shadowed"


def test_a_champion_the_engine_does_not_hold_is_a_503_naming_it_and_an_unloaded_candidate_gets_no_canary(
        config: Config, store: Store) -> None:
    # What a gateway starts with when the champion's files fail the serving checks: the registry names it, the
    # engine never loaded it. Passing the request on would earn vLLM's bare 404 for a task that exists.
    register_champion(store, "sentiment", 1)
    register_champion(store, "sentiment", 2)
    set_alias(store, "sentiment@1", "candidate")
    config.tasks["sentiment"].rollout.canary_share = 0.5
    routes = router(config, store, loaded=set())
    with pytest.raises(AdapterUnavailable, match="its champion sentiment@2 is not loaded in the engine"):
        routes.resolve("sentiment")
    routes = router(config, store, loaded={"sentiment@2"})
    assert {routes.resolve("sentiment").kind for _ in range(100)} == {"champion"}, "the candidate is not loaded"
    config.tasks["sentiment"].rollout.shadow = True
    assert routes.shadow_for(routes.resolve("sentiment")) is None, "nothing to shadow to"
