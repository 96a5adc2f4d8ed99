"""Evaluations through the real gateway and vLLM: stored, deterministic, resumable; feedback to challenger sets.

Shares the session's live gateway (tests/serving/conftest.py). Leaves routing state as it found it: the gateway
tests that follow expect sentiment@2 not loaded yet.
"""

from __future__ import annotations

import time

import httpx
import pytest
from sqlalchemy import delete, func, select, update

from challenger_sets.catalog import add_dataset, get_dataset
from challenger_sets.from_traffic import build_from_traffic
from challenger_sets.records import Example, Message
from evaluators.compare import compare_runs
from evaluators.runner import EvalRunner, EvalTarget
from tests.serving.conftest import ADMIN_TOKEN, LiveGateway
from tuneloop.tables import EvalPredictionRow, EvalRunRow, TrafficRow
from tuneloop.timewindow import parse_instant

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TWEETS = [("@united lost my luggage twice, never again", "negative", "bags"),
          ("@JetBlue the crew was wonderful today", "positive", "crew"),
          ("@Delta what time does boarding start?", "neutral", "info"),
          ("@AmericanAir four hour delay and no updates", "negative", "delays"),
          ("@SouthwestAir best landing ever, thank you", "positive", "crew"),
          ("@USAirways is the lounge open on sundays?", "neutral", "info")]


@pytest.fixture(scope="module")
def sets(live_gateway: LiveGateway):
    store, data = live_gateway.store, live_gateway.config.data_path
    tweets = [Example(id=f"h{i}", input=f"{text} #{i}", reference=label, meta={"topic": topic})
              for i, (text, label, topic) in enumerate(TWEETS * 4)]
    chats = [Example(id=f"c{i}", messages=[Message(role="user", content=f"what did you do on day {i}?")],
                     reference="not much, just relaxing at home") for i in range(6)]
    return (add_dataset(store, data, tweets, task="sentiment", name="live-heldout", kind="heldout", source="test"),
            add_dataset(store, data, chats, task="chat", name="live-heldout", kind="heldout", source="test"))


def _runner(live_gateway: LiveGateway) -> EvalRunner:
    config = live_gateway.config.model_copy(update={"evaluation": live_gateway.config.evaluation.model_copy(
        update={"bootstrap_resamples": 500, "min_slice_size": 4, "concurrency": 4})})
    return EvalRunner(config, live_gateway.store, progress=False)


def _traffic_rows(live_gateway: LiveGateway) -> int:
    with live_gateway.store.session() as session:
        return int(session.scalar(select(func.count(TrafficRow.id))) or 0)


def test_eval_through_the_gateway_is_stored_deterministic_and_resumable(live_gateway: LiveGateway, sets) -> None:
    sentiment, _ = sets
    runner = _runner(live_gateway)
    target = EvalTarget("sentiment", "sentiment@1", 1, live_gateway.url)
    traffic_before = _traffic_rows(live_gateway)
    first = runner.run(target, sentiment)
    assert first.n == 24 and first.errors == 0 and not first.reused
    accuracy = first.score("accuracy")
    assert 0 <= accuracy.ci_low <= accuracy.value <= accuracy.ci_high <= 1
    assert {s.slice_value for s in first.slices} == {"bags", "crew", "info", "delays"}
    time.sleep(1.5)  # capture flushes every 0.5 s: eval requests must not have been captured as user traffic
    assert _traffic_rows(live_gateway) == traffic_before
    metrics = httpx.get(f"{live_gateway.url}/metrics").text
    assert 'route="eval"' in metrics

    with live_gateway.store.session() as session:  # simulate a crash half way: drop half the answers
        answers = session.scalars(select(EvalPredictionRow).where(EvalPredictionRow.run_id == first.run_id)
                                  .order_by(EvalPredictionRow.position)).all()
        kept = {a.example_id: a.prediction for a in answers}
        session.execute(delete(EvalPredictionRow).where(EvalPredictionRow.run_id == first.run_id,
                                                        EvalPredictionRow.position >= 12))
        session.execute(update(EvalRunRow).where(EvalRunRow.id == first.run_id).values(status="interrupted"))
    resumed = runner.run(target, sentiment)
    assert resumed.run_id == first.run_id and resumed.resumed_from == 12
    with live_gateway.store.session() as session:
        again = dict(session.execute(select(EvalPredictionRow.example_id, EvalPredictionRow.prediction)
                                     .where(EvalPredictionRow.run_id == first.run_id)).all())
    assert again == kept, "greedy decoding with a fixed seed answers the same"
    assert resumed.score("accuracy").value == accuracy.value


def test_base_model_and_adapter_compare_with_p_values(live_gateway: LiveGateway, sets) -> None:
    sentiment, _ = sets
    runner = _runner(live_gateway)
    base = runner.run(EvalTarget("sentiment", live_gateway.config.base_model.name, None, live_gateway.url),
                      sentiment)
    adapter = runner.run(EvalTarget("sentiment", "sentiment@1", 1, live_gateway.url), sentiment)
    report = compare_runs(runner, base.run_id, adapter.run_id)
    by_metric = {m.metric: m for m in report.metrics}
    assert set(by_metric) == {"accuracy", "macro_f1", "exact_match"}
    accuracy = by_metric["accuracy"]
    assert accuracy.ci_low <= accuracy.delta <= accuracy.ci_high
    assert 0 < accuracy.p_value <= 1 and accuracy.mcnemar_p_value is not None


def test_generation_task_gets_bleu_rouge_and_chrf(live_gateway: LiveGateway, sets) -> None:
    _, chat = sets
    report = _runner(live_gateway).run(EvalTarget("chat", "chat@1", 1, live_gateway.url), chat)
    names = {s.metric for s in report.scores}
    assert {"bleu", "chrf", "rouge1", "rougeL", "token_f1"} <= names
    assert report.score("bleu").signature.startswith("nrefs:1")
    assert all(0 <= s.value <= 1 for s in report.scores)


def test_feedback_turns_traffic_into_a_challenger_set(live_gateway: LiveGateway) -> None:
    url = live_gateway.url
    asked = {}
    for text in ("@united worst customer service ever, feedback test", "@JetBlue fine flight, feedback test"):
        response = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": "sentiment", "messages": [{"role": "user", "content": text}], "max_tokens": 3})
        assert response.status_code == 200
        asked[text] = response.headers["X-Request-Id"]
    request_id = asked["@united worst customer service ever, feedback test"]
    deadline = time.time() + 10
    answer = httpx.post(f"{url}/v1/feedback", json={"request_id": request_id, "reference": "Negative"})
    while answer.status_code == 404 and time.time() < deadline:  # the capture may not be written yet
        time.sleep(0.3)
        answer = httpx.post(f"{url}/v1/feedback", json={"request_id": request_id, "reference": "Negative"})
    assert answer.status_code == 200 and answer.json()["reference"] == "negative"
    bad_label = httpx.post(f"{url}/v1/feedback", json={"request_id": request_id, "reference": "furious"})
    assert bad_label.status_code == 400 and "label" in bad_label.json()["error"]["message"]
    conflict = httpx.post(f"{url}/v1/feedback", json={"request_id": request_id, "reference": "positive"})
    assert conflict.status_code == 409
    unauthorised = httpx.post(f"{url}/v1/feedback", json={"request_id": request_id, "reference": "positive",
                                                           "overwrite": True})
    assert unauthorised.status_code == 401
    unknown = httpx.post(f"{url}/v1/feedback", json={"request_id": "0" * 32, "reference": "positive"})
    assert unknown.status_code == 404
    with live_gateway.store.session() as session:
        assert session.scalar(select(TrafficRow.reference).where(TrafficRow.request_id == request_id)) == "negative"
    result = build_from_traffic(live_gateway.config, live_gateway.store, "sentiment", name="from-traffic",
                                since=parse_instant("1h"))
    examples = get_dataset(live_gateway.store, "sentiment/from-traffic").load()
    assert result.dataset.manifest.kind == "challenger" and len(examples) == 1
    assert examples[0].input.startswith("@united worst") and examples[0].reference == "negative"
    assert examples[0].meta["source"] == "traffic"
    overwritten = httpx.post(f"{url}/v1/feedback", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                             json={"request_id": request_id, "reference": "neutral", "overwrite": True})
    assert overwritten.status_code == 200 and overwritten.json()["changed"] is True


def test_vllm_with_grouped_lora_ops_answers_what_peft_answers(live_gateway: LiveGateway, sets) -> None:
    """End to end check of serving/lora_ops.py with real adapter weights: the plugin is active in vLLM's engine
    process, and greedy answers through it match the PEFT model run by transformers on the same prompts."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving.lora_ops import INSTALLED_MESSAGE
    from tuneloop.registry import get_adapter

    assert INSTALLED_MESSAGE in live_gateway.engine.log_path.read_text(errors="replace")
    sentiment, _ = sets
    runner = _runner(live_gateway)
    report = runner.run(EvalTarget("sentiment", "sentiment@1", 1, live_gateway.url), sentiment)
    with live_gateway.store.session() as session:
        served = dict(session.execute(select(EvalPredictionRow.example_id, EvalPredictionRow.prediction)
                                      .where(EvalPredictionRow.run_id == report.run_id)).all())
    base = live_gateway.config.base_model.path
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      get_adapter(live_gateway.store, "sentiment@1").path).eval()
    system = live_gateway.config.tasks["sentiment"].system_prompt
    max_tokens = live_gateway.config.tasks["sentiment"].max_new_tokens
    same = 0
    examples = sentiment.load()[:8]
    for example in examples:
        ids = tokenizer.apply_chat_template(example.chat_messages(system), add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        same += text.strip() == (served[example.id] or "").strip()
    assert same >= 7, f"only {same}/8 greedy answers matched between vLLM (grouped LoRA ops) and PEFT"


def test_a_version_the_gateway_does_not_route_is_evaluated_on_vllm_directly(live_gateway: LiveGateway,
                                                                            sets) -> None:
    from evaluators.endpoint import endpoint_for, served_models
    from tuneloop.registry import get_adapter

    config = live_gateway.config
    version = get_adapter(live_gateway.store, "sentiment@2")
    assert "sentiment@2" not in served_models(live_gateway.url)
    url = endpoint_for(config, version)
    assert url == live_gateway.engine.spec.base_url and "sentiment@2" in served_models(url)
    assert endpoint_for(config, get_adapter(live_gateway.store, "sentiment@1")) == live_gateway.url
    report = _runner(live_gateway).run(EvalTarget("sentiment", "sentiment@2", 2, url), sets[0], limit=6)
    assert report.n == 6 and report.errors == 0
    # the gateway still does not route it; an admin load later succeeds although vLLM already has it
    assert "sentiment@2" not in served_models(live_gateway.url)
    live_gateway.engine.load_adapter("sentiment@2", version.path)
    live_gateway.engine.unload_adapter("sentiment@2")  # leave it as the gateway tests expect: not loaded
