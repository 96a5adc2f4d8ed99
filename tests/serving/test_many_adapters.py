"""One vLLM serving a hundred adapters (issue 25, section 2): each answers as PEFT does with that adapter, one at a
time and mixed sixteen in flight (steps of several adapters: the stacked two-GEMM ops), while only 8 fit in a step
and 32 in memory (least recently used evicted)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from bench.many_adapters import TARGETS, peft_first_tokens, write_adapters
from tests.live import first_token, started_engine

COUNT = 100
PROMPTS = ["hey! what did you do this weekend?", "I love pizza", "where are you from?", "tell me about your dog",
           "what's your favourite movie?", "good morning!", "my flight was delayed again", "thanks for the help"]


@pytest.fixture(scope="module")
def adapters(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_adapters(base_model_dir, tmp_path_factory.mktemp("many-adapters"), COUNT)


@pytest.fixture(scope="module")
def engine(base_model_dir: Path, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tuneloop.ports import free_port
    from tuneloop.serving.engine import EngineSpec

    spec = EngineSpec(model_path=base_model_dir, served_name="base", port=free_port(), max_model_len=256,
                      kv_cache_gib=1, max_lora_rank=8, max_loras=8, max_cpu_loras=32,
                      lora_target_modules=list(TARGETS), lora_modules=dict(adapters), prefix_caching=False,
                      dtype="float32")
    with started_engine(spec, tmp_path_factory.mktemp("many-engine") / "vllm.log") as engine:
        yield engine



@pytest.mark.integration
def test_a_hundred_adapters_on_one_engine_answer_as_peft(engine: Any, adapters: dict[str, Path],
                                                         base_model_dir: Path) -> None:
    prompts = {name: PROMPTS[i % len(PROMPTS)] for i, name in enumerate(adapters)}
    expected = peft_first_tokens(base_model_dir, adapters, prompts)
    base = {p: first_token(engine, "base", p) for p in PROMPTS}

    def agreeing(served: dict[str, tuple[str, float]]) -> list[str]:
        return [n for n in adapters if served[n][0] == expected[n][0] and abs(served[n][1] - expected[n][1]) < 0.02]

    alone = {name: first_token(engine, name, prompts[name]) for name in adapters}
    assert len(agreeing(alone)) >= COUNT - 3, [(n, alone[n], expected[n]) for n in adapters if n not in agreeing(alone)]
    differing = [n for n in adapters
                 if alone[n][0] != base[prompts[n]][0] or abs(alone[n][1] - base[prompts[n]][1]) > 0.1]
    assert len(differing) >= COUNT // 2, "the adapters change the answers; ignoring them would fail the test above"

    with ThreadPoolExecutor(16) as pool:  # mixed steps, and adapters evicted and reloaded (32 fit in memory)
        together = dict(zip(adapters, pool.map(lambda n: first_token(engine, n, prompts[n]), list(adapters)),
                            strict=True))
    assert len(agreeing(together)) >= COUNT - 3, [(n, together[n], expected[n]) for n in adapters
                                                   if n not in agreeing(together)]
    log = engine.log_path.read_text(errors="replace")
    assert "bgmv_shrink stacked" in log and "bgmv_expand stacked" in log, \
        "steps mixing three or more adapters must take the stacked two-GEMM path (serving/lora_ops.py)"
