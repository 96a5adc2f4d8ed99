from __future__ import annotations

from pathlib import Path

import pytest

from tuneloop.config import Config, load_config, parse_config, render_default_config
from tuneloop.errors import ConfigError


def test_default_config_renders_with_comments_and_round_trips() -> None:
    text = render_default_config()
    assert "# LoRA rank r" in text
    parsed = parse_config(text)
    assert parsed.model_dump(exclude={"config_dir"}) == Config().model_dump(exclude={"config_dir"})
    assert set(parsed.tasks) == {"sentiment", "chat"}


def test_every_problem_is_reported_at_once_with_key_paths() -> None:
    text = "no_such_key: 1\nserving:\n  gateway_port: -1\n  gatway_host: x\ntasks:\n  sentiment:\n    train:\n" \
           "      batch_size: many\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="t.yaml")
    problems = caught.value.problems
    assert len(problems) == 4
    message = str(caught.value)
    assert "no_such_key: unknown key 'no_such_key'" in message
    assert "serving.gateway_port" in message and "greater than or equal to 1" in message
    assert "did you mean 'gateway_host'" in message
    assert "tasks.sentiment.train.batch_size" in message and "'many'" in message


def test_lora_rank_above_serving_max_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"rank 16 exceeds serving.max_lora_rank 8"):
        parse_config("tasks:\n  sentiment:\n    train:\n      rank: 16\n")


def test_lora_targets_are_module_names_and_the_model_decides_which_exist() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("tasks:\n  sentiment:\n    train:\n      target_modules: [q proj]\n")
    message = str(caught.value)
    assert "tasks.sentiment.train.target_modules" in message and "'q proj'" in message and "not module names" in message
    with pytest.raises(ConfigError, match="repeat"):
        parse_config("tasks:\n  sentiment:\n    train:\n      target_modules: [q_proj, q_proj]\n")
    # a name no Llama has is the model's business (tests/tuneloop/test_modelinfo.py), not the file's
    config = parse_config("tasks:\n  sentiment:\n    train:\n      target_modules: [query_key_value]\n")
    assert config.tasks["sentiment"].train.target_modules == ["query_key_value"]
    assert Config().tasks["sentiment"].train.target_modules is None, "default: the model's attention projections"


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "tuneloop.yaml"
    path.write_text("serving:\n  gateway_port: [1\n")
    with pytest.raises(ConfigError, match=r"line \d+, column \d+"):
        load_config(path)


def test_non_utf8_config_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tuneloop.yaml"
    path.write_bytes(b"data_dir: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_partial_task_override_keeps_the_embedded_defaults(tmp_path: Path) -> None:
    config = parse_config("tasks:\n  sentiment:\n    train:\n      max_steps: 7\n", config_dir=tmp_path)
    assert config.tasks["sentiment"].train.max_steps == 7
    assert config.tasks["sentiment"].labels == ["negative", "neutral", "positive"]
    assert "chat" not in config.tasks


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_relative_data_dir_resolves_against_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "tuneloop.yaml"
    path.parent.mkdir()
    path.write_text("data_dir: state\n")
    assert load_config(path).data_path == (tmp_path / "sub" / "state").resolve()


def test_admin_token_env_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config("serving:\n  admin_token: from-file\n")
    assert config.admin_token == "from-file"
    monkeypatch.setenv("TUNELOOP_ADMIN_TOKEN", "from-env")
    assert config.admin_token == "from-env"
