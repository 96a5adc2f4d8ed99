"""The gate's decisions from real eval runs and real paired statistics, with a scripted endpoint standing in for
vLLM so each model's right and wrong answers are known: a better candidate passes, a worse one or one that is
not better is rejected with the reason, and a set too small for its MDE is refused instead of read."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.fakes import RecordingDeployment
from tests.monitor.helpers import LABELS, make_dataset, register_champion
from tuneloop.challenger_sets.catalog import DatasetVersion
from tuneloop.challenger_sets.judged import GateRole, JudgedSet
from tuneloop.config import Config
from tuneloop.registry import get_adapter
from tuneloop.retrain.gate import Gate, smallest_mde
from tuneloop.retrain.records import GateDecision
from tuneloop.store import Store


def endpoint(wrong_every: dict[tuple[str, str], int]) -> httpx.MockTransport:
    """(model, dataset prefix) -> every k-th example answered wrong (0 = never)."""

    async def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        text = body["messages"][-1]["content"]
        prefix, _, number = text.rpartition(" tweet ")
        i = int(number)
        right = LABELS[i % 3]
        k = wrong_every[(body["model"], prefix)]
        content = LABELS[(i + 1) % 3] if k and i % k == 0 else right
        return httpx.Response(200, json={"choices": [{"message": {"content": content}}],
                                         "usage": {"completion_tokens": 1}})

    return httpx.MockTransport(answer)


def judged(dataset: DatasetVersion, role: GateRole) -> JudgedSet:
    return JudgedSet(dataset, role, dataset.manifest.name, whole=True)


@pytest.fixture
def gate_setup(config: Config, store: Store) -> tuple[Config, Store, list[JudgedSet]]:
    config.evaluation.bootstrap_resamples = 500
    config.tasks["sentiment"].retrain.gate.margin = 0.2
    register_champion(store, "sentiment", 1)
    register_champion(store, "sentiment", 2)  # the helper moves the alias; move it back: v2 is the candidate
    from tuneloop.registry import set_alias

    set_alias(store, "sentiment@1", "champion")
    heldout = make_dataset(store, config, "held", 300, kind="heldout")
    topics = make_dataset(store, config, "topic", 300)
    return config, store, [judged(heldout, "heldout"), judged(topics, "challenger")]


def decide(config: Config, store: Store, sets: list[JudgedSet], wrong: dict[tuple[str, str], int]) -> GateDecision:
    gate = Gate(config, store, "sentiment", RecordingDeployment(store))
    return gate.decide(get_adapter(store, "sentiment@1"), get_adapter(store, "sentiment@2"), sets,
                       transport=endpoint(wrong))


def test_a_better_candidate_passes_with_every_number_recorded(
        gate_setup: tuple[Config, Store, list[JudgedSet]]) -> None:
    config, store, sets = gate_setup
    decision = decide(config, store, sets, {("sentiment@1", "held"): 5, ("sentiment@2", "held"): 5,
                                            ("sentiment@1", "topic"): 2, ("sentiment@2", "topic"): 10})
    assert decision.promote, decision.reasons
    held, topic = decision.checks
    assert held.comparison is not None and topic.comparison is not None and topic.runs is not None
    assert held.role == "heldout" and held.comparison.delta == pytest.approx(0.0) and held.passed
    assert topic.comparison.delta > 0.3 and topic.comparison.p_value < 0.05 and topic.passed
    assert topic.comparison.ci_low > 0 and topic.comparison.metric == "macro_f1" and topic.mde <= 0.2
    assert topic.mde == topic.comparison.paired_mde, "the gate judges by the paired MDE"
    assert topic.comparison.a < topic.comparison.b and topic.runs[0] != topic.runs[1]


def test_a_candidate_worse_on_the_heldout_set_is_rejected(gate_setup: tuple[Config, Store, list[JudgedSet]]) -> None:
    config, store, sets = gate_setup
    decision = decide(config, store, sets, {("sentiment@1", "held"): 0, ("sentiment@2", "held"): 2,
                                            ("sentiment@1", "topic"): 2, ("sentiment@2", "topic"): 10})
    assert not decision.promote
    assert any("may be worse than the champion" in r for r in decision.reasons)
    assert decision.checks[1].passed, "the challenger set alone would have passed"


def test_a_candidate_no_better_on_the_challenger_set_is_rejected(
        gate_setup: tuple[Config, Store, list[JudgedSet]]) -> None:
    config, store, sets = gate_setup
    decision = decide(config, store, sets, {("sentiment@1", "held"): 5, ("sentiment@2", "held"): 5,
                                            ("sentiment@1", "topic"): 4, ("sentiment@2", "topic"): 4})
    assert not decision.promote
    assert any("not significantly better" in r for r in decision.reasons)


def test_a_set_too_small_for_its_mde_is_refused(config: Config, store: Store) -> None:
    config.evaluation.bootstrap_resamples = 500
    config.tasks["sentiment"].retrain.gate.margin = 0.05
    register_champion(store, "sentiment", 1)
    small: DatasetVersion = make_dataset(store, config, "tiny", 20, kind="heldout")
    gate = Gate(config, store, "sentiment", RecordingDeployment(store))
    refused = gate.preflight([judged(small, "heldout")], "sentiment@1")
    assert refused is not None and refused.preflight and not refused.promote
    assert "too small to decide: n=20" in refused.reasons[0] and smallest_mde(20, 0.95) > 0.05
    assert gate.preflight([judged(make_dataset(store, config, "big", 400, kind="heldout"), "heldout")],
                          "sentiment@1") is None
    # measured: 150 examples on which the two versions disagree a lot cannot resolve 0.05
    register_champion(store, "sentiment", 2)
    from tuneloop.registry import set_alias

    set_alias(store, "sentiment@1", "champion")
    mid = make_dataset(store, config, "mid", 150)
    decision = gate.decide(get_adapter(store, "sentiment@1"), get_adapter(store, "sentiment@2"),
                           [judged(mid, "challenger")],
                           transport=endpoint({("sentiment@1", "mid"): 2, ("sentiment@2", "mid"): 3}))
    assert not decision.promote and "too small to decide: n=150" in decision.reasons[0]
    assert "(measured)" in decision.reasons[0]
