"""How embeddings pool: the model's sentence-transformers config, --pooler-config, and the
vLLM flags that choose a pooling runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenmill.pooling_params import PoolerConfig, PoolingParams
from tokenmill.server.cli import build_parser
from tokenmill.server.vllm_flags import RefusedFlag, check_vllm_flags


def _modules(directory: Path, pooling_config: dict[str, bool] | None, normalize: bool) -> Path:
    modules = [{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"}]
    if pooling_config is not None:
        modules.append(
            {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
        )
        (directory / "1_Pooling").mkdir()
        (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config))
    if normalize:
        modules.append(
            {"idx": 2, "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    (directory / "modules.json").write_text(json.dumps(modules))
    return directory


def test_without_sentence_transformers_config_decoder_models_pool_the_last_token():
    assert PoolerConfig.of_model(None) == PoolerConfig("LAST", True)


@pytest.mark.parametrize(
    ("pooling", "normalize", "expected"),
    [
        ({"pooling_mode_mean_tokens": True}, True, PoolerConfig("MEAN", True)),
        ({"pooling_mode_cls_token": True}, False, PoolerConfig("CLS", False)),
        ({"pooling_mode_lasttoken": True}, True, PoolerConfig("LAST", True)),
        (None, False, PoolerConfig("LAST", False)),
    ],
)
def test_sentence_transformers_modules(tmp_path, pooling, normalize, expected):
    assert PoolerConfig.of_model(_modules(tmp_path, pooling, normalize)) == expected


def test_pooler_config_json():
    assert PoolerConfig.from_dict({"pooling_type": "mean"}) == PoolerConfig("MEAN", True)
    assert PoolerConfig.from_dict({"normalize": False}) == PoolerConfig("LAST", False)
    with pytest.raises(ValueError, match="pooling_type must be one of"):
        PoolerConfig.from_dict({"pooling_type": "MAX"})
    with pytest.raises(ValueError, match="unknown keys"):
        PoolerConfig.from_dict({"pooling": "MEAN"})


def test_pooling_params_ranges():
    with pytest.raises(ValueError, match="dimensions"):
        PoolingParams(dimensions=0)
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        PoolingParams(truncate_prompt_tokens=0)
    assert PoolingParams(truncate_prompt_tokens=-1).truncate_prompt_tokens == -1  # vLLM's "all"


def test_vllm_pooling_flags():
    parser = build_parser()
    args = parser.parse_args(
        ["serve", "--runner", "pooling", "--convert", "embed", "--task", "embed",
         "--pooler-config", '{"pooling_type": "MEAN", "normalize": false}']
    )  # fmt: skip
    assert check_vllm_flags(args) == []  # both served: nothing to warn about
    assert args.pooler_config == {"pooling_type": "MEAN", "normalize": False}
    for flag, value in [("--convert", "classify"), ("--task", "score"), ("--runner", "draft")]:
        with pytest.raises(RefusedFlag, match="--" + flag.lstrip("-")):
            check_vllm_flags(parser.parse_args(["serve", flag, value]))
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--pooler-config", "[1]"])
