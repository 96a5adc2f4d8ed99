"""The vLLM engine supervisor: start, wait for readiness, restart on death, load/unload adapters, stop.

vLLM runs as a child process (`python -m vllm.entrypoints.openai.api_server`) in its own process group on
127.0.0.1. Its LoRA flags are derived from the adapters actually served: vLLM pads every adapter to
`--max-lora-rank` and computes every module in `--lora-target-modules`, so a generous default costs throughput
(DESIGN.md measured 0.28x base with defaults vs 0.60x with matching flags on CPU).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal, Protocol

import httpx

from tuneloop.errors import AdapterError, EngineUnavailable
from tuneloop.hardware import cpu_has_fast_bf16, usable_cpu_cores
from tuneloop.processes import live_members
from tuneloop.serving.engine_client import EngineClient, EngineLimits

log = logging.getLogger(__name__)

LORA_OPS_ENV = "TUNELOOP_LORA_OPS"  # read by serving/lora_ops.py inside vLLM's processes
COMPILE_ENV = "TUNELOOP_LORA_COMPILE"  # read by serving/vllm_plugin.py: serving/lora_compile.py
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
RESERVED_CORES_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"
EngineState = Literal["stopped", "starting", "ready", "restarting", "failed"]


@dataclass
class EngineSpec:
    """Everything the vLLM command line is built from."""

    model_path: Path
    served_name: str
    host: str = "127.0.0.1"
    port: int = 8401
    max_model_len: int = 1024
    max_lora_rank: int = 8
    max_loras: int = 4
    max_cpu_loras: int | None = field(default=None, metadata={
        "help": "Adapters vLLM keeps loaded in memory (LRU; at least max_loras); None: vLLM's default, max_loras."})
    lora_target_modules: list[str] = field(default_factory=list)
    lora_modules: dict[str, Path] = field(default_factory=dict)
    kv_cache_gib: float = 2.0
    cpu_reserved_cores: int | None = None  # None: engine_env decides
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    lora_ops: Literal["merged", "grouped", "stock"] = "grouped"
    lora_compile: bool = field(default=False, metadata={
        "help": "Keep vLLM's torch.compile on in a LoRA engine, each LoRA layer one opaque op "
                "(serving/lora_compile.py)."})
    enable_lora: bool = True
    prefix_caching: bool | None = field(default=None, metadata={"help": "None: vLLM's default."})
    base_sha256: str = field(default="", metadata={"help": "Checksum of the base model; adapters must match."})
    api_key: str | None = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False, metadata={
        "help": "vLLM's own key (VLLM_API_KEY): only the gateway and its engine client, which hold it, reach vLLM's "
                "/v1 routes, runtime adapter loading included. None: an open engine (nothing in tuneloop does this)."})

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def resolved_dtype(self) -> str:
        """The dtype vLLM runs in: bf16 only where the CPU multiplies bf16 natively (or on a GPU)."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if cpu_has_fast_bf16() or _has_gpu() else "float32"

    @property
    def limits(self) -> EngineLimits:
        return EngineLimits(self.base_sha256, vllm_rank(self.max_lora_rank) if self.enable_lora else 0,
                            tuple(self.lora_target_modules))


# What vLLM may inherit from the gateway's environment: how to find programs and libraries, locale and temp dirs,
# and the knobs of vLLM, torch, OpenMP, the math libraries and the accelerator. Not the admin token, the database
# URL or anything else tuneloop or the operator keeps there.
INHERITED = {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "LD_LIBRARY_PATH", "LD_PRELOAD",
             "PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "VIRTUAL_ENV", "XDG_CACHE_HOME",
             "OMP_NUM_THREADS", "HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_HUB_OFFLINE",
             "TRANSFORMERS_OFFLINE"}
INHERITED_PREFIXES = ("LC_", "VLLM_", "TORCH", "OMP_", "KMP_", "MKL_", "OPENBLAS_", "CUDA_", "NVIDIA_", "NCCL_",
                      "TRITON_", "ONEDNN_", "DNNL_")


def inherited_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in INHERITED or k.startswith(INHERITED_PREFIXES)}


def engine_env(spec: EngineSpec) -> dict[str, str]:
    """vLLM's environment: ours on top of the caller's.

    vLLM's CPU backend keeps one core per worker free for its scheduler, which on a 2-core machine halves the
    compute for a process that mostly waits; there, unless the spec or the operator's environment says otherwise,
    it keeps none."""
    env = {**inherited_environment(), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
           "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(spec.kv_cache_gib))),
           "DO_NOT_TRACK": "1", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1", LORA_OPS_ENV: spec.lora_ops}
    if spec.enable_lora and spec.lora_compile and spec.lora_ops != "stock":
        env[COMPILE_ENV] = "1"
    if spec.api_key:
        env["VLLM_API_KEY"] = spec.api_key  # the environment, not the command line, which every user can read
    if spec.cpu_reserved_cores is not None:
        env[RESERVED_CORES_ENV] = str(spec.cpu_reserved_cores)
    elif RESERVED_CORES_ENV not in os.environ and usable_cpu_cores() <= 2:
        env[RESERVED_CORES_ENV] = "0"
    return env


def vllm_rank(rank: int) -> int:
    """The smallest rank vLLM accepts for --max-lora-rank that holds `rank`."""
    for allowed in VLLM_RANKS:
        if allowed >= rank:
            return allowed
    raise AdapterError(f"LoRA rank {rank} is above vLLM's largest supported rank {VLLM_RANKS[-1]}")


def build_command(spec: EngineSpec) -> list[str]:
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(spec.model_path),
               "--served-model-name", spec.served_name, "--host", spec.host, "--port", str(spec.port),
               "--max-model-len", str(spec.max_model_len), "--dtype", spec.resolved_dtype,
               "--disable-uvicorn-access-log"]
    if spec.prefix_caching is not None:
        command.append("--enable-prefix-caching" if spec.prefix_caching else "--no-enable-prefix-caching")
    if not spec.enable_lora:
        return command
    command += ["--enable-lora", "--max-lora-rank", str(vllm_rank(spec.max_lora_rank)),
                "--max-loras", str(spec.max_loras)]
    if spec.max_cpu_loras is not None:
        command += ["--max-cpu-loras", str(max(spec.max_cpu_loras, spec.max_loras))]
    if spec.lora_target_modules:
        command += ["--lora-target-modules", *spec.lora_target_modules]
    if spec.lora_modules:
        command += ["--lora-modules", *(f"{name}={path}" for name, path in spec.lora_modules.items())]
    return command


def process_group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in a process group, from /proc."""
    return live_members(group=pgid)


def end_process_group(pgid: int, timeout_s: float, *, leader: subprocess.Popen[bytes] | None = None,
                      after_leader_s: float = 3.0) -> None:
    """SIGTERM every process of the group and SIGKILL what is left; returns once none is alive.

    The leader (vLLM's API server) gets `timeout_s` for its orderly shutdown, which stops its children; once it
    has exited, whatever of the group is left gets `after_leader_s` more (an orphaned EngineCore does not
    necessarily act on SIGTERM, and waiting the whole timeout for it would only delay every stop and restart)."""
    def members() -> list[int]:
        return process_group_members(pgid)

    def send(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signum)

    if not members():
        return
    send(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    leader_gone_at: float | None = None
    while members() and time.monotonic() < deadline:
        if leader_gone_at is None and (leader is None or leader.poll() is not None):
            leader_gone_at = time.monotonic()
            deadline = min(deadline, leader_gone_at + after_leader_s)
        time.sleep(0.1)
    if members():
        send(signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        while members() and time.monotonic() < deadline:
            time.sleep(0.1)
    if members():
        log.error("processes %s of the engine's group survived SIGKILL", members())


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM vLLM if the supervising process dies, even by SIGKILL."""
    import ctypes

    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@cache
def _has_gpu() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


class EngineSupervisor:
    """Owns the vLLM process. Thread-safe; `state` and `restarts` are read by the gateway and the exporter.

    Adapters go in and out through `client` (the one engine client); after a restart the engine is started with
    every adapter the client holds.
    """

    def __init__(self, spec: EngineSpec, log_path: Path, *, start_timeout_s: float = 600.0,
                 restart: bool = True, max_backoff_s: float = 60.0, guarded: bool = False) -> None:
        """`guarded`: a detached serving/engine_guard.py ends vLLM's whole group when this process is gone, even
        by SIGKILL (an engine replica: Ray kills dead actors' children with SIGKILL, orphaning vLLM's own)."""
        self.spec = spec
        self.guarded = guarded
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.restart_enabled = restart
        self.max_backoff_s = max_backoff_s
        self.state: EngineState = "stopped"
        self.restarts = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self.client = EngineClient(spec.base_url, spec.limits, ready=lambda: self.state == "ready",
                                   headers=spec.auth_headers)
        for name, path in spec.lora_modules.items():
            self.client.adopt(name, path)

    @property
    def base_url(self) -> str:
        return self.spec.base_url

    @property
    def auth_headers(self) -> dict[str, str]:
        return self.spec.auth_headers

    # lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start vLLM and block until it answers, or raise EngineUnavailable with the log's tail."""
        self._stopping.clear()
        self._launch()
        self._wait_ready()
        if self._watcher is None or not self._watcher.is_alive():
            self._watcher = threading.Thread(target=self._watch, name="engine-watch", daemon=True)
            self._watcher.start()

    def _launch(self) -> None:
        with self._lock:
            self.spec.lora_modules = dict(self.client.loaded)
            env = engine_env(self.spec)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            command = build_command(self.spec)
            log.info("starting vLLM: %s", " ".join(command))
            self.state = "starting"
            with open(self.log_path, "ab") as handle:
                self.process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                                start_new_session=True, preexec_fn=_die_with_parent)
            if self.guarded:
                # Detaches itself (serving/engine_guard.py); this wait is for its first fork, which returns at once.
                subprocess.run([sys.executable, "-m", "tuneloop.serving.engine_guard", str(os.getpid()),
                                str(self.process.pid)], check=True, timeout=60)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            process = self.process
            if process is None or process.poll() is not None:
                self.state = "failed"
                raise EngineUnavailable(f"vLLM exited with code {process.returncode if process else None} while "
                                        f"starting; last lines of {self.log_path}:\n{self.log_tail()}")
            if self.healthy():
                self.state = "ready"
                log.info("vLLM ready on %s", self.spec.base_url)
                return
            time.sleep(1.0)
        self.state = "failed"
        self._terminate()
        raise EngineUnavailable(f"vLLM did not become ready within {self.start_timeout_s:.0f} s; last lines of "
                                f"{self.log_path}:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.spec.base_url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _watch(self) -> None:
        """Restart vLLM with exponential backoff whenever it dies unasked."""
        backoff = 1.0
        while not self._stopping.is_set():
            process = self.process
            if process is not None and process.poll() is not None and not self._stopping.is_set():
                log.error("vLLM exited with code %s; restarting in %.0f s", process.returncode, backoff)
                self.state = "restarting"
                if not self.restart_enabled:
                    self.state = "failed"
                    return
                self._terminate(timeout_s=10.0)  # the dead API server's children, before a second engine starts
                if self._stopping.wait(backoff):
                    return
                self.restarts += 1
                try:
                    self._launch()
                    self._wait_ready()
                    backoff = 1.0
                except EngineUnavailable as exc:
                    log.error("vLLM restart failed: %s", exc)
                    self.state = "restarting"
                    backoff = min(backoff * 2, self.max_backoff_s)
                continue
            self._stopping.wait(0.5)

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping.set()
        self._terminate(timeout_s)
        self.state = "stopped"

    def started_message(self, text: str) -> bool:
        """Whether vLLM's log says `text` (e.g. that a plugin installed itself in the engine process)."""
        return text in self.log_path.read_text(errors="replace") if self.log_path.exists() else False

    def _terminate(self, timeout_s: float = 30.0) -> None:
        """End the engine's whole process group, not only its API server: when the API server dies (the OOM
        killer, SIGKILL) its EngineCore and Worker children are orphaned and keep their memory and cores, so a
        restart would run two engines side by side. vLLM's processes share the group `start_new_session` gave the
        API server, which outlives the leader."""
        process = self.process
        if process is None:
            return
        end_process_group(process.pid, timeout_s, leader=process)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)

    def log_tail(self, lines: int = 25) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                return "".join(line.decode("utf-8", "replace") for line in deque(handle, maxlen=lines))
        except OSError:
            return "(no log)"


class ServingEngine(Protocol):
    """What the gateway needs of an engine: its state, its restarts, where it listens and its adapter client.
    `EngineSupervisor` is one; fast tests give a stand-in in front of a stub vLLM."""

    state: EngineState
    restarts: int

    @property
    def client(self) -> EngineClient: ...

    @property
    def base_url(self) -> str: ...

    @property
    def auth_headers(self) -> dict[str, str]: ...
