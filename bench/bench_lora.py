"""LoRA shape vs quality vs serving speed, and where LoRA serving time goes on vLLM's CPU backend.

1. Quality (`bench lora_quality`, its own run): each adapter shape (rank, target modules) trained on the same data
   and steps, scored on the sentiment held-out set (label likelihood, 95 % bootstrap CI).
2. Served speed, for the shapes users run: chat replies (64 tokens, decode-bound) and classification requests
   (system prompt + tweet, the label constraint, a few answer tokens: prefill-bound), each on the adapter and on
   the base model in the same engine, rounds alternated base, adapter, adapter, base. Each engine is started
   with LoRA flags matching its adapter (as `tuneloop serve` does), prefix caching off so no round reuses
   another's KV cache; reference rows: vLLM without --enable-lora, and the adapter merged into the weights.
3. The LoRA ops themselves in both precisions (float32; bf16 activations and weights with vLLM's float32 shrink
   buffer, as a bf16 model runs), vLLM's stock ops against tuneloop's grouped ops, for a decode batch and a
   prefill batch, beside the base projection they ride on.
4. Where the time goes (`bench lora_profile`, its own run): a sampling profile (py-spy) of vLLM's processes
   during the classification workload, base vs adapter, attributed to the code the samples are in.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.load import LoadResult, chat_bodies, run_load
from bench.many_adapters import TRAINED_LIKE_B_SCALE, scale_lora_b
from bench.setup import base_model_path, sentiment_sets
from bench.tables import Table, emit
from tuneloop.config import Config, TaskConfig
from tuneloop.evaluators.label_likelihood import predict_labels
from tuneloop.evaluators.scoring import score_examples
from tuneloop.evaluators.statistics import table_interval
from tuneloop.hardware import cpu_has_fast_bf16
from tuneloop.ports import free_port
from tuneloop.retrain.trainer import fit
from tuneloop.serving.constraints import constrain_to_labels
from tuneloop.serving.engine import EngineSpec, EngineSupervisor
from tuneloop.serving.lora_merge import MERGED_RAN_MESSAGE
from tuneloop.serving.lora_ops import FELL_BACK_MESSAGE, INSTALLED_MESSAGE

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
SHAPES = [Shape(8, ("q_proj", "v_proj")), DEFAULT, Shape(16, tuple(ATTENTION)), Shape(8, tuple(ALL_LINEAR))]


@dataclass(frozen=True)
class Workload:
    name: str
    concurrency: int
    build: Callable[[str], list[dict[str, Any]]]
    unit: str  # what throughput counts: "tok" (completion tokens) or "req" (answered requests)


def run_quality(*, quick: bool = False) -> list[Table]:
    """`bench lora_quality`: accuracy per adapter shape, same data and steps."""
    steps, n_eval = (2, 24) if quick else (40, 300)
    shapes = [DEFAULT] if quick else SHAPES
    task = Config().tasks["sentiment"]
    sets = sentiment_sets()
    heldout = random.Random(1).sample(sets["heldout"], n_eval)
    base = base_model_path()
    rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            recipe = task.train.model_copy(update={"rank": shape.rank, "target_modules": list(shape.targets),
                                                   "alpha": 2.0 * shape.rank, "max_steps": steps,
                                                   "eval_every": 10_000, "learning_rate": 1e-3})
            out = Path(tmp) / f"r{shape.rank}-{len(shape.targets)}"
            result = fit(base, sets["train"], [], system_prompt=task.system_prompt, train=recipe, output_dir=out,
                         progress=False)
            rows.append([shape.label, f"{result.trainable_params:,}", _accuracy(base, out, heldout, task),
                         f"{result.train_seconds:.0f}"])
    return [emit(f"LoRA shape vs held-out accuracy ({steps} steps x batch 16, lr 1e-3, alpha = 2r)",
                 ["adapter", "trainable params", f"accuracy [95 % CI], n={n_eval}", "train s"], rows,
                 key="lora-quality", notes="Label-likelihood scoring on sentiment held-out tweets; 2000 bootstrap "
                                           "resamples. train s is wall time on a machine that may run other work.")]


def run(*, quick: bool = False) -> list[Table]:
    """`bench lora`: served speed per shape and workload, and the ops in both precisions.

    Serving speed does not depend on an adapter's values, so each shape is a randomly initialised LoRA (no
    training); `bench lora_quality` trains the same shapes for their accuracy.
    """
    rounds = 1 if quick else 2
    shapes = [DEFAULT] if quick else SHAPES
    task = Config().tasks["sentiment"]
    sets = sentiment_sets()
    tweets = [e.last_user_text() for e in random.Random(2).sample(sets["heldout"], 96)]
    chats = [e.last_user_text() for e in random.Random(3).sample(sets["train"], 32)]
    full_workloads = _workloads(task, chats, tweets, chat_tokens=64)
    # Small enough for smoke runs, and for bf16 engines on CPUs that emulate bf16 (several times slower).
    small_workloads = _workloads(task, chats[:8], tweets[:32], chat_tokens=16)
    base = base_model_path()
    speed_rows: list[list[Any]] = []
    tables: list[Table] = []
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {shape: _random_adapter(base, shape, Path(tmp) / f"r{shape.rank}-{len(shape.targets)}")
                    for shape in shapes}
        tables.append(_ops_microbenchmark(quick))

        dtypes = ["float32", "bfloat16"]
        engines: list[tuple[str, EngineSpec]] = []
        for dtype in dtypes:
            engines.append((f"base model, vLLM without --enable-lora ({dtype})", _spec(base, dtype=dtype)))
            if dtype == "float32":
                merged = _merge(base, adapters[DEFAULT], Path(tmp) / "merged")
                engines.append((f"{DEFAULT.label} merged into the base weights ({dtype})",
                                _spec(merged, dtype=dtype)))
            engines.append((f"{DEFAULT.label}, stock ops ({dtype})",
                            _spec(base, dtype=dtype, shape=DEFAULT, adapter=adapters[DEFAULT], lora_ops="stock")))
            engines.append((f"{DEFAULT.label}, merged steps ({dtype})",
                            _spec(base, dtype=dtype, shape=DEFAULT, adapter=adapters[DEFAULT], lora_ops="merged")))
            for shape in shapes if dtype == "float32" else [DEFAULT]:
                engines.append((f"{shape.label}, grouped ops ({dtype})",
                                _spec(base, dtype=dtype, shape=shape, adapter=adapters[shape])))
        if quick:  # one LoRA engine; the merge above still ran
            engines = [e for e in engines if "grouped ops (float32)" in e[0]]
        reference: dict[tuple[str, str], float] = {}
        for label, spec in engines:
            # Without native bf16 a bf16 engine is several times slower: one round of small workloads.
            emulated = spec.resolved_dtype == "bfloat16" and not cpu_has_fast_bf16()
            workloads = small_workloads if quick or emulated else full_workloads
            measured = _serve_and_measure(spec, Path(tmp), workloads, 1 if emulated else rounds)
            for workload in workloads:
                key = (spec.resolved_dtype, workload.name)
                got = measured["results"][workload.name]
                model_rate = got["adapter" if spec.enable_lora else "base"]
                if not spec.enable_lora and spec.model_path == base:
                    reference[key] = model_rate
                base_rate = got.get("base") if spec.enable_lora else None
                speed_rows.append([workload.name, label, _rate(base_rate, workload),
                                   _rate(model_rate, workload),
                                   f"{model_rate / base_rate:.2f}x" if base_rate else "-",
                                   f"{model_rate / reference[key]:.2f}x" if key in reference else "-",
                                   measured["failures"]])
    tables.append(emit("LoRA vs base model served by vLLM, same engine, rounds alternated",
                       ["workload", "engine", "base in this engine", "this model", "model / base, same engine",
                        "vs vLLM without LoRA", "failed requests"], speed_rows, key="lora-speed",
                       notes="Throughput: completion tokens/s for chat replies, answered requests/s for "
                             f"classification (system prompt + tweet, the label constraint); {rounds} round(s) per "
                             "model per workload, alternated base, adapter, adapter, base. Each LoRA engine has "
                             "--max-lora-rank and --lora-target-modules matching its one adapter; 'stock ops' = "
                             "vLLM's CPU torch ops (a per-token copy of the adapter "
                             "weights), 'grouped ops' = serving/lora_ops.py (one GEMM per adapter). This CPU "
                             + ("multiplies bf16 natively." if cpu_has_fast_bf16() else
                                "has no native bf16 (AVX512-BF16/AMX): its bf16 engines are emulated, several times "
                                "slower, and ran one round of the small workloads; tuneloop serves float32 here.")))
    return tables


PATHS_OPS = ("stock", "grouped", "merged", "merged, compiled")


def run_paths(*, quick: bool = False) -> list[Table]:
    """`bench lora_paths`: the r=8 q/k/v/o adapter under vLLM's stock ops, the grouped ops and merged single-adapter
    steps, beside a LoRA-free engine, in float32 and (where the CPU multiplies it natively) bf16.

    Smaller workloads than `bench lora` so that every path and precision fits one run; the LoRA engines run in
    the order stock, grouped, merged for float32 and the reverse for bf16, each with base and adapter rounds
    alternated inside it."""
    task = Config().tasks["sentiment"]
    sets = sentiment_sets()
    tweets = [e.last_user_text() for e in random.Random(2).sample(sets["heldout"], 16 if quick else 64)]
    chats = [e.last_user_text() for e in random.Random(3).sample(sets["train"], 4 if quick else 16)]
    workloads = _workloads(task, chats, tweets, chat_tokens=8 if quick else 32)
    rounds = 1 if quick else 2
    base = base_model_path()
    dtypes = ["float32"] if quick or not cpu_has_fast_bf16() else ["float32", "bfloat16"]
    rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        adapter = _random_adapter(base, DEFAULT, Path(tmp) / "adapter")
        for index, dtype in enumerate(dtypes):
            ops_order = PATHS_OPS if index % 2 == 0 else tuple(reversed(PATHS_OPS))
            engines = [(f"vLLM without --enable-lora ({dtype})", _spec(base, dtype=dtype))]
            engines += [(f"{DEFAULT.label}, {ops} ({dtype})",
                         _spec(base, dtype=dtype, shape=DEFAULT, adapter=adapter, lora_ops=ops.split(",")[0],
                               lora_compile=ops.endswith("compiled")))
                        for ops in (ops_order if not quick else ("merged, compiled",))]
            reference: dict[str, float] = {}
            for label, spec in engines:
                measured = _serve_and_measure(spec, Path(tmp), workloads, rounds)
                for workload in workloads:
                    got = measured["results"][workload.name]
                    if not spec.enable_lora:
                        reference[workload.name] = got["base"]
                        rows.append([workload.name, label, "-", _rate(got["base"], workload), "-", "1.00x", "-",
                                     measured["failures"], f"{measured['tokens'][workload.name]['base']:.1f}"])
                        continue
                    free = reference[workload.name]
                    answer = measured["tokens"][workload.name]
                    rows.append([workload.name, label, _rate(got["base"], workload),
                                 _rate(got["adapter"], workload), f"{got['adapter'] / got['base']:.2f}x",
                                 f"{got['adapter'] / free:.2f}x", f"{got['base'] / free:.2f}x",
                                 measured["failures"], f"{answer['base']:.1f} / {answer['adapter']:.1f}"])
    bf16_note = ("This CPU multiplies bf16 natively." if cpu_has_fast_bf16() else
                 "This CPU has no native bf16: bf16 was not measured (tuneloop serves float32 here).")
    return [emit("LoRA paths served by vLLM: stock ops, grouped ops, merged single-adapter steps",
                 ["workload", "engine", "base in this engine", "adapter", "adapter / base, same engine",
                  "adapter / LoRA-free engine", "base / LoRA-free engine", "failed requests",
                  "tokens per answer (base / adapter)"], rows,
                 key="lora-paths",
                 notes=f"{rounds} round(s) per model per workload, alternated base, adapter, adapter, base. "
                       "Throughput: completion tokens/s for chat replies, answered requests/s for classification "
                       "(system prompt + tweet, the label constraint, 16 in flight). 'merged' = serving/"
                       "lora_merge.py: a step whose tokens all use one adapter runs on that adapter merged into "
                       "the weights, a step without adapters on the base layers alone, mixed steps on the grouped "
                       "ops; 'compiled' = serving/lora_compile.py: vLLM's torch.compile kept on (vLLM turns it off "
                       "for any LoRA engine on CPU), each LoRA layer one opaque op in the graph; the LoRA-free "
                       "engine is compiled, as vLLM runs it by default. The adapter is random with a trained-size "
                       f"delta (B scaled by {TRAINED_LIKE_B_SCALE}; a full-size random delta spelled labels in 3-5 "
                       "tokens, see bench/many_adapters.py); the run fails if its classification answers are not "
                       "as long as the base model's. Targets (issue 25): adapter >= 0.9x "
                       "base for classification, >= 0.95x a LoRA-free engine for chat, base in a LoRA engine "
                       ">= 0.97x a LoRA-free engine. " + bf16_note)]


def run_profile(*, quick: bool = False) -> list[Table]:
    """`bench lora_profile`: where a classification workload's engine time goes, base vs adapter in one engine.

    The r=8 q/k/v/o adapter under vLLM's stock ops (before), tuneloop's grouped ops (its default before issue 25)
    and the merged, compiled path (after), in float32 and bf16 (on a CPU without native bf16 the bf16 engines
    answer fewer tweets: they are several times slower).
    """
    task = Config().tasks["sentiment"]
    tweets = [e.last_user_text() for e in random.Random(2).sample(sentiment_sets()["heldout"], 96)]
    base = base_model_path()
    variants = [("merged, compiled", "float32")] if quick else [
        (ops, dtype) for dtype in ("float32", "bfloat16") for ops in ("stock", "grouped", "merged, compiled")]
    rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        adapter = _random_adapter(base, DEFAULT, Path(tmp) / "adapter")
        for ops, dtype in variants:
            spec = _spec(base, dtype=dtype, shape=DEFAULT, adapter=adapter, lora_ops=ops.split(",")[0],
                         lora_compile=ops.endswith("compiled"))
            emulated = spec.resolved_dtype == "bfloat16" and not cpu_has_fast_bf16()
            sample = tweets[:16] if quick else tweets[:32] if emulated else tweets
            label = f"{DEFAULT.label}, {ops} ops ({spec.resolved_dtype})"
            with _served(spec, Path(tmp)) as (engine, url):
                for model in ("base", "adapter"):
                    shares = _profile(engine, url, _classification_bodies(model, sample, task), 16,
                                      passes=1 if quick or emulated else 2)
                    rows.append([label, model, len(sample),
                                 *[f"{shares[c]:.0%}" for c in PROFILE_CATEGORIES]])
    return [emit("Where the classification workload's engine time goes (py-spy samples of vLLM's processes)",
                 ["engine", "requests to", "tweets per pass", *PROFILE_CATEGORIES], rows, key="lora-profile",
                 notes="Share of py-spy samples (100 Hz) of running threads in vLLM's processes (API server, engine "
                       "core, worker) while 16 concurrent classification requests (system prompt + tweet, the label "
                       "constraint) were answered, attributed to the innermost matching frame: 'LoRA ops' = the "
                       "shrink/expand ops; 'LoRA bookkeeping' = punica metadata and LoRA layer wrappers around "
                       "them; 'base layers' = the model's own linear layers, norms and activations (in a compiled "
                       "engine: Inductor's generated code and vLLM's compiled-graph wrappers); 'attention'; "
                       "'sampling + structured output' = logits, sampler and grammar; 'scheduler + other' = the "
                       "rest (HTTP, tokenizing, scheduling, inputs). "
                       + ("This CPU multiplies bf16 natively." if cpu_has_fast_bf16() else
                          "This CPU has no native bf16: its bf16 engines are emulated."))]


def _workloads(task: TaskConfig, chats: list[str], tweets: list[str], *, chat_tokens: int) -> list[Workload]:
    return [Workload(f"chat, {len(chats)} x {chat_tokens} tokens", len(chats),
                     lambda model: chat_bodies(model, chats, chat_tokens, task.system_prompt), "tok"),
            Workload(f"classification, {len(tweets)} tweets, 16 concurrent", 16,
                     lambda model: _classification_bodies(model, tweets, task), "req")]


def _classification_bodies(model: str, tweets: list[str], task: TaskConfig) -> list[dict[str, Any]]:
    bodies = []
    for tweet in tweets:
        body: dict[str, Any] = {"model": model, "temperature": 0, "max_tokens": task.max_new_tokens,
                                "messages": [{"role": "system", "content": task.system_prompt},
                                             {"role": "user", "content": tweet}]}
        constrain_to_labels(body, task)
        bodies.append(body)
    return bodies


def _rate(value: float | None, workload: Workload) -> str:
    if value is None:
        return "-"
    return f"{value:.0f} tok/s" if workload.unit == "tok" else f"{value:.1f} req/s"


def _accuracy(base: Path, adapter: Path, heldout: list[Any], task: TaskConfig) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    predicted = predict_labels(model, AutoTokenizer.from_pretrained(base), heldout, system_prompt=task.system_prompt,
                               labels=task.labels)
    table = score_examples(["accuracy"], predicted, [e.reference for e in heldout], task.labels)["accuracy"]
    interval, _ = table_interval(table)
    return f"{interval.value:.3f} [{interval.low:.3f}, {interval.high:.3f}]"


def _random_adapter(base: Path, shape: Shape, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=shape.rank, lora_alpha=2 * shape.rank, target_modules=list(shape.targets),
                                      init_lora_weights=False))
    scale_lora_b(model, TRAINED_LIKE_B_SCALE)  # full-size random deltas spell labels in 3-5 tokens: see many_adapters
    model.save_pretrained(str(out))
    return out


def _merge(base: Path, adapter: Path, out: Path) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    model.merge_and_unload().save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (base / name).exists():
            shutil.copy(base / name, out / name)
    return out


def _spec(model: Path, *, dtype: str, shape: Shape | None = None, adapter: Path | None = None,
          lora_ops: str = "grouped", lora_compile: bool = False) -> EngineSpec:
    return EngineSpec(model_path=model, served_name="base", port=free_port(), max_model_len=512, kv_cache_gib=2,
                      enable_lora=shape is not None, max_lora_rank=shape.rank if shape else 8, max_loras=1,
                      lora_target_modules=list(shape.targets) if shape else [],
                      lora_modules={"adapter": adapter} if adapter else {}, prefix_caching=False,
                      lora_ops=lora_ops, lora_compile=lora_compile, dtype=dtype)  # type: ignore[arg-type]


def _serve_and_measure(spec: EngineSpec, tmp: Path, workloads: list[Workload], rounds: int) -> dict[str, Any]:
    models = ["base", "adapter"] if spec.enable_lora else ["base"]
    results: dict[str, dict[str, float]] = {}
    tokens: dict[str, dict[str, float]] = {}
    failures = 0
    with _served(spec, tmp) as (_, url):
        for workload in workloads:
            totals: dict[str, list[LoadResult]] = {m: [] for m in models}
            for i in range(rounds):
                for model in models if i % 2 == 0 else list(reversed(models)):
                    result = asyncio.run(run_load(url, workload.build(model), workload.concurrency,
                                                    headers=spec.auth_headers))
                    totals[model].append(result)
                    failures += result.failures
            results[workload.name] = {m: _throughput(r, workload) for m, r in totals.items()}
            tokens[workload.name] = {m: _tokens_per_answer(r) for m, r in totals.items()}
            _check_same_work(workload, tokens[workload.name])
    return {"results": results, "tokens": tokens, "failures": failures}


def _tokens_per_answer(results: list[LoadResult]) -> float:
    answered = sum(r.requests - r.failures for r in results)
    return sum(r.completion_tokens for r in results) / answered if answered else float("nan")


def _check_same_work(workload: Workload, tokens: dict[str, float]) -> None:
    """Requests per second compare like with like only if adapter and base answers are as long: an adapter that
    spells a label in more tokens does more decode steps per request (see bench/many_adapters.py)."""
    if workload.unit == "req" and "adapter" in tokens and abs(tokens["adapter"] / tokens["base"] - 1) > 0.1:
        raise RuntimeError(f"{workload.name}: adapter answers average {tokens['adapter']:.2f} completion tokens, "
                           f"base answers {tokens['base']:.2f}; requests/s would compare different work")


@contextmanager
def _served(spec: EngineSpec, tmp: Path) -> Iterator[tuple[EngineSupervisor, str]]:
    """A warmed-up engine for `spec`; on exit, fail if the LoRA ops it ran are not the ones it was asked for."""
    engine = EngineSupervisor(spec, tmp / "logs" / f"vllm-{spec.port}.log", restart=False)
    engine.start()
    try:
        url = f"{spec.base_url}/v1/chat/completions"
        asyncio.run(run_load(url, chat_bodies("adapter" if spec.enable_lora else "base", ["warm up"] * 4, 4), 4,
                             headers=spec.auth_headers))
        yield engine, url
    finally:
        engine.stop()
    log = engine.log_path.read_text(errors="replace")
    if spec.enable_lora and (INSTALLED_MESSAGE in log) != (spec.lora_ops in ("grouped", "merged")):
        raise RuntimeError(f"lora_ops={spec.lora_ops} but the plugin {'did' if INSTALLED_MESSAGE in log else 'did not'}"
                           " install")
    if spec.enable_lora and spec.lora_ops == "grouped" and FELL_BACK_MESSAGE in log:
        raise RuntimeError(f"a grouped LoRA op fell back to vLLM's in {spec.resolved_dtype}; see {engine.log_path}")
    if spec.enable_lora and spec.lora_ops == "merged" and MERGED_RAN_MESSAGE not in log:
        raise RuntimeError(f"lora_ops=merged but no step ran on a merged weight; see {engine.log_path}")
    compiled = "Warming up model for the compilation" in log
    if compiled != (not spec.enable_lora or (spec.lora_compile and spec.lora_ops != "stock")):
        raise RuntimeError(f"lora_compile={spec.lora_compile} but vLLM {'did' if compiled else 'did not'} compile; "
                           f"see {engine.log_path}")


def _throughput(results: list[LoadResult], workload: Workload) -> float:
    seconds = sum(r.seconds for r in results)
    if workload.unit == "tok":
        return sum(r.completion_tokens for r in results) / seconds
    return sum(r.requests - r.failures for r in results) / seconds


PROFILE_CATEGORIES = ["LoRA ops", "LoRA bookkeeping", "base layers", "attention", "sampling + structured output",
                      "scheduler + other"]
# (category, substrings of a frame's file) checked from the innermost frame outwards
_FRAME_RULES = [
    ("LoRA ops", ("serving/lora_ops.py", "lora/ops/torch_ops")),
    ("LoRA bookkeeping", ("punica_wrapper", "vllm/lora/", "serving/lora_merge.py", "serving/lora_compile.py")),
    ("attention", ("attention", "attn")),
    ("sampling + structured output", ("sample", "logits_processor", "structured_output", "xgrammar", "guidance")),
    ("base layers", ("model_executor/layers", "model_executor/models", "custom_op", "torchinductor",
                     "torch_compile_cache", "compilation/", "_inductor")),
]


def _profile(engine: EngineSupervisor, url: str, bodies: list[dict[str, Any]], concurrency: int,
             passes: int) -> dict[str, float]:
    """Sample vLLM's processes while `bodies` are answered; shares of busy samples per category."""
    assert engine.process is not None
    out = Path(tempfile.mkstemp(suffix=".txt")[1])
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    recorder = subprocess.Popen([spy, "record", "--pid", str(engine.process.pid), "--subprocesses", "--rate", "100",
                                 "--format", "raw", "--output", str(out), "--nonblocking"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)
    for _ in range(passes):
        asyncio.run(run_load(url, bodies, concurrency, headers=engine.spec.auth_headers))
    recorder.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT; SIGTERM kills it with nothing written
    recorder.wait(60)
    counts: Counter[str] = Counter()
    for line in out.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if count.isdigit():  # py-spy records only threads that are running, not idle ones
            counts[_category(stack)] += int(count)
    out.unlink(missing_ok=True)
    total = sum(counts.values())
    if total == 0:
        raise RuntimeError(f"py-spy recorded no samples of vLLM's processes (exit code {recorder.returncode}); "
                           "it needs permission to ptrace them")
    return {category: counts[category] / total for category in PROFILE_CATEGORIES}


def _category(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for category, needles in _FRAME_RULES:
            if any(needle in frame for needle in needles):
                return category
    return "scheduler + other"


def _ops_microbenchmark(quick: bool) -> Table:
    """vLLM's stock CPU LoRA ops vs the grouped ops on one 576-wide projection, r=8, one adapter."""
    from vllm.lora.ops.torch_ops import lora_ops as stock

    from tuneloop.serving import lora_ops as grouped

    rows: list[list[Any]] = []
    generator = torch.Generator().manual_seed(0)
    repeats = 2 if quick else 30
    for tokens, phase in ((32, "decode, 32 tokens"), (16 * 55, "prefill, 16 prompts x 55 tokens")):
        for name, low in (("float32", torch.float32), ("bf16 + float32 buffer", torch.bfloat16)):
            x = torch.randn(tokens, 576, generator=generator).to(low)
            weight = torch.randn(576, 576, generator=generator).to(low)
            a = torch.randn(1, 1, 8, 576, generator=generator).to(low)
            b = torch.randn(1, 1, 576, 8, generator=generator).to(low)
            index = torch.zeros(tokens, dtype=torch.long)
            timings: dict[str, list[float]] = {"base": [], "stock": [], "grouped": []}
            for i in range(repeats):
                order = ["stock", "grouped"] if i % 2 == 0 else ["grouped", "stock"]
                for which in ["base", *order]:
                    buffer = torch.zeros(tokens, 8, dtype=torch.float32)
                    y = torch.zeros(tokens, 576, dtype=low)
                    started = time.perf_counter()
                    if which == "base":
                        torch.mm(x, weight.t())
                    else:
                        ops = stock if which == "stock" else grouped
                        ops.bgmv_shrink(x, a, buffer, index, 1.0)
                        ops.bgmv_expand(buffer, b, y, index, True)
                    timings[which].append((time.perf_counter() - started) * 1e6)
            medians = {k: statistics.median(v) for k, v in timings.items()}
            rows.append([phase, name, f"{medians['base']:.0f}", f"{medians['stock']:.0f}",
                         f"{medians['grouped']:.0f}", f"{medians['stock'] / medians['grouped']:.1f}x",
                         str(grouped.compute_dtype(x, a, buffer)).removeprefix("torch.")])
    return emit("LoRA shrink + expand on one 576-wide projection (r=8), microseconds (median)",
                ["batch", "precision", "base projection GEMM", "vLLM stock ops", "grouped ops",
                 "stock / grouped", "grouped computes shrink in"], rows, key="lora-ops",
                notes="Runs alternate stock and grouped; the base GEMM is the layer LoRA rides on, for scale. bf16 "
                      "+ float32 buffer is how vLLM's CPU wrapper calls the ops in a bf16 model. This CPU "
                      + ("has" if cpu_has_fast_bf16() else "does not have") + " native bf16.")
