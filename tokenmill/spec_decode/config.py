"""--speculative-config: vLLM's JSON object, checked once at load.

Two proposers: n-gram prompt lookup (`{"method": "ngram", ...}`), and a draft model
(`{"model": "path/of/a/smaller/model", "num_speculative_tokens": K}`, vLLM's
"draft_model" method): a smaller checkpoint with the same vocabulary, run beside the
target on the same KV blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenmill.errors import ModelLoadError

_NGRAM_NAMES = ("ngram", "[ngram]")
_DRAFT_MODEL = "draft_model"
# vLLM keys that say how a draft model runs
_DRAFT_MODEL_KEYS = ("draft_tensor_parallel_size", "quantization", "revision", "code_revision")
_NGRAM_KEYS = ("prompt_lookup_min", "prompt_lookup_max")
_KEYS = {
    "method", "model", "num_speculative_tokens", "disable_by_batch_size", *_NGRAM_KEYS,
    *_DRAFT_MODEL_KEYS,
}  # fmt: skip
_DEFAULT_LOOKUP = 5  # vLLM's prompt_lookup_min and _max when neither is given


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """Up to `num_speculative_tokens` guesses a step: with method "ngram", the continuation
    of the latest earlier occurrence of the sequence's last n tokens, n from
    `prompt_lookup_max` down to `prompt_lookup_min`; with "draft_model", the greedy tokens
    of the draft `model`."""

    num_speculative_tokens: int
    prompt_lookup_min: int = _DEFAULT_LOOKUP
    prompt_lookup_max: int = _DEFAULT_LOOKUP
    # no speculation in a step with more running requests than this (None: always)
    disable_by_batch_size: int | None = None
    method: str = "ngram"
    model: str | None = None  # the draft model's path ("draft_model")
    quantization: str | None = None  # the draft's, as --quantization (None: its default)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> SpeculativeConfig:
        """Check a --speculative-config object; ModelLoadError names what is wrong."""
        unknown = sorted(set(value) - _KEYS)
        if unknown:
            raise ModelLoadError(
                f"speculative_config: unknown keys {unknown}; known: {sorted(_KEYS)}"
            )
        method = value.get("method")
        model = value.get("model")
        if method is None:  # vLLM names the method by the model
            method = "ngram" if model in _NGRAM_NAMES else _DRAFT_MODEL if model else None
        if method == _DRAFT_MODEL:
            return cls._draft_model(value)
        if method not in _NGRAM_NAMES:
            raise ModelLoadError(
                f"speculative_config: method {method or '(none)'!r} is not supported; use "
                '{"method": "ngram", "num_speculative_tokens": K} or '
                '{"model": "path/of/a/draft/model", "num_speculative_tokens": K}'
            )
        if model not in (None, *_NGRAM_NAMES):
            raise ModelLoadError("speculative_config: ngram speculation takes no 'model'")
        draft_keys = [key for key in _DRAFT_MODEL_KEYS if key in value]
        if draft_keys:
            raise ModelLoadError(f"speculative_config: {draft_keys} apply to draft models only")
        k = _positive(value, "num_speculative_tokens")
        if k is None:
            raise ModelLoadError("speculative_config: num_speculative_tokens is required")
        low = _positive(value, "prompt_lookup_min")
        high = _positive(value, "prompt_lookup_max")
        if low is None and high is None:
            low = high = _DEFAULT_LOOKUP
        low = high if low is None else low
        high = low if high is None else high
        assert low is not None and high is not None
        if low > high:
            raise ModelLoadError(
                f"speculative_config: prompt_lookup_min {low} exceeds prompt_lookup_max {high}"
            )
        return cls(k, low, high, _positive(value, "disable_by_batch_size"))

    @classmethod
    def _draft_model(cls, value: dict[str, Any]) -> SpeculativeConfig:
        model = value.get("model")
        if not isinstance(model, str) or not model:
            raise ModelLoadError("speculative_config: method 'draft_model' needs a 'model' path")
        ngram_keys = [key for key in _NGRAM_KEYS if key in value]
        if ngram_keys:
            raise ModelLoadError(f"speculative_config: {ngram_keys} apply to ngram only")
        for key in ("revision", "code_revision"):
            if value.get(key) is not None:
                raise ModelLoadError(
                    f"speculative_config: {key} names a hub revision; give the draft model "
                    "as a local path"
                )
        tp = value.get("draft_tensor_parallel_size")
        if tp not in (None, 1):
            raise ModelLoadError(
                f"speculative_config: draft_tensor_parallel_size {tp!r} is not supported; "
                "the draft model runs on one worker (1)"
            )
        quantization = value.get("quantization")
        if quantization is not None and not isinstance(quantization, str):
            raise ModelLoadError(
                f"speculative_config: quantization must be a string, got {quantization!r}"
            )
        k = _positive(value, "num_speculative_tokens")
        if k is None:
            raise ModelLoadError("speculative_config: num_speculative_tokens is required")
        return cls(
            k, disable_by_batch_size=_positive(value, "disable_by_batch_size"),
            method=_DRAFT_MODEL, model=model, quantization=quantization,
        )  # fmt: skip

    @property
    def uses_draft_model(self) -> bool:
        return self.method == _DRAFT_MODEL


def _positive(value: dict[str, Any], key: str) -> int | None:
    number = value.get(key)
    if number is None:
        return None
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ModelLoadError(
            f"speculative_config: {key} must be a positive integer, got {number!r}"
        )
    return number
