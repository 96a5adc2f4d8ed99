"""LoRA shape vs quality vs serving speed, and where LoRA serving time goes on vLLM's CPU backend.

For each adapter shape (rank, target modules): train it on the same data and steps, score it on the sentiment
held-out set (label likelihood, 95 % bootstrap CI), then start vLLM with LoRA flags that match it exactly (as
`tuneloop serve` does) and measure LoRA vs base throughput in that same engine at 32 concurrent 64-token requests,
base and LoRA rounds interleaved so machine noise hits both. Each shape is served with tuneloop's grouped CPU LoRA
ops (serving/lora_ops.py); the default shape is also served with vLLM's stock ops, and the adapter merged into the
base weights is served as a plain model, which bounds what any LoRA kernel can reach.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.load import LoadResult, chat_bodies, free_port, run_load
from bench.setup import base_model_path, sentiment_sets
from bench.tables import emit
from evaluators.label_likelihood import predict_labels
from evaluators.statistics import bootstrap_interval
from retrain.trainer import fit
from serving.engine import EngineSpec, EngineSupervisor
from serving.lora_ops import INSTALLED_MESSAGE
from tuneloop.config import Config

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = [*ATTENTION, "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Shape:
    rank: int
    targets: tuple[str, ...]

    @property
    def label(self) -> str:
        names = "q/k/v/o" if list(self.targets) == ATTENTION else (
            "all linear" if list(self.targets) == ALL_LINEAR else "/".join(t.split("_")[0] for t in self.targets))
        return f"r={self.rank} {names}"


DEFAULT = Shape(8, tuple(ATTENTION))


def run(*, quick: bool = False) -> str:
    steps, n_eval = (3, 40) if quick else (40, 300)
    concurrency, rounds, tokens = (8, 1, 16) if quick else (32, 2, 64)
    shapes = [Shape(8, ("q_proj", "v_proj")), DEFAULT] if quick else [
        Shape(8, ("q_proj", "v_proj")), DEFAULT, Shape(16, tuple(ATTENTION)), Shape(8, tuple(ALL_LINEAR))]
    task = Config().tasks["sentiment"]
    sets = sentiment_sets()
    heldout = random.Random(1).sample(sets["heldout"], n_eval)
    prompts = [e.input or "" for e in random.Random(2).sample(sets["heldout"], concurrency * 2)]
    base = base_model_path()
    quality_rows, speed_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        adapters: dict[Shape, Path] = {}
        for shape in shapes:
            recipe = task.train.model_copy(update={"rank": shape.rank, "target_modules": list(shape.targets),
                                                   "alpha": 2.0 * shape.rank, "max_steps": steps,
                                                   "eval_every": 10_000, "learning_rate": 1e-3})
            out = Path(tmp) / f"r{shape.rank}-{len(shape.targets)}"
            result = fit(base, sets["train"], [], system_prompt=task.system_prompt, train=recipe, output_dir=out,
                         progress=False)
            adapters[shape] = out
            quality_rows.append([shape.label, f"{result.trainable_params:,}",
                                 _accuracy(base, out, heldout, task.system_prompt, task.labels),
                                 f"{result.train_seconds:.0f}"])

        def measure(spec: EngineSpec, models: list[str]) -> dict[str, LoadResult]:
            return _serve_and_load(spec, Path(tmp), models, prompts, task.system_prompt, tokens, concurrency, rounds)

        plain = measure(_spec(base, enable_lora=False), ["base"])["base"]
        speed_rows.append(["base model, vLLM without --enable-lora", "-", f"{plain.tokens_per_second:.0f}",
                           "-", "1.00x (reference)"])
        merged_dir = _merge(base, adapters[DEFAULT], Path(tmp) / "merged")
        merged = measure(_spec(merged_dir, enable_lora=False), ["base"])["base"]
        speed_rows.append([f"{DEFAULT.label} merged into the base weights", "-", f"{merged.tokens_per_second:.0f}",
                           "-", f"{merged.tokens_per_second / plain.tokens_per_second:.2f}x"])
        for shape, ops in [(DEFAULT, "stock"), *((s, "grouped") for s in shapes)]:
            spec = _spec(base, shape=shape, adapter=adapters[shape], lora_ops=ops)
            results = measure(spec, ["base", "adapter"])
            ratio = results["adapter"].tokens_per_second / results["base"].tokens_per_second
            speed_rows.append([f"{shape.label}, {ops} ops", f"{results['base'].tokens_per_second:.0f}",
                               f"{results['adapter'].tokens_per_second:.0f}", f"{ratio:.2f}x",
                               f"{results['adapter'].tokens_per_second / plain.tokens_per_second:.2f}x"])
    text = emit(f"LoRA shape vs held-out accuracy ({steps} steps x batch 16, lr 1e-3, alpha = 2r)",
                ["adapter", "trainable params", f"accuracy [95 % CI], n={n_eval}", "train s"], quality_rows,
                notes="Label-likelihood scoring on sentiment held-out tweets; 2000 bootstrap resamples.")
    text += emit(f"LoRA vs base throughput in vLLM ({concurrency} concurrent {tokens}-token requests, "
                 f"{rounds} interleaved rounds each)",
                 ["served as", "base tok/s (same engine)", "model tok/s", "LoRA / base, same engine",
                  "vs vLLM without LoRA"], speed_rows,
                 notes="Each LoRA engine is started with --max-lora-rank and --lora-target-modules matching its one "
                       "adapter. 'stock ops' = vLLM's CPU torch ops (per-token weight gather); 'grouped ops' = "
                       "serving/lora_ops.py (one GEMM per adapter), loaded into vLLM by the tuneloop plugin.")
    return text


def _accuracy(base: Path, adapter: Path, heldout: list[Any], system: str, labels: list[str]) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    predicted = predict_labels(model, AutoTokenizer.from_pretrained(base), heldout, system_prompt=system,
                               labels=labels)
    truth = [e.reference for e in heldout]
    interval = bootstrap_interval(truth, lambda idx: sum(predicted[i] == truth[i] for i in idx) / len(idx))
    return f"{interval.value:.3f} [{interval.low:.3f}, {interval.high:.3f}]"


def _merge(base: Path, adapter: Path, out: Path) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    model.merge_and_unload().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (base / name).exists():
            shutil.copy(base / name, out / name)
    return out


def _spec(model: Path, *, enable_lora: bool = True, shape: Shape | None = None, adapter: Path | None = None,
          lora_ops: str = "grouped") -> EngineSpec:
    return EngineSpec(model_path=model, served_name="base", port=free_port(), max_model_len=512, kv_cache_gib=2,
                      enable_lora=enable_lora, max_lora_rank=shape.rank if shape else 8, max_loras=1,
                      lora_target_modules=list(shape.targets) if shape else [],
                      lora_modules={"adapter": adapter} if adapter else {}, lora_ops=lora_ops)


def _serve_and_load(spec: EngineSpec, tmp: Path, models: list[str], prompts: list[str], system: str, tokens: int,
                    concurrency: int, rounds: int) -> dict[str, LoadResult]:
    engine = EngineSupervisor(spec, tmp / "logs" / f"vllm-{spec.port}.log", restart=False)
    engine.start()
    try:
        url = f"{spec.base_url}/v1/chat/completions"
        asyncio.run(run_load(url, chat_bodies(models[-1], prompts[:4], 4, system), 4))  # warm-up
        merged: dict[str, list[LoadResult]] = {m: [] for m in models}
        for _ in range(rounds):
            for model in models:
                merged[model].append(asyncio.run(run_load(url, chat_bodies(model, prompts, tokens, system),
                                                          concurrency)))
    finally:
        engine.stop()
    installed = INSTALLED_MESSAGE in engine.log_path.read_text(errors="replace")
    if spec.enable_lora and installed != (spec.lora_ops == "grouped"):
        raise RuntimeError(f"lora_ops={spec.lora_ops} but the plugin {'did' if installed else 'did not'} install")
    return {m: _combine(results) for m, results in merged.items()}


def _combine(results: list[LoadResult]) -> LoadResult:
    failures = sum(r.failures for r in results)
    if failures:
        raise RuntimeError(f"{failures} benchmark requests failed")
    return LoadResult(requests=sum(r.requests for r in results), failures=0,
                      completion_tokens=sum(r.completion_tokens for r in results),
                      seconds=sum(r.seconds for r in results),
                      latencies=[x for r in results for x in r.latencies])
