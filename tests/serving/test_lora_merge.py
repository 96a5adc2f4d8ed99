"""serving/lora_merge.py: the step plan and the merged weight (fast), and a real vLLM engine serving two adapters
and the base model with `lora_ops: merged`, answer by answer against PEFT in the same precision (integration)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.live import first_token, started_engine
from tuneloop.hardware import cpu_has_fast_bf16
from tuneloop.serving.lora_merge import MIXED, NO_ADAPTER, merged_weight, plan_step


def test_a_step_is_planned_once_from_its_token_slots() -> None:
    assert plan_step(torch.tensor([2, 2, 2])).slot == 2
    assert plan_step(torch.tensor([-1, -1])).slot == NO_ADAPTER
    assert plan_step(torch.tensor([0, 1, 1])).slot == MIXED
    assert plan_step(torch.tensor([-1, 0])).slot == MIXED, "a base-model token beside an adapter's is mixed"
    assert plan_step(torch.tensor([], dtype=torch.long)).slot == NO_ADAPTER
    assert plan_step(torch.tensor([3, 3, 3, 3])).tokens == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_merged_weight_is_w_plus_b_a_per_output_slice(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    slots, rank, width, slices = 3, 4, 16, (16, 8, 8)  # q, k, v of a packed qkv projection
    base = torch.randn(sum(slices), width).to(dtype)
    lora_a = tuple(torch.randn(slots, 1, rank, width).to(dtype) for _ in slices)
    lora_b = tuple(torch.randn(slots, 1, size, rank).to(dtype) for size in slices)
    merged = merged_weight(base, lora_a, lora_b, slices, slot=1)
    assert merged is not None and merged.dtype == dtype
    deltas = [b[1, 0].float() @ a[1, 0].float() for a, b in zip(lora_a, lora_b, strict=True)]
    expected = base.float() + torch.cat(deltas)
    x = torch.randn(5, width)
    tolerance = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close((x @ merged.float().T), x @ expected.T, atol=tolerance * 10, rtol=tolerance)
    assert not torch.equal(merged, base), "the adapter changed the weight"


def test_a_slot_the_adapter_leaves_empty_needs_no_merged_copy() -> None:
    base = torch.randn(8, 8)
    lora_a = (torch.zeros(2, 1, 4, 8),)
    lora_b = (torch.zeros(2, 1, 8, 4),)
    assert merged_weight(base, lora_a, lora_b, (8,), slot=0) is None


# -- a real engine ------------------------------------------------------------------------------------------------

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PROMPTS = ["hey! what did you do this weekend?", "I love pizza", "where are you from?", "tell me about your dog",
           "what's your favourite movie?", "good morning!"]


def _random_adapter(base: Path, folder: Path, seed: int) -> Path:
    """Random, non-zero A and B: an adapter whose answers differ from the base model's, so ignoring it fails."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))
    peft.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def adapters(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge-adapters")
    return {name: _random_adapter(base_model_dir, root / name, seed) for name, seed in (("one", 1), ("two", 2))}


def _engines() -> list[Any]:
    """(dtype, compiled): the served default (compiled) in both precisions, and the eager path in float32."""
    bf16 = pytest.param(("bfloat16", True), id="bfloat16-compiled", marks=pytest.mark.skipif(
        not cpu_has_fast_bf16(), reason="this CPU has no native bf16: vLLM serves float32 here, bf16 not measured"))
    return [pytest.param(("float32", True), id="float32-compiled"), bf16,
            pytest.param(("float32", False), id="float32-eager")]


@pytest.fixture(scope="module", params=_engines())
def merged_engine(request: pytest.FixtureRequest, base_model_dir: Path, adapters: dict[str, Path],
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tuneloop.ports import free_port
    from tuneloop.serving.engine import EngineSpec

    spec = EngineSpec(model_path=base_model_dir, served_name="base", port=free_port(), max_model_len=512,
                      kv_cache_gib=1, max_lora_rank=8, max_loras=2, lora_target_modules=TARGETS,
                      lora_modules=dict(adapters), prefix_caching=False, lora_ops="merged", dtype=request.param[0],
                      lora_compile=request.param[1])
    with started_engine(spec, tmp_path_factory.mktemp("merge-engine") / "vllm.log") as engine:
        yield engine



def _reference(base: Path, adapter: Path | None, dtype: torch.dtype, prompts: list[str]) -> list[tuple[str, float]]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model: Any = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            log_probs = torch.log_softmax(model(**ids).logits[0, -1].float(), dim=-1)
        top = int(log_probs.argmax())
        out.append((str(tokenizer.decode([top])), float(log_probs[top])))
    return out


def _agreeing(served: list[tuple[str, float]], expected: list[tuple[str, float]], tolerance: float) -> int:
    return sum(s[0] == e[0] and abs(s[1] - e[1]) < tolerance for s, e in zip(served, expected, strict=True))


@pytest.mark.integration
def test_merged_steps_answer_as_peft_for_one_adapter_two_adapters_and_none(merged_engine: Any, base_model_dir: Path,
                                                                          adapters: dict[str, Path]) -> None:
    """One request at a time (every step one adapter: the merged weight), then the two adapters and the base model
    at once (mixed steps: vLLM's LoRA path); each answer's first token and log-probability against PEFT, and the
    engine log shows which path each step took."""
    dtype = getattr(torch, merged_engine.spec.resolved_dtype)
    tolerance = 0.02 if dtype == torch.float32 else 0.15
    expected = {name: _reference(base_model_dir, path, dtype, PROMPTS) for name, path in adapters.items()}
    expected["base"] = _reference(base_model_dir, None, dtype, PROMPTS)
    alone = {model: [first_token(merged_engine, model, p) for p in PROMPTS] for model in ("one", "two", "base")}
    for model, served in alone.items():
        assert _agreeing(served, expected[model], tolerance) >= len(PROMPTS) - 1, \
            ("one at a time", model, served, expected[model])
    assert alone["one"] != alone["base"] and alone["one"] != alone["two"], "the adapters change the answers"

    together: dict[str, list[tuple[str, float]]] = {m: [("", 0.0)] * len(PROMPTS) for m in ("one", "two", "base")}

    def ask(model: str, i: int) -> None:
        together[model][i] = first_token(merged_engine, model, PROMPTS[i])

    for _round in range(2):  # several requests in flight: steps that hold tokens of both adapters and the base
        threads = [threading.Thread(target=ask, args=(m, i)) for i in range(len(PROMPTS)) for m in together]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for model, served in together.items():
            assert _agreeing(served, expected[model], tolerance) >= len(PROMPTS) - 1, \
                ("in flight together", model, served, expected[model])
    log = merged_engine.log_path.read_text(errors="replace")
    assert "merged single-adapter steps installed" in log
    assert "merged-ops step: single adapter (merged weight)" in log
    assert "merged-ops step: no adapter (base layer alone)" in log
    assert "merged-ops step: mixed or unplanned" in log
    assert "base weight not kept" not in log, "a wrapped layer lost its weight: its single-adapter steps were slow"
    compiled = "LoRA layers as one compiled-graph op each" in log
    assert compiled == merged_engine.spec.lora_compile, "the engine's compilation is not the one asked for"
    # vLLM's own word that compilation ran (it skips this warm-up where compilation is off), not only the patch's
    assert ("Warming up model for the compilation" in log) == compiled, log[-3000:]
