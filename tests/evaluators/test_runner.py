"""The eval runner against a scripted OpenAI-compatible endpoint: retries, resume, storage, slices, compare.

The real endpoint (gateway + vLLM) is exercised in tests/evaluators/test_eval_live.py; here the endpoint's
behaviour is scripted so failure paths (503 storms, a dead engine mid-run) are exact.
"""

from __future__ import annotations

import json

import httpx
import pytest
from sqlalchemy import select, update

from tuneloop.challenger_sets.catalog import add_dataset
from tuneloop.challenger_sets.records import Example
from tuneloop.errors import EngineUnavailable, EvaluationError, ModelNotFound
from tuneloop.evaluators.compare import compare_runs
from tuneloop.evaluators.runner import EvalRunner, EvalTarget
from tuneloop.tables import EvalPredictionRow, EvalRunRow, EvalScoreRow

TOPICS = ["airlines", "sports", "music"]


class ScriptedEndpoint:
    """Answers each tweet's label from a lookup; can fail the first requests or all after a point."""

    def __init__(self, answers: dict[str, str], *, fail_first: int = 0, die_after: int | None = None) -> None:
        self.answers = answers
        self.fail_first = fail_first
        self.die_after = die_after
        self.calls: list[dict] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.calls.append(body)
        if body["model"] == "nope@9":
            return httpx.Response(404, json={"error": {"message": "unknown model nope@9"}})
        if len(self.calls) <= self.fail_first:
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"error": {"message": "restarting"}})
        if self.die_after is not None and len(self.calls) > self.die_after:
            raise httpx.ConnectError("connection refused")
        assert request.headers["X-Tuneloop-Purpose"] == "eval"
        assert body["temperature"] == 0 and body["messages"][0]["role"] == "system"
        assert body["structured_outputs"] == {"choice": ["negative", "neutral", "positive"]}, "labels by construction"
        assert body["max_tokens"] >= len("negative") + 1
        text = self.answers.get(body["messages"][-1]["content"], "")
        return httpx.Response(200, json={"choices": [{"message": {"content": text}}],
                                         "usage": {"completion_tokens": 1}})


@pytest.fixture
def heldout(store, config):
    examples = [Example(id=f"t{i}", input=f"tweet number {i}", reference=["negative", "neutral", "positive"][i % 3],
                        meta={"topic": TOPICS[i % 3 if i < 30 else 0]}) for i in range(36)]
    return add_dataset(store, config.data_path, examples, task="sentiment", name="small", kind="heldout",
                       source="test")


def _answers(heldout, wrong_every: int) -> dict[str, str]:
    return {e.input: ("positive" if i % wrong_every == 0 else e.reference) for i, e in enumerate(heldout.load())}


def _runner(config, store, endpoint, **settings):
    config = config.model_copy(update={"evaluation": config.evaluation.model_copy(
        update={"bootstrap_resamples": 300, "concurrency": 4, "min_slice_size": 5, **settings})})
    return EvalRunner(config, store, progress=False, transport=httpx.MockTransport(endpoint))


TARGET = EvalTarget("sentiment", "sentiment@1", 1, "http://endpoint.test")


def test_a_run_scores_every_metric_with_intervals_and_stores_everything(config, store, heldout):
    endpoint = ScriptedEndpoint(_answers(heldout, 4), fail_first=3)
    report = _runner(config, store, endpoint).run(TARGET, heldout)
    assert report.n == 36 and report.errors == 0 and len(endpoint.calls) == 36 + 3  # three 503s retried
    accuracy = report.score("accuracy")
    assert accuracy.value == pytest.approx(1 - 9 / 36 + 3 / 36)  # 9 forced "positive", 3 of them right anyway
    assert accuracy.ci_low < accuracy.value < accuracy.ci_high and accuracy.mde > 0
    assert {s.metric for s in report.scores} == {"accuracy", "macro_f1", "exact_match"}
    assert {s.slice_value for s in report.slices} == set(TOPICS)
    with store.session() as session:
        run = session.get(EvalRunRow, report.run_id)
        assert run.status == "complete" and run.timings["examples_per_s"] > 0
        predictions = session.scalars(select(EvalPredictionRow).where(EvalPredictionRow.run_id == run.id)).all()
        assert len(predictions) == 36 and all("label" in p.scores for p in predictions)
        assert session.scalars(select(EvalScoreRow).where(EvalScoreRow.run_id == run.id)).all()
    assert set(report.to_json()["metrics"]["accuracy"]) >= {"value", "ci_low", "ci_high", "n", "mde"}


def test_an_interrupted_run_resumes_without_asking_finished_examples_again(config, store, heldout):
    dying = ScriptedEndpoint(_answers(heldout, 5), die_after=20)
    runner = _runner(config, store, dying, max_attempts=2, concurrency=1)
    with pytest.raises(EngineUnavailable, match="resume"):
        runner.run(TARGET, heldout)
    with store.session() as session:
        run = session.scalars(select(EvalRunRow)).one()
        assert run.status == "interrupted"
        stored = session.scalars(select(EvalPredictionRow.example_id)).all()
    assert len(stored) == 20
    healthy = ScriptedEndpoint(_answers(heldout, 5))
    report = _runner(config, store, healthy).run(TARGET, heldout)
    assert report.resumed_from == 20 and len(healthy.calls) == 16
    asked = {c["messages"][-1]["content"] for c in healthy.calls}
    assert not asked & {e.input for e in heldout.load() if e.id in stored}
    again = _runner(config, store, healthy).run(TARGET, heldout)
    assert again.reused and again.run_id == report.run_id and len(healthy.calls) == 16
    fresh = _runner(config, store, healthy).run(TARGET, heldout, fresh=True)
    assert fresh.run_id != report.run_id and len(healthy.calls) == 16 + 36
    assert fresh.score("accuracy").value == report.score("accuracy").value


def test_an_unknown_model_stops_the_run_with_a_clear_error(config, store, heldout):
    with pytest.raises(ModelNotFound, match="nope@9"):
        _runner(config, store, ScriptedEndpoint({})).run(EvalTarget("sentiment", "nope@9", 9, "http://x"), heldout)


def test_empty_answers_score_zero_and_are_counted(config, store, heldout):
    report = _runner(config, store, ScriptedEndpoint({})).run(TARGET, heldout, limit=12)
    assert report.n == 12 and report.score("accuracy").value == 0.0 and report.score("accuracy").empty == 12


def test_compare_finds_the_better_version_and_reports_p_values(config, store, heldout):
    runner_a = _runner(config, store, ScriptedEndpoint(_answers(heldout, 2)))
    worse = runner_a.run(TARGET, heldout)
    runner_b = _runner(config, store, ScriptedEndpoint(_answers(heldout, 36)))
    better = runner_b.run(EvalTarget("sentiment", "sentiment@2", 2, "http://endpoint.test"), heldout)
    report = compare_runs(runner_b, worse.run_id, better.run_id)
    accuracy = next(m for m in report.metrics if m.metric == "accuracy")
    assert accuracy.mcnemar_p_value is not None
    assert accuracy.delta > 0.3 and accuracy.p_value < 0.01 and accuracy.mcnemar_p_value < 0.01
    assert accuracy.significant and "p_value" in report.to_json()["metrics"]["macro_f1"]
    backwards = next(m for m in compare_runs(runner_b, better.run_id, worse.run_id).metrics if m.metric == "accuracy")
    assert backwards.delta == pytest.approx(-accuracy.delta) and backwards.significant


def test_the_same_answers_compare_as_no_difference(config, store, heldout):
    answers = _answers(heldout, 3)
    first = _runner(config, store, ScriptedEndpoint(answers)).run(TARGET, heldout)
    runner = _runner(config, store, ScriptedEndpoint(answers))
    second = runner.run(EvalTarget("sentiment", "sentiment@2", 2, "http://endpoint.test"), heldout)
    for metric in compare_runs(runner, first.run_id, second.run_id).metrics:
        assert metric.delta == 0 and metric.ci_low == metric.ci_high == 0 and metric.p_value == 1
        assert not metric.significant and metric.mde > 0.05


def test_compare_uses_the_statistics_stored_when_the_runs_were_scored(config, store, heldout):
    runner = _runner(config, store, ScriptedEndpoint(_answers(heldout, 2)))
    a = runner.run(TARGET, heldout)
    b = _runner(config, store, ScriptedEndpoint(_answers(heldout, 36))).run(
        EvalTarget("sentiment", "sentiment@2", 2, "http://endpoint.test"), heldout)
    with store.session() as session:  # answers edited after scoring must not change what the runs reported
        session.execute(update(EvalPredictionRow).where(EvalPredictionRow.run_id == b.run_id)
                        .values(prediction="positive"))
    accuracy = next(m for m in compare_runs(runner, a.run_id, b.run_id).metrics if m.metric == "accuracy")
    assert accuracy.b == pytest.approx(b.score("accuracy").value)
    with store.session() as session:
        session.execute(update(EvalPredictionRow).where(EvalPredictionRow.run_id == b.run_id).values(stats=None))
    with pytest.raises(EvaluationError, match="no stored statistics"):
        compare_runs(runner, a.run_id, b.run_id)
