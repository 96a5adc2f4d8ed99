"""Evaluations through the real gateway and vLLM: stored, deterministic, resumable; feedback to challenger sets.

Shares the session's live gateway (tests/serving/conftest.py). Leaves routing state as it found it: the gateway
tests that follow expect sentiment@2 not loaded yet.
"""

from __future__ import annotations

import os
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, func, select, update

from tests.live import ADMIN_TOKEN, LiveGateway
from tuneloop.challenger_sets.catalog import add_dataset, get_dataset
from tuneloop.challenger_sets.from_traffic import build_from_traffic
from tuneloop.challenger_sets.records import Example, Message
from tuneloop.evaluators.compare import compare_runs
from tuneloop.evaluators.runner import EvalRunner, EvalTarget
from tuneloop.hardware import usable_cpu_cores
from tuneloop.keys import create_key
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
    eval_requests = live_gateway.ctx.registry.get_sample_value(
        "tuneloop_gateway_requests_total", {"task": "sentiment", "adapter": "sentiment@1", "route": "eval",
                                            "status": "200"})
    assert eval_requests is not None and eval_requests >= 24

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
    labels = set(live_gateway.config.tasks["sentiment"].labels)
    for run in (base, adapter):  # both answered through the label constraint: every answer is a label
        with live_gateway.store.session() as session:
            answers = set(session.scalars(select(EvalPredictionRow.prediction)
                                          .where(EvalPredictionRow.run_id == run.run_id)))
        assert answers <= labels, answers
    same = compare_runs(runner, adapter.run_id, adapter.run_id)
    assert all(m.delta == 0 and m.p_value == 1 and not m.significant for m in same.metrics)


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
    labeller, labeller_key = create_key(live_gateway.store, "labeller", ["feedback"])
    _, app_key = create_key(live_gateway.store, "app", ["inference"])
    as_labeller = {"Authorization": f"Bearer {labeller_key}"}

    def label(reference: str, headers: dict[str, str] | None = None, **extra: object) -> httpx.Response:
        return httpx.post(f"{url}/v1/feedback", headers=headers if headers is not None else as_labeller,
                          json={"request_id": request_id, "reference": reference, **extra})

    assert label("negative", headers={}).status_code == 401, "labels are training data: no key, no label"
    assert label("negative", headers={"Authorization": f"Bearer {app_key}"}).status_code == 403
    deadline = time.time() + 10
    answer = label("Negative")
    while answer.status_code == 404 and time.time() < deadline:  # the capture may not be written yet
        time.sleep(0.3)
        answer = label("Negative")
    assert answer.status_code == 200 and answer.json()["reference"] == "negative"
    bad_label = label("furious")
    assert bad_label.status_code == 400 and "label" in bad_label.json()["error"]["message"]
    assert label("positive").status_code == 409
    assert label("positive", overwrite=True).status_code == 403, "replacing a label needs admin"
    unknown = httpx.post(f"{url}/v1/feedback", headers=as_labeller,
                         json={"request_id": "0" * 32, "reference": "positive"})
    assert unknown.status_code == 404
    with live_gateway.store.session() as session:
        row = session.scalars(select(TrafficRow).where(TrafficRow.request_id == request_id)).one()
        assert (row.reference, row.reference_key_id) == ("negative", labeller.id)
    result = build_from_traffic(live_gateway.config, live_gateway.store, "sentiment", name="from-traffic",
                                since=parse_instant("1h"))
    examples = get_dataset(live_gateway.store, "sentiment/from-traffic").load()
    assert result.dataset.manifest.kind == "challenger" and len(examples) == 1
    assert (examples[0].input or "").startswith("@united worst") and examples[0].reference == "negative"
    assert examples[0].meta["source"] == "traffic"
    overwritten = httpx.post(f"{url}/v1/feedback", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                             json={"request_id": request_id, "reference": "neutral", "overwrite": True})
    assert overwritten.status_code == 200 and overwritten.json()["changed"] is True


def _random_lora(live_gateway: LiveGateway, tmp_path) -> str:
    """A chat adapter with random (not zero) B matrices, registered like a trained one: its answers differ from
    the base model's, so serving it can be told from ignoring it. Loaded through the admin API's checks."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneloop.registry import AdapterCard, register_adapter

    engine = live_gateway.engine
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(live_gateway.config.base_model.path), dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    peft.save_pretrained(tmp_path / "random-lora")
    card = AdapterCard(task="chat", method="lora", datasets=[],
                       base_model={"name": live_gateway.config.base_model.name,
                                   "sha256": engine.spec.base_sha256},
                       hyperparameters={"rank": 8, "target_modules": targets, "alpha": 16})
    version = register_adapter(live_gateway.store, live_gateway.config.data_path, tmp_path / "random-lora", card)
    loaded = httpx.post(f"{live_gateway.url}/admin/adapters/load", json={"version": version.ref}, timeout=180,
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert loaded.status_code == 200, loaded.text
    return version.ref


def test_vllm_serves_an_adapter_as_peft_computes_it_in_the_same_precision(live_gateway: LiveGateway,
                                                                          tmp_path) -> None:
    """End to end check of the served LoRA path with real weights: the configured path (merged single-adapter
    steps by default, serving/lora_merge.py; the grouped ops of serving/lora_ops.py otherwise) runs inside vLLM's
    engine in the precision it serves (no fallback), the adapter changes the model's answers, and vLLM's
    next-token log-probabilities match the PEFT model run by transformers in that same precision."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.registry import get_adapter
    from tuneloop.serving.lora_merge import MERGED_RAN_MESSAGE
    from tuneloop.serving.lora_ops import FELL_BACK_MESSAGE, GROUPED_RAN_MESSAGE, INSTALLED_MESSAGE

    engine = live_gateway.engine
    dtype_name = engine.spec.resolved_dtype
    dtype = getattr(torch, dtype_name)
    ref = _random_lora(live_gateway, tmp_path)
    system = live_gateway.config.tasks["chat"].system_prompt
    prompts = ["hey! what did you do this weekend?", "I love pizza", "where are you from?", "tell me about your dog",
               "what's your favourite movie?", "good morning!", "I just got back from work", "do you like music?"]

    def served(model: str, prompt: str) -> dict[str, Any]:
        response = httpx.post(f"{live_gateway.url}/v1/chat/completions", timeout=120, json={
            "model": model, "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 5,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}]})
        assert response.status_code == 200, response.text
        first = response.json()["choices"][0]["logprobs"]["content"][0]
        return {"token": first["token"], "logprob": first["logprob"],
                "top": {t["token"]: t["logprob"] for t in first["top_logprobs"]}}

    base = str(live_gateway.config.base_model.path)
    tokenizer = AutoTokenizer.from_pretrained(base)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype),
                                          get_adapter(live_gateway.store, ref).path).eval()
    tolerance = 0.02 if dtype == torch.float32 else 0.15
    agree, differ_from_base, shifts = 0, 0, []
    for prompt in prompts:
        via_adapter, via_base = served(ref, prompt), served(live_gateway.config.base_model.name, prompt)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        with torch.inference_mode():
            log_probs = torch.log_softmax(reference(**ids).logits[0, -1].float(),  # type: ignore[arg-type]
                                          dim=-1)  # return_dict=True: a BatchEncoding
        top = int(log_probs.argmax())
        if tokenizer.decode([top]) == via_adapter["token"] and \
                abs(float(log_probs[top]) - via_adapter["logprob"]) < tolerance:
            agree += 1
        differ_from_base += via_adapter["token"] != via_base["token"]
        # how far the adapter moved the base model's choice (a lower bound when it left the adapter's top 5)
        under_adapter = via_adapter["top"].get(via_base["token"], min(via_adapter["top"].values()))
        shifts.append(abs(under_adapter - via_base["logprob"]))
    log = engine.log_path.read_text(errors="replace")
    assert INSTALLED_MESSAGE in log
    if engine.spec.lora_ops == "merged":  # the default: one request at a time is a single-adapter step
        assert MERGED_RAN_MESSAGE in log, "the adapter's steps did not run on its merged weight"
    else:
        assert GROUPED_RAN_MESSAGE in log
    assert FELL_BACK_MESSAGE not in log, f"a LoRA op fell back to vLLM's in {dtype_name}"
    if usable_cpu_cores() <= 2 and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ:
        assert "reserve_cpu_num=0" in log, "on two cores vLLM's compute threads should use both"
    assert agree >= 7, f"only {agree}/8 first tokens agree between vLLM ({dtype_name}) and PEFT ({dtype_name})"
    # An ignored adapter would leave the base model's choice where it was: this random adapter moves its
    # log-probability by about 1.2 nats on average (measured with PEFT), far beyond bf16 noise.
    assert sum(shifts) / len(shifts) > 0.5, f"the adapter barely moved the answers ({shifts}): is it applied?"


def test_a_version_the_gateway_does_not_route_is_loaded_through_its_checks_and_evaluated_there(
        live_gateway: LiveGateway, sets) -> None:
    from tuneloop.evaluators.targets import resolve_target
    from tuneloop.serving.admin_client import AdminClient

    config = live_gateway.config
    admin = AdminClient(config)
    assert "sentiment@2" not in admin.served_models()
    target = resolve_target(config, live_gateway.store, task=None, adapter="sentiment@2")
    assert target.base_url == live_gateway.url and target.model == "sentiment@2"
    assert "sentiment@2" in admin.served_models() and "sentiment@2" in live_gateway.engine.client.served_models()
    champion = resolve_target(config, live_gateway.store, task="sentiment")
    assert champion.model == "sentiment@1" and champion.base_url == live_gateway.url
    report = _runner(live_gateway).run(target, sets[0], limit=6)
    assert report.n == 6 and report.errors == 0
    labels = set(config.tasks["sentiment"].labels)
    with live_gateway.store.session() as session:
        answers = session.scalars(select(EvalPredictionRow.prediction)
                                  .where(EvalPredictionRow.run_id == report.run_id)).all()
    assert set(answers) <= labels, "eval requests are constrained to the labels too"
    admin.unload("sentiment@2")  # leave it as the gateway tests expect: not loaded
    assert "sentiment@2" not in admin.served_models()
