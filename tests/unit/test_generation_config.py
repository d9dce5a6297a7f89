"""--generation-config: the model's generation_config.json sampling fields become defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenmill.engine.generation_config import sampling_defaults
from tokenmill.errors import ModelLoadError


def model_dir(tmp_path: Path, config: dict | None) -> Path:
    directory = tmp_path / "model"
    directory.mkdir(parents=True)
    if config is not None:
        (directory / "generation_config.json").write_text(json.dumps(config))
    return directory


FILE = {
    "do_sample": True,  # not a sampling default (vLLM ignores it too)
    "temperature": 0.6,
    "top_p": 0.9,
    "top_k": 20,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "max_new_tokens": 64,
    "eos_token_id": [1, 2],
    "bos_token_id": 1,
}


def test_auto_reads_the_sampling_fields(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO"):
        defaults = sampling_defaults("auto", str(model_dir(tmp_path, FILE)))
    assert defaults == {
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "max_tokens": 64,
    }
    (line,) = [r.getMessage() for r in caplog.records if "sampling defaults" in r.getMessage()]
    assert "temperature=0.6" in line and "--generation-config vllm" in line


def test_vllm_ignores_the_file_and_auto_needs_none(tmp_path: Path) -> None:
    assert sampling_defaults("vllm", str(model_dir(tmp_path, FILE))) == {}
    assert sampling_defaults("auto", str(tmp_path / "x.gguf")) == {}  # a file: nothing beside
    assert sampling_defaults("auto", str(model_dir(tmp_path / "b", None))) == {}


def test_a_directory_given_is_read_and_must_hold_the_file(tmp_path: Path) -> None:
    other = model_dir(tmp_path, {"temperature": 0.2})
    assert sampling_defaults(str(other), "/elsewhere/model.gguf") == {"temperature": 0.2}
    with pytest.raises(ModelLoadError, match="no generation_config.json"):
        sampling_defaults(str(tmp_path / "empty"), "m.gguf")


def test_a_value_no_request_could_take_fails_the_load(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="temperature"):
        sampling_defaults("auto", str(model_dir(tmp_path, {"temperature": -1})))
    with pytest.raises(ModelLoadError, match="generation_config.json"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "generation_config.json").write_text("{not json")
        sampling_defaults("auto", str(tmp_path / "bad"))
