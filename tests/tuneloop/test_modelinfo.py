"""Projection names read from the model: Llama, Qwen2, Phi-3 and GPT-NeoX name theirs differently, and a target
list written for one is refused on another with the model's real names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneloop.errors import BaseModelError, TrainingError
from tuneloop.modelinfo import CACHE_FILE, model_modules, resolve_targets

LLAMA_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _config_only(tmp_path: Path, architecture: str) -> Path:
    """A model folder with only its config.json: enough, since the model is built on meta."""
    from transformers import GPTNeoXConfig, Phi3Config, Qwen2Config

    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
             "vocab_size": 1000, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    config = {"qwen2": Qwen2Config, "phi3": Phi3Config, "gpt_neox": GPTNeoXConfig}[architecture](**sizes)
    folder = tmp_path / architecture
    config.save_pretrained(folder)
    return folder


def test_each_architecture_lists_its_own_projections(tmp_path: Path, base_model_dir: Path) -> None:
    llama = model_modules(base_model_dir)
    assert llama.architecture == "LlamaForCausalLM"
    assert list(llama.attention) == LLAMA_ATTENTION
    assert list(llama.linear) == [*LLAMA_ATTENTION, "gate_proj", "up_proj", "down_proj"]
    assert llama.has_chat_template
    qwen = model_modules(_config_only(tmp_path, "qwen2"))
    assert list(qwen.attention) == LLAMA_ATTENTION
    neox = model_modules(_config_only(tmp_path, "gpt_neox"))
    assert (neox.architecture, list(neox.attention)) == ("GPTNeoXForCausalLM", ["query_key_value", "dense"])
    assert list(neox.linear) == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    assert "embed_out" not in neox.linear, "the vocabulary head is not a LoRA target"
    phi = model_modules(_config_only(tmp_path, "phi3"))
    assert set(phi.attention) == {"qkv_proj", "o_proj"} and "gate_up_proj" in phi.linear
    assert not neox.has_chat_template


def test_llama_names_on_gpt_neox_are_refused_with_the_real_names(tmp_path: Path) -> None:
    neox = _config_only(tmp_path, "gpt_neox")
    with pytest.raises(TrainingError) as caught:
        resolve_targets(neox, ["q_proj", "dense"], where="tasks.t.train.target_modules")
    message = str(caught.value)
    assert message.startswith("tasks.t.train.target_modules: 'q_proj'")
    assert "GPTNeoXForCausalLM" in message and "query_key_value, dense, dense_h_to_4h, dense_4h_to_h" in message
    assert "'dense'" not in message.split("not in")[0], "only the unknown name is named as unknown"
    assert resolve_targets(neox, None, where="x") == ["query_key_value", "dense"]
    assert resolve_targets(neox, ["dense_h_to_4h"], where="x") == ["dense_h_to_4h"]
    phi = _config_only(tmp_path, "phi3")
    with pytest.raises(TrainingError, match=r"'q_proj' \(did you mean 'qkv_proj'\?\)"):
        resolve_targets(phi, LLAMA_ATTENTION, where="x")


def test_the_facts_are_cached_beside_the_model_and_rebuilt_when_its_config_changes(tmp_path: Path) -> None:
    folder = _config_only(tmp_path, "qwen2")
    model_modules(folder)
    cached = json.loads((folder / CACHE_FILE).read_text())
    assert cached["linear"][:4] == LLAMA_ATTENTION
    cached["linear"] = ["from_cache"]
    (folder / CACHE_FILE).write_text(json.dumps(cached))
    assert model_modules(folder).linear == ("from_cache",), "read from the cache while config.json is unchanged"
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 192
    (folder / "config.json").write_text(json.dumps(config))
    assert model_modules(folder).linear[0] == "q_proj", "a changed config.json is introspected again"


def test_a_folder_that_is_no_causal_lm_is_a_base_model_error(tmp_path: Path) -> None:
    with pytest.raises(BaseModelError, match="no readable config.json"):
        model_modules(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(BaseModelError, match="transformers cannot build a causal LM"):
        model_modules(tmp_path)
