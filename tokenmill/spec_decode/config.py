"""--speculative-config: vLLM's JSON object, checked once at load."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenmill.errors import ModelLoadError

_NGRAM_NAMES = ("ngram", "[ngram]")
# vLLM keys that say how a draft model runs: refused until draft models are supported
_DRAFT_MODEL_KEYS = ("draft_tensor_parallel_size", "quantization", "revision", "code_revision")
_KEYS = {
    "method", "model", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
    "disable_by_batch_size", *_DRAFT_MODEL_KEYS,
}  # fmt: skip
_DEFAULT_LOOKUP = 5  # vLLM's prompt_lookup_min and _max when neither is given


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """N-gram (prompt lookup) speculation: up to `num_speculative_tokens` guesses a step,
    from the latest earlier occurrence of the sequence's last n tokens, n from
    `prompt_lookup_max` down to `prompt_lookup_min`."""

    num_speculative_tokens: int
    prompt_lookup_min: int = _DEFAULT_LOOKUP
    prompt_lookup_max: int = _DEFAULT_LOOKUP
    # no speculation in a step with more running requests than this (None: always)
    disable_by_batch_size: int | None = None
    method: str = "ngram"

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
        if method is None and model in _NGRAM_NAMES:
            method = "ngram"
        if method not in _NGRAM_NAMES:
            name = method or model or "(none)"
            raise ModelLoadError(
                f"speculative_config: method {name!r} is not supported; "
                'use {"method": "ngram", "num_speculative_tokens": K}'
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


def _positive(value: dict[str, Any], key: str) -> int | None:
    number = value.get(key)
    if number is None:
        return None
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ModelLoadError(
            f"speculative_config: {key} must be a positive integer, got {number!r}"
        )
    return number
