"""The drift embedder's two backends: the int8 ONNX build against the fp32 torch forward it replaces by default.

Real models throughout (the MiniLM package's safetensors, ONNX Runtime); the int8 build is the session's shared one
(tests/conftest.py), one test builds its own to check rebuilding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tuneloop.config import parse_config
from tuneloop.errors import ConfigError
from tuneloop.monitor.embedding_onnx import MANIFEST_FILE, int8_model
from tuneloop.monitor.embeddings import (
    Embedder,
    EmbeddingCache,
    EmbeddingError,
    calibration_suffix,
    make_embedder,
    model_dir,
    space_of,
)

TEXTS = [
    "@united my flight was cancelled and nobody at the desk would help",
    "@SouthwestAir thanks for the smooth flight and the friendly crew!",
    "Self-driving cars will change how we commute, says the report",
    "Claritin is the only thing that gets me through allergy season",
    "Is Coachella worth it this year? The line-up looks thin",
    "@JetBlue lost my bag again. Third time this year.",
    "ok",
    "A much longer text about the weather, the traffic on the way to the airport, the queue at security, the delay "
    "announced at the gate and the long wait for a connection that was missed in the end anyway, as usual.",
]


@pytest.fixture(scope="module")
def torch_vectors() -> np.ndarray:
    return Embedder(None, backend="torch").embed(TEXTS)


def _linked(tmp_path: Path, embedding_model_dir: Path) -> Path:
    models = tmp_path / "models"
    models.mkdir()
    (models / embedding_model_dir.name).symlink_to(embedding_model_dir, target_is_directory=True)
    return models


def test_int8_vectors_are_unit_length_and_close_to_fp32(tmp_path: Path, embedding_model_dir: Path,
                                                         torch_vectors: np.ndarray) -> None:
    vectors = Embedder(None, backend="onnx-int8", models_dir=_linked(tmp_path, embedding_model_dir)).embed(TEXTS)
    assert vectors.shape == (len(TEXTS), 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    cosine = (vectors * torch_vectors).sum(axis=1)
    assert cosine.min() > 0.9 and cosine.mean() > 0.97, cosine
    # and they still say which texts are alike: each text is nearest to its own fp32 vector
    assert (np.argmax(vectors @ torch_vectors.T, axis=1) == np.arange(len(TEXTS))).all()


def test_two_workers_give_the_one_worker_vectors_in_input_order(tmp_path: Path, embedding_model_dir: Path) -> None:
    models = _linked(tmp_path, embedding_model_dir)
    texts = TEXTS * 5  # more batches than workers, lengths interleaved
    one = Embedder(None, backend="onnx-int8", models_dir=models, workers=1, batch_size=3).embed(texts)
    two = Embedder(None, backend="onnx-int8", models_dir=models, workers=2, batch_size=3).embed(texts)
    assert np.allclose(one, two, atol=1e-5)
    assert np.allclose(two[: len(TEXTS)], two[len(TEXTS): 2 * len(TEXTS)], atol=1e-5)


def test_backends_keep_separate_cache_tables_and_calibrations(tmp_path: Path, embedding_model_dir: Path) -> None:
    _linked(tmp_path, embedding_model_dir)
    onnx, torch = make_embedder("onnx-int8", tmp_path), make_embedder("torch", tmp_path)
    onnx.embed(TEXTS[:3])
    torch.embed(TEXTS[:3])
    assert onnx.embedded == 3 and torch.embedded == 3  # torch found nothing of onnx's: it embedded all three
    path = tmp_path / "cache" / "embeddings.sqlite"
    assert len(EmbeddingCache(path, space=space_of("onnx-int8"))) == 3
    assert len(EmbeddingCache(path, space=space_of("torch"))) == 3
    again = make_embedder("onnx-int8", tmp_path)
    again.embed(TEXTS[:3])
    assert again.embedded == 0  # served from its own table
    assert calibration_suffix("torch") == "" and calibration_suffix("onnx-int8").startswith(":onnx-int8-v")
    with pytest.raises(EmbeddingError, match="must not mix"):
        Embedder(EmbeddingCache(path, space=space_of("torch")), backend="onnx-int8", models_dir=tmp_path)
    with pytest.raises(EmbeddingError, match="unknown embedding backend 'fp8'"):
        Embedder(None, backend="fp8")  # type: ignore[arg-type]


def test_the_build_is_reused_and_rebuilt_when_its_recipe_or_file_changes(tmp_path: Path) -> None:
    models = tmp_path / "models"
    path = int8_model(model_dir(), models)
    manifest = json.loads((path.parent / MANIFEST_FILE).read_text())
    assert manifest["weights"].startswith("int8") and len(manifest["source_sha256"]) == 64
    built_at = path.stat().st_mtime_ns
    assert int8_model(model_dir(), models) == path and path.stat().st_mtime_ns == built_at  # reused
    (path.parent / MANIFEST_FILE).write_text(json.dumps({**manifest, "build_version": 0}))
    assert int8_model(model_dir(), models) == path and path.stat().st_mtime_ns != built_at  # older recipe: rebuilt
    rebuilt_at = path.stat().st_mtime_ns
    path.write_bytes(path.read_bytes()[: 1000])  # truncated model file
    assert int8_model(model_dir(), models) == path and path.stat().st_mtime_ns != rebuilt_at
    assert path.stat().st_size > 1_000_000
    assert not [p for p in models.iterdir() if p.name.startswith(".minilm-int8-")]  # no staging left behind
    shutil.rmtree(models)


def test_config_names_a_bad_backend(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="embedding_backend"):
        parse_config("monitor:\n  embedding_backend: int4\n", config_dir=tmp_path)
    assert parse_config("", config_dir=tmp_path).monitor.embedding_backend == "onnx-int8"
