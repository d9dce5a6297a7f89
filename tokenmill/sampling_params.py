"""SamplingParams: every sampling field, its default and its range check, in one place."""

from __future__ import annotations

import copy
import dataclasses
import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from tokenmill.errors import InvalidRequestError

if TYPE_CHECKING:  # tokenmill.structured pulls in torch; `import tokenmill` stays light
    from tokenmill.structured.spec import StructuredSpec

_GREEDY_EPSILON = 1e-5  # temperatures below this sample greedily, as in vLLM
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs: most top logprobs a request may ask for
# most token sequences bad_words may become (each word once or twice), as vLLM's
# VLLM_MAX_NUM_BAD_WORDS: the sampler checks each one every step
MAX_NUM_BAD_WORDS = 128

EarlyStopping = bool | Literal["never"]


class RequestOutputKind(enum.IntEnum):
    """What each RequestOutput of a request carries (vLLM's values)."""

    CUMULATIVE = 0  # everything so far: the text, ids and logprobs since the first token
    DELTA = 1  # what is new since the request's previous output (prompt logprobs once)
    FINAL_ONLY = 2  # one output, when the request finishes


def valid_truncation(truncate_prompt_tokens: int | None) -> bool:
    """vLLM's truncate_prompt_tokens values: None, at least 1, or -1 (max_model_len)."""
    keep = truncate_prompt_tokens
    return keep is None or keep >= 1 or keep == -1


def keep_last_tokens(
    prompt_token_ids: list[int], truncate_prompt_tokens: int | None, max_model_len: int
) -> list[int]:
    """The prompt's last truncate_prompt_tokens tokens (-1: max_model_len); None: all."""
    if truncate_prompt_tokens is None:
        return prompt_token_ids
    keep = max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens
    return prompt_token_ids[-keep:]


@dataclass(slots=True)
class SamplingParams:
    """How to pick each next token and when to stop; vLLM's names, defaults and semantics."""

    n: int = 1  # completions returned per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = -1  # -1 (or 0) = all tokens
    min_p: float = 0.0  # drop tokens below min_p * p(max token)
    presence_penalty: float = 0.0  # [-2, 2], subtracted once per token already generated
    frequency_penalty: float = 0.0  # [-2, 2], subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # > 0; divides positive logits of prompt+output tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added bias [-100, 100]
    seed: int | None = None  # per-request generator; same output whatever else is batched
    stop: list[str] = field(default_factory=list)  # stop strings, excluded from the output
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None = up to the context length
    min_tokens: int = 0  # EOS and stop ids are masked until this many tokens
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    best_of: int | None = None  # sequences generated; the n with the best cumulative logprob return
    logprobs: int | None = None  # top logprobs per output token (0 = the chosen token's only)
    prompt_logprobs: int | None = None  # top logprobs per prompt token
    allowed_token_ids: list[int] | None = None  # only these tokens may be generated
    # words never generated: a word's last token is banned wherever the output ends with the
    # rest of it; resolved to token sequences with the tokenizer (resolve_bad_words)
    bad_words: list[str] | None = None
    bad_words_token_ids: list[list[int]] | None = None  # internal: bad_words, tokenized
    # keep only the last k prompt tokens; -1: the last max_model_len (vLLM's)
    truncate_prompt_tokens: int | None = None
    use_beam_search: bool = False  # beam width = best_of (or n); returns the n best beams
    length_penalty: float = 1.0  # beam score = cumulative logprob / length ** length_penalty
    early_stopping: EarlyStopping = False  # beam search: True, False (heuristic) or "never"
    # the output must match this constraint (JSON schema, regex, choice, grammar); a dict is
    # read as vLLM's StructuredOutputsParams fields ({"json": schema}, {"regex": ...}, ...)
    structured_outputs: StructuredSpec | None = None
    # reasoning models: the most tokens a thought may take before its end marker is forced
    # (vLLM's thinking_token_budget); None = no limit
    thinking_token_budget: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    detokenize: bool = True  # False: token ids only (no text, no decoded_token in logprobs)
    extra_args: dict[str, Any] | None = None  # vLLM's, for plugins: tokenmill has none
    logits_processors: list[Any] | None = None  # only empty: tokenmill runs no such code
    guided_decoding: Any = None  # older vLLM's name of structured_outputs

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])  # (None, as vLLM takes it: none)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.seed == -1:  # vLLM's "no seed"
            self.seed = None
        if self.guided_decoding is not None:
            if self.structured_outputs is not None:
                raise InvalidRequestError(
                    "give structured_outputs or guided_decoding, not both", param="guided_decoding"
                )
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        if isinstance(self.structured_outputs, StructuredOutputsParams):
            self.structured_outputs = self.structured_outputs.spec()
        elif isinstance(self.structured_outputs, Mapping):
            self.structured_outputs = structured_spec(**self.structured_outputs)
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        if self.top_k == 0:
            self.top_k = -1
        if type(self.output_kind) is int and self.output_kind in iter(RequestOutputKind):
            self.output_kind = RequestOutputKind(self.output_kind)  # (vLLM's values)
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPSILON

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    @property
    def num_sequences(self) -> int:
        """Sequences generated for the request: best_of when set, else n."""
        return self.n if self.best_of is None else self.best_of

    def truncate_prompt(self, prompt_token_ids: list[int], max_model_len: int) -> list[int]:
        """The prompt as the engine runs it: its last truncate_prompt_tokens tokens, if set."""
        return keep_last_tokens(prompt_token_ids, self.truncate_prompt_tokens, max_model_len)

    def clone(self) -> SamplingParams:
        """A deep copy (vLLM's)."""
        return copy.deepcopy(self)

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first parameter out of range."""
        _check(self.detokenize or not self.stop, "detokenize", "stop strings need text: "
               "detokenize=False is only allowed without stop (stop_token_ids work)")  # fmt: skip
        _check(self.detokenize or not self.use_beam_search, "detokenize", "beam search "
               "ranks texts: detokenize=False is not supported with it")  # fmt: skip
        _check(not (self.use_beam_search and self.prompt_logprobs is not None),
               "prompt_logprobs", "prompt_logprobs are not supported with beam search")  # fmt: skip
        _check(not self.logits_processors, "logits_processors", "logits_processors are not "
               "supported: logit_bias, allowed_token_ids, bad_words and structured_outputs "
               "shape the logits instead")  # fmt: skip
        self._validate_sampling()
        self._validate_lengths()
        self._validate_outputs()
        self._validate_beam_search()

    def _validate_sampling(self) -> None:
        _check(
            _finite(self.temperature) and self.temperature >= 0,
            "temperature",
            f"temperature must be non-negative, got {self.temperature}",
        )
        _check(
            _finite(self.top_p) and 0 < self.top_p <= 1,
            "top_p",
            f"top_p must be in (0, 1], got {self.top_p}",
        )
        _check(
            self.top_k >= -1, "top_k", f"top_k must be -1 (disable) or at least 1, got {self.top_k}"
        )
        _check(
            _finite(self.min_p) and 0 <= self.min_p <= 1,
            "min_p",
            f"min_p must be in [0, 1], got {self.min_p}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(
                _finite(value) and -2 <= value <= 2, name, f"{name} must be in [-2, 2], got {value}"
            )
        _check(
            _finite(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            f"repetition_penalty must be greater than 0, got {self.repetition_penalty}",
        )
        for token_id, bias in self.logit_bias.items():
            _check(
                _finite(bias) and -100 <= bias <= 100,
                "logit_bias",
                f"logit_bias values must be in [-100, 100], got {bias} for token {token_id}",
            )
        _check(
            self.allowed_token_ids is None or len(self.allowed_token_ids) > 0,
            "allowed_token_ids",
            "allowed_token_ids must not be empty",
        )
        _check(
            all(isinstance(word, str) for word in self.bad_words or []),
            "bad_words",
            "bad_words must be a list of strings",
        )

    def _validate_lengths(self) -> None:
        _check(
            self.thinking_token_budget is None or self.thinking_token_budget >= 0,
            "thinking_token_budget",
            f"thinking_token_budget must be at least 0, got {self.thinking_token_budget}",
        )
        _check(
            self.max_tokens is None or self.max_tokens >= 0,
            "max_tokens",
            f"max_tokens must be at least 0, got {self.max_tokens}",
        )
        _check(
            self.min_tokens >= 0,
            "min_tokens",
            f"min_tokens must be at least 0, got {self.min_tokens}",
        )
        _check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
        )
        _check(
            all(isinstance(s, str) and s for s in self.stop),
            "stop",
            "stop must be a non-empty string or a list of non-empty strings",
        )
        _check(
            valid_truncation(self.truncate_prompt_tokens),
            "truncate_prompt_tokens",
            "truncate_prompt_tokens must be at least 1, or -1 for max_model_len, got "
            f"{self.truncate_prompt_tokens}",
        )

    def _validate_outputs(self) -> None:
        _check(self.n >= 1, "n", f"n must be at least 1, got {self.n}")
        _check(
            type(self.output_kind) is RequestOutputKind,
            "output_kind",
            f"output_kind must be a RequestOutputKind, got {self.output_kind!r}",
        )
        if self.best_of is not None:
            _check(
                self.best_of >= self.n,
                "best_of",
                f"best_of must be greater than or equal to n, got n={self.n} and "
                f"best_of={self.best_of}",
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or value >= 0, name, f"{name} must be non-negative, got {value}")

    def _validate_beam_search(self) -> None:
        _check(
            self.early_stopping in (True, False, "never"),
            "early_stopping",
            f"early_stopping must be true, false or 'never', got {self.early_stopping!r}",
        )
        _check(
            _finite(self.length_penalty),
            "length_penalty",
            f"length_penalty must be finite, got {self.length_penalty}",
        )
        if self.use_beam_search:
            spec = self.structured_outputs
            _check(
                spec is None,
                (spec and spec.param) or "use_beam_search",
                "beam search cannot be combined with structured outputs: the beams would need "
                "grammar state of their own; use n or best_of instead",
            )
            _check(
                not self.bad_words,
                "bad_words",
                "bad_words cannot be combined with beam search; use n or best_of instead",
            )
            return
        _check(
            self.early_stopping is False,
            "early_stopping",
            "early_stopping is not effective and must be false when not using beam search",
        )
        _check(
            abs(self.length_penalty - 1.0) < _GREEDY_EPSILON,
            "length_penalty",
            "length_penalty is not effective and must be the default value of 1.0 when not "
            "using beam search",
        )

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids named by the request must exist in the vocabulary."""
        named = (
            ("logit_bias", self.logit_bias),
            ("stop_token_ids", self.stop_token_ids),
            ("allowed_token_ids", self.allowed_token_ids or []),
            ("bad_words", [t for ids in self.bad_words_token_ids or [] for t in ids]),
        )
        for name, ids in named:
            bad = [t for t in ids if not 0 <= t < vocab_size]
            _check(
                not bad,
                name,
                f"{name} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}",
            )

    def resolve_bad_words(self, encode: Callable[..., list[int]]) -> SamplingParams:
        """These params with bad_words tokenized by `encode` (a tokenizer's encode), once per
        request; themselves when there is nothing to resolve."""
        if not self.bad_words or self.bad_words_token_ids is not None:
            return self
        ids = bad_words_token_ids(self.bad_words, encode)
        return dataclasses.replace(self, bad_words_token_ids=ids)

    def check_max_logprobs(self, max_logprobs: int = MAX_LOGPROBS) -> None:
        """The engine computes at most max_logprobs alternatives per position."""
        for name, kind in (("logprobs", "sample"), ("prompt_logprobs", "prompt")):
            value = getattr(self, name)
            _check(
                value is None or value <= max_logprobs,
                name,
                f"Requested {kind} logprobs of {value}, which is greater than max allowed: "
                f"{max_logprobs}",
            )


def bad_words_token_ids(words: list[str], encode: Callable[..., list[int]]) -> list[list[int]]:
    """The token sequences the sampler bans for `words`, as vLLM tokenizes them: each word
    without its leading whitespace, then with one space before it (a word inside the text),
    that variant kept only when it starts with another token and has as many tokens."""
    result: list[list[int]] = []
    for word in words:
        plain = encode(word.lstrip(), add_special_tokens=False)
        _check(bool(plain), "bad_words", f"bad_words entry {word!r} tokenizes to no tokens")
        result.append(plain)
        spaced = encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            result.append(spaced)
    _check(
        len(result) <= MAX_NUM_BAD_WORDS,
        "bad_words",
        f"bad_words became {len(result)} token sequences; the most allowed is {MAX_NUM_BAD_WORDS}",
    )
    return result


@dataclass(slots=True)
class BeamSearchParams:
    """vLLM's parameters of LLM.beam_search: `beam_width` beams, each up to `max_tokens`.
    Beams are scored by the model's raw logprobs (as vLLM's), whatever `temperature` says."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def sampling_params(self) -> SamplingParams:
        """The same search as SamplingParams(use_beam_search=True) runs it."""
        return SamplingParams(
            n=self.beam_width, use_beam_search=True, temperature=0.0,
            max_tokens=self.max_tokens, ignore_eos=self.ignore_eos,
            length_penalty=self.length_penalty,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )  # fmt: skip


@dataclass(slots=True)
class StructuredOutputsParams:
    """vLLM's StructuredOutputsParams (GuidedDecodingParams before): one constraint, for
    SamplingParams(structured_outputs=...)."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    backend: str | None = None
    whitespace_pattern: str | None = None
    disable_any_whitespace: bool = False
    disable_fallback: bool = False  # (tokenmill never falls back to another backend)

    def spec(self) -> StructuredSpec:
        options: dict[str, Any] = {
            name: value
            for name in ("json", "regex", "choice", "grammar", "json_object", "whitespace_pattern")
            if (value := getattr(self, name)) is not None
        }
        if self.disable_any_whitespace:
            options["disable_any_whitespace"] = True
        return structured_spec(self.backend, **options)


GuidedDecodingParams = StructuredOutputsParams  # older vLLM's name


def structured_spec(backend: str | None = None, **options: Any) -> StructuredSpec:
    """A constraint from vLLM's StructuredOutputsParams fields, for the offline API.

    structured_spec(json=schema), structured_spec(regex=r"\\d+"), structured_spec(choice=[...]),
    structured_spec(grammar="root ::= ...", backend="xgrammar"), structured_spec(json_object=True).
    """
    from tokenmill.structured.spec import spec_from_request_fields

    spec = spec_from_request_fields(structured_outputs=options, guided_decoding_backend=backend)
    if spec is None:
        raise InvalidRequestError(
            "structured_outputs names no constraint", param="structured_outputs"
        )
    return spec


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message, param=param)
