"""MiniLM as an int8 ONNX Runtime model, built once per data dir from the same safetensors as the torch path.

Why: a cold drift check is nearly all embedding, and on 2 CPU cores the fp32 torch forward ran ≈160 texts/s.
Dynamic int8 (weights quantized per channel at build time, activations per batch at run time) in ONNX Runtime,
run as one single-threaded session per core on alternate batches, is ≈3× that (bench drift_timing), while the
vectors stay within cosine ≈0.99 of the fp32 ones; the drift views are calibrated on the backend's own vectors
(the calibration key names the backend), and bench drift measures their false-alarm rate and power per backend.

Choices measured on an AVX512-BF16 CPU (2 cores, tweets of ≈28 tokens):
- the TorchScript exporter's graph, not the dynamo one: its MatMuls quantize cleanly (≈425 vs ≈300 texts/s);
- no ORT transformer fusions (`onnxruntime.transformers.optimizer`): fused Attention quantized no faster;
- one 1-thread session per core on alternate batches beat one 2-thread session (≈570 vs ≈450 texts/s): at these
  sizes the per-op thread hand-off costs more than it shares;
- 7-bit weights (`reduce_range`): AVX2 CPUs without VNNI multiply u8×s8 pairs into int16 and can saturate with
  8-bit weights; with 7 bits they cannot, so one model file gives the same vectors' quality on every CPU kind, at
  a cost of 0.0015 in mean cosine to fp32 on the CPU where both were measured.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from tuneloop.checksums import file_sha256

# Bumped whenever the exported graph or the quantization settings change: a model built by an older recipe is rebuilt.
BUILD_VERSION = 1
MODEL_FILE = "minilm-int8.onnx"
MANIFEST_FILE = "manifest.json"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class OnnxBuildError(Exception):
    """Exporting or quantizing the embedding model failed (wrapped as EmbeddingError by the caller)."""


def _manifest(source_dir: Path) -> dict[str, Any]:
    import onnxruntime

    return {"build_version": BUILD_VERSION, "source_sha256": file_sha256(source_dir / "model.safetensors"),
            "onnxruntime": onnxruntime.__version__, "weights": "int8 per channel, 7-bit (reduce_range)",
            "activations": "uint8, dynamic per batch"}


def int8_model(source_dir: Path, models_dir: Path, *, log: Callable[[str], None] = lambda _: None) -> Path:
    """The int8 model's path under `models_dir`, built first when missing or built from another source or recipe.

    Two processes (the conductor and a CLI command) may ask at once: a file lock makes the second wait for the
    first's build, and the model is written to a temporary folder and renamed, so a crash leaves no half file."""
    target = models_dir / "minilm-int8"
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / ".minilm-int8.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        wanted = _manifest(source_dir)
        if _is_current(target, wanted):
            return target / MODEL_FILE
        log(f"building the int8 ONNX embedding model in {target} (once per data dir, ~10 s)")
        staging = Path(tempfile.mkdtemp(prefix=".minilm-int8-", dir=models_dir))
        try:
            _export_and_quantize(source_dir, staging)
            built = {**wanted, "model_sha256": file_sha256(staging / MODEL_FILE)}
            (staging / MANIFEST_FILE).write_text(json.dumps(built, indent=2) + "\n")
            if target.is_symlink():  # a shared build linked in (the test suite does this); leave its target be
                target.unlink()
            elif target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        except Exception as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, OnnxBuildError):
                raise
            raise OnnxBuildError(f"cannot build the int8 ONNX embedding model from {source_dir}: {exc}") from exc
        return target / MODEL_FILE


def _is_current(target: Path, wanted: dict[str, Any]) -> bool:
    """Built from this source by this recipe, and the model file is the one written then (a truncated or edited
    file is rebuilt: it is a derived artifact, rebuilt from the package's weights, never user data)."""
    try:
        manifest = json.loads((target / MANIFEST_FILE).read_text())
        model_sha = manifest.pop("model_sha256", None)
        return bool(manifest == wanted and model_sha == file_sha256(target / MODEL_FILE))
    except (OSError, ValueError, AttributeError):
        return False


def _export_and_quantize(source_dir: Path, out_dir: Path) -> None:
    import warnings

    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source_dir, local_files_only=True)
    model = AutoModel.from_pretrained(source_dir, local_files_only=True, dtype=torch.float32).eval()
    example = tokenizer(["an example text", "a second, longer example text"], padding=True, return_tensors="pt")
    fp32_path = out_dir / "minilm-fp32.onnx"
    axes = {name: {0: "batch", 1: "tokens"} for name in INPUT_NAMES}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(_pooled_module(model), tuple(example[n] for n in INPUT_NAMES), str(fp32_path), dynamo=False,
                          input_names=list(INPUT_NAMES), output_names=["embedding"],
                          dynamic_axes={**axes, "embedding": {0: "batch"}}, opset_version=17)
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # the quantizer logs a line per tensor on the root logger
    try:
        quantize_dynamic(str(fp32_path), str(out_dir / MODEL_FILE), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=True, extra_options={"DefaultTensorType": 1})  # 1 = FLOAT, for untyped outputs
    finally:
        root.setLevel(level)
    fp32_path.unlink()


def _pooled_module(model: Any) -> Any:
    import torch

    class Pooled(torch.nn.Module):
        """Mean pooling over real tokens and L2 normalisation inside the graph, as the torch path does."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return Pooled()



class OnnxMiniLM:
    """One single-threaded ONNX Runtime session per worker; batch i goes to worker i mod workers."""

    def __init__(self, path: Path, *, workers: int) -> None:
        import onnxruntime as ort

        self.workers = max(1, workers)
        self._sessions = []
        for _ in range(self.workers):
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            self._sessions.append(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))

    def encode(self, batches: Sequence[list[str]], tokenizers: Sequence[Callable[[list[str]], Mapping[str, Any]]],
               on_batch: Callable[[int], None]) -> list[np.ndarray]:
        """Each batch's (n, 384) vectors, in order; `on_batch(n)` after each (from worker threads).

        Each worker tokenizes its own batches, so one worker's tokenizing overlaps the other's inference; with its
        own tokenizer, since a Hugging Face fast tokenizer called from two threads at once can fail ("Already
        borrowed") when it sets its padding and truncation."""
        if len(tokenizers) < self.workers:
            raise ValueError(f"{self.workers} workers need as many tokenizers, got {len(tokenizers)}")
        results: list[np.ndarray | None] = [None] * len(batches)

        def work(worker: int) -> None:
            session = self._sessions[worker]
            for i in range(worker, len(batches), self.workers):
                encoded = tokenizers[worker](batches[i])
                feed = {name: np.asarray(encoded[name], dtype=np.int64) for name in INPUT_NAMES}
                results[i] = session.run(None, feed)[0]
                on_batch(len(batches[i]))

        with ThreadPoolExecutor(self.workers, thread_name_prefix="embed") as pool:
            for future in [pool.submit(work, w) for w in range(self.workers)]:
                future.result()
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]


def default_workers() -> int:
    """One per core this process may run on (ONNX Runtime releases the GIL while it computes)."""
    return max(1, len(os.sched_getaffinity(0)))
