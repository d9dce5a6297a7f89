"""PoolingParams: what an embedding request asks of the pooled hidden states, and
PoolerConfig: how the model pools them (vLLM's names)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

PoolingType = Literal["LAST", "MEAN", "CLS"]
POOLING_TYPES: tuple[PoolingType, ...] = ("LAST", "MEAN", "CLS")


@dataclass(frozen=True, slots=True)
class PoolingParams:
    """One embedding request's options.

    dimensions: keep the first `dimensions` values (Matryoshka models only), before the
    vector is normalised. normalize: None takes the model's PoolerConfig.
    """

    dimensions: int | None = None
    normalize: bool | None = None
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: all that fit)

    def __post_init__(self) -> None:
        if self.dimensions is not None and self.dimensions < 1:
            raise ValueError(f"dimensions must be at least 1, got {self.dimensions}")
        keep = self.truncate_prompt_tokens
        if keep is not None and keep < 1 and keep != -1:  # (as SamplingParams checks it)
            raise ValueError(
                "truncate_prompt_tokens must be at least 1, or -1 for max_model_len, got "
                f"{self.truncate_prompt_tokens}"
            )


@dataclass(frozen=True, slots=True)
class PoolerConfig:
    """How a model turns its last hidden states into one vector per prompt.

    LAST: the last token's (decoder models' default); MEAN: the mean over the prompt;
    CLS: the first token's. normalize: scale to unit length (L2).
    """

    pooling_type: PoolingType = "LAST"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(
                f"pooling_type must be one of {', '.join(POOLING_TYPES)}, got {self.pooling_type!r}"
            )

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> PoolerConfig:
        """vLLM's --pooler-config JSON: {"pooling_type": "MEAN", "normalize": false}."""
        unknown = set(value) - {"pooling_type", "normalize"}
        if unknown:
            raise ValueError(
                f"pooler config: unknown keys {sorted(unknown)} (pooling_type, normalize)"
            )
        kind = str(value.get("pooling_type", "LAST")).upper()
        return cls(kind, bool(value.get("normalize", True)))  # type: ignore[arg-type]

    @classmethod
    def of_model(cls, model_dir: Path | None) -> PoolerConfig:
        """The sentence-transformers configuration of a model directory (modules.json with its
        Pooling module's config and a Normalize module), else LAST with normalisation, as
        vLLM pools a decoder model served for embeddings."""
        modules_file = model_dir / "modules.json" if model_dir is not None else None
        if modules_file is None or not modules_file.is_file():
            return cls()
        modules = json.loads(modules_file.read_text())
        kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules}
        pooling_type: PoolingType = "LAST"
        pooling = kinds.get("Pooling")
        if pooling is not None:
            config_file = model_dir / pooling.get("path", "") / "config.json"
            config = json.loads(config_file.read_text()) if config_file.is_file() else {}
            if config.get("pooling_mode_mean_tokens"):
                pooling_type = "MEAN"
            elif config.get("pooling_mode_cls_token"):
                pooling_type = "CLS"
        return cls(pooling_type, "Normalize" in kinds)
