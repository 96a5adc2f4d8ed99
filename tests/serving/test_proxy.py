"""Forwarding through the in-process gateway to a scripted vLLM: streams are relayed byte for byte while their text
and usage are captured, vLLM's own refusals reach the client unchanged and are recorded with their status, a
stream that breaks upstream is recorded as a 502, and a shadowed request is answered by the champion alone."""

from __future__ import annotations

from pathlib import Path

from tests.serving.test_gateway import _gateway, captured
from tuneloop.registry import set_alias
from tuneloop.serving.proxy import completion_of, json_or_none


def test_answers_are_read_from_both_endpoints_and_nothing_is_made_up_from_garbage() -> None:
    chat = {"choices": [{"message": {"content": "negative"}}], "usage": {"completion_tokens": 1}}
    assert completion_of(chat, "chat") == ("negative", {"completion_tokens": 1})
    assert completion_of({"choices": [{"text": "hi"}]}, "completion") == ("hi", {})
    assert completion_of({"choices": []}, "chat") == (None, {}) and completion_of(None, "chat") == (None, {})
    assert json_or_none(b"{not json") is None and json_or_none(b"\xff\xfe") is None


def test_a_stream_is_relayed_byte_for_byte_and_captured_whole(tmp_path: Path) -> None:
    for gateway in _gateway(tmp_path):
        streamed = gateway.chat("chat", "tell me a story", stream=True)
        assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
        events = [line for line in streamed.text.split("\n\n") if line]
        assert events[-1] == "data: [DONE]" and len(events) == 5, "every upstream event, in order"
        [row] = captured(gateway, 1)
        assert row.completion == "a free-text answer" and row.stream and row.status == 200
        assert (row.prompt_tokens, row.completion_tokens) == (11, 2)
        assert row.request_id == streamed.headers["X-Request-Id"]


def test_vllms_refusal_reaches_the_client_unchanged_and_is_recorded(tmp_path: Path) -> None:
    for gateway in _gateway(tmp_path):
        gateway.vllm.refuse_with = (400, "This model's maximum context length is 512 tokens")
        refused = gateway.chat("sentiment", "a very long tweet")
        assert refused.status_code == 400 and "maximum context length" in refused.json()["message"]
        [row] = captured(gateway, 1)
        assert row.status == 400 and row.completion is None
        assert gateway.sample("tuneloop_gateway_request_errors_total", task="sentiment", adapter="sentiment@1",
                              route="champion", status="400") == 1


def test_a_stream_that_breaks_upstream_is_recorded_as_a_502_with_what_arrived(tmp_path: Path) -> None:
    for gateway in _gateway(tmp_path):
        gateway.vllm.stream_fails_after = 1
        gateway.chat("chat", "tell me a story", stream=True)
        [row] = captured(gateway, 1)
        assert row.status == 502 and row.completion == "a free", "the part that arrived is kept, marked failed"


def test_a_shadowed_request_is_answered_by_the_champion_and_mirrored_to_the_candidate(tmp_path: Path) -> None:
    for gateway in _gateway(tmp_path, extra_config="tasks:\n  sentiment:\n    rollout:\n      shadow: true\n"):
        set_alias(gateway.store, "sentiment@2", "candidate")
        assert gateway.ctx.swapper.follow() == ["sentiment@2"], "loaded, then routed, as the alias poll does"
        answered = gateway.chat("sentiment", "@united lost my bag")
        assert answered.status_code == 200 and answered.json()["model"] == "sentiment@1"
        rows = captured(gateway, 2)
        by_kind = {r.route: r for r in rows}
        assert set(by_kind) == {"champion", "shadow"}
        assert by_kind["shadow"].shadow_of == answered.headers["X-Request-Id"]
        assert by_kind["shadow"].adapter_version == 2 and by_kind["champion"].shadow_of is None
        assert sorted(b["model"] for b in gateway.vllm.bodies) == ["sentiment@1", "sentiment@2"]
