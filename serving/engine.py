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
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx

from tuneloop.errors import AdapterError, EngineUnavailable
from tuneloop.hardware import cpu_has_fast_bf16

log = logging.getLogger(__name__)

LORA_OPS_ENV = "TUNELOOP_LORA_OPS"  # read by serving/lora_ops.py inside vLLM's processes
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
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
    lora_target_modules: list[str] = field(default_factory=list)
    lora_modules: dict[str, Path] = field(default_factory=dict)
    kv_cache_gib: float = 2.0
    dtype: str = "auto"
    lora_ops: str = "grouped"
    enable_lora: bool = True

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def vllm_rank(rank: int) -> int:
    """The smallest rank vLLM accepts for --max-lora-rank that holds `rank`."""
    for allowed in VLLM_RANKS:
        if allowed >= rank:
            return allowed
    raise AdapterError(f"LoRA rank {rank} is above vLLM's largest supported rank {VLLM_RANKS[-1]}")


def build_command(spec: EngineSpec) -> list[str]:
    dtype = spec.dtype
    if dtype == "auto":
        dtype = "bfloat16" if cpu_has_fast_bf16() or _has_gpu() else "float32"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(spec.model_path),
               "--served-model-name", spec.served_name, "--host", spec.host, "--port", str(spec.port),
               "--max-model-len", str(spec.max_model_len), "--dtype", dtype, "--disable-uvicorn-access-log"]
    if not spec.enable_lora:
        return command
    command += ["--enable-lora", "--max-lora-rank", str(vllm_rank(spec.max_lora_rank)),
                "--max-loras", str(spec.max_loras)]
    if spec.lora_target_modules:
        command += ["--lora-target-modules", *spec.lora_target_modules]
    if spec.lora_modules:
        command += ["--lora-modules", *(f"{name}={path}" for name, path in spec.lora_modules.items())]
    return command


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM vLLM if the supervising process dies, even by SIGKILL."""
    import ctypes

    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _has_gpu() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


class EngineSupervisor:
    """Owns the vLLM process. Thread-safe; `state` and `restarts` are read by the gateway and the exporter."""

    def __init__(self, spec: EngineSpec, log_path: Path, *, start_timeout_s: float = 600.0,
                 restart: bool = True, max_backoff_s: float = 60.0) -> None:
        self.spec = spec
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
        self.loaded: dict[str, Path] = dict(spec.lora_modules)

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
            self.spec.lora_modules = dict(self.loaded)
            env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                   "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(self.spec.kv_cache_gib))),
                   "DO_NOT_TRACK": "1", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
                   LORA_OPS_ENV: self.spec.lora_ops}
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            command = build_command(self.spec)
            log.info("starting vLLM: %s", " ".join(command))
            self.state = "starting"
            with open(self.log_path, "ab") as handle:
                self.process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                                start_new_session=True, preexec_fn=_die_with_parent)

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

    def _terminate(self, timeout_s: float = 30.0) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 25) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                return "".join(line.decode("utf-8", "replace") for line in deque(handle, maxlen=lines))
        except OSError:
            return "(no log)"

    # adapters --------------------------------------------------------------------------------------------

    def load_adapter(self, name: str, path: Path) -> None:
        """Load an adapter into the running engine under `name` (idempotent)."""
        with self._lock:
            if name in self.loaded:
                return
            self._require_ready()
            response = httpx.post(f"{self.spec.base_url}/v1/load_lora_adapter",
                                  json={"lora_name": name, "lora_path": str(path)}, timeout=120.0)
            already = "has already been" in response.text  # loaded straight into vLLM, e.g. by an eval
            if response.status_code != 200 and not already:
                raise AdapterError(f"vLLM refused to load {name} from {path}: {response.text[:500]}")
            self.loaded[name] = path

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self.loaded:
                return
            self._require_ready()
            response = httpx.post(f"{self.spec.base_url}/v1/unload_lora_adapter", json={"lora_name": name},
                                  timeout=60.0)
            if response.status_code != 200:
                raise AdapterError(f"vLLM refused to unload {name}: {response.text[:500]}")
            del self.loaded[name]

    def _require_ready(self) -> None:
        if self.state != "ready":
            raise EngineUnavailable(f"vLLM is {self.state}; try again shortly")
