"""vLLM's engine options that tokenmill has no option of its own for, as `vllm serve` flags
and as `LLM(...)` keyword arguments: each works as in vLLM (with the values that mean the
same here), is ignored with one warning saying why it has no effect here, or is refused
with a message saying what tokenmill does instead. Never a silent difference, never a bare
"unrecognized arguments" or "unexpected keyword argument".

The table is docs/server.md's "vLLM flags" section; server/vllm_flags.py registers it on
the command line, check_vllm_options applies it to LLM(...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Kind = Literal["ignore", "refuse"]  # what a value outside `works` gets

_NO_DOWNLOADS = (
    "tokenmill downloads nothing: it serves local directories, .gguf files and models "
    "already in the local Hugging Face cache"
)
_NO_COMPILE = (
    "tokenmill compiles nothing with torch.compile; CUDA graphs follow --enforce-eager and "
    "--cuda-graph-sizes"
)
_NO_LORA = (
    "LoRA adapters are not supported; merge the adapter into the weights (peft's "
    "merge_and_unload) and serve the merged directory"
)
_BOTH_SERVED = (
    "one tokenmill server both generates and embeds (/v1/embeddings, /pooling): "
    "--runner is auto, generate or pooling"
)
_EMBED_ONLY = (
    "tokenmill's pooling serves embeddings (/v1/embeddings, /pooling) beside generation; "
    "classification, scoring and reward models are not supported"
)
_SCHEDULER = "tokenmill's scheduler chunks every prefill within --max-num-batched-tokens"
_OWN_TOKENIZER = "tokenmill uses the tokenizer in the model's directory or GGUF file"


@dataclass(frozen=True, slots=True)
class VllmFlag:
    names: tuple[str, ...]  # the first is the canonical one
    kind: Kind
    reason: str
    takes_value: bool = True
    works: Callable[[Any], bool] | None = None  # values that behave as in vLLM: no message
    boolean_optional: bool = False  # --flag / --no-flag

    @property
    def dest(self) -> str:
        return "vllm_" + self.names[0].lstrip("-").replace("-", "_").replace(".", "_")


def _is(*values: object) -> Callable[[Any], bool]:
    return lambda value: value in values or str(value) in {str(v) for v in values}


VLLM_FLAGS: tuple[VllmFlag, ...] = (
    # accepted with the meaning they have in vLLM where tokenmill does the same
    # `tokenmill serve` reads it (no stats line); LLM(...) logs none, as vLLM's by default
    VllmFlag(("--disable-log-stats",), "ignore", "LLM(...) logs no periodic stats",
             takes_value=False, works=_is(True)),
    VllmFlag(("--enable-log-requests",), "ignore", "a line per request is tokenmill's default",
             takes_value=False, works=_is(True)),
    VllmFlag(("--enable-chunked-prefill",), "ignore", _SCHEDULER, takes_value=False,
             works=_is(True), boolean_optional=True),
    VllmFlag(("--runner",), "refuse", _BOTH_SERVED, works=_is("auto", "generate", "pooling")),
    VllmFlag(("--convert",), "refuse", _EMBED_ONLY, works=_is("auto", "none", "embed")),
    VllmFlag(("--task",), "refuse", _EMBED_ONLY,
             works=_is("auto", "generate", "embed", "embedding")),
    VllmFlag(("--load-format",), "refuse",
             "tokenmill reads safetensors directories and .gguf files as they are",
             works=_is("auto", "safetensors", "gguf")),
    VllmFlag(("--tokenizer-mode",), "refuse", "tokenmill uses the model's own tokenizer",
             works=_is("auto", "hf")),
    VllmFlag(("--response-role",), "refuse", "responses come from the assistant role",
             works=_is("assistant")),
    VllmFlag(("--chat-template-content-format",), "ignore",
             "tokenmill detects from the template whether message content is a string or a "
             "list of parts (vLLM's auto)", works=_is("auto")),
    VllmFlag(("--preemption-mode",), "ignore", "a preempted request is always recomputed",
             works=_is("recompute")),
    # no effect here: one warning at startup
    VllmFlag(("--trust-remote-code",), "ignore",
             "tokenmill never runs code from a model repository: its own implementation of the "
             "architecture loads the weights", takes_value=False),
    VllmFlag(("--compilation-config", "-O"), "ignore", _NO_COMPILE),
    VllmFlag(("--swap-space",), "ignore",
             "a preempted request is recomputed, never swapped out to CPU memory"),
    VllmFlag(("--download-dir",), "ignore", _NO_DOWNLOADS),
    VllmFlag(("--hf-token",), "ignore", _NO_DOWNLOADS),
    VllmFlag(("--max-parallel-loading-workers",), "ignore", "weights load in one pass"),
    VllmFlag(("--disable-custom-all-reduce",), "ignore",
             "tensor-parallel ranks all-reduce through torch.distributed (gloo or NCCL)",
             takes_value=False),
    VllmFlag(("--disable-frontend-multiprocessing",), "ignore",
             "the server and the engine already share one process", takes_value=False),
    VllmFlag(("--max-num-partial-prefills",), "ignore", _SCHEDULER),
    VllmFlag(("--max-long-partial-prefills",), "ignore", _SCHEDULER),
    VllmFlag(("--long-prefill-token-threshold",), "ignore", _SCHEDULER),
    VllmFlag(("--max-log-len",), "ignore", "tokenmill never logs prompt text"),
    VllmFlag(("--num-gpu-blocks-override",), "ignore",
             "the KV cache is sized by --kv-cache-memory or --gpu-memory-utilization"),
    VllmFlag(("--async-scheduling",), "ignore",
             "tokenmill's engine schedules one step at a time", takes_value=False),
    VllmFlag(("--prefix-caching-hash-algo",), "ignore",
             "prefix-cache blocks are keyed by SHA-256 over their parent's key and their "
             "tokens", works=_is("sha256")),
    VllmFlag(("--mm-processor-cache-gb",), "ignore",
             "processed images are not cached across requests", works=_is(0, "0")),
    VllmFlag(("--enable-log-outputs",), "ignore", "tokenmill never logs prompt or output text",
             takes_value=False),
    VllmFlag(("--log-config-file",), "ignore",
             "tokenmill logs one line per event to stderr; --uvicorn-log-level sets the "
             "server's level"),
    # GET /load always counts (a counter per request): the flag changes nothing
    VllmFlag(("--enable-server-load-tracking",), "ignore",
             "GET /load always tracks the server's load", takes_value=False, works=_is(True)),
    VllmFlag(("--model-impl",), "ignore",
             "tokenmill runs its own implementation of each architecture",
             works=_is("auto", "vllm")),
    VllmFlag(("--api-server-count",), "ignore",
             "one server process tokenizes and streams for the engine", works=_is(1, "1")),
    VllmFlag(("--enable-expert-parallel",), "ignore",
             "a mixture of experts is split by --tensor-parallel-size like the other layers",
             takes_value=False),
    VllmFlag(("--data-parallel-size-local",), "ignore",
             "every --data-parallel-size engine runs on this machine"),
    # not available: the server does not start, and says what to do instead
    VllmFlag(("--revision",), "refuse", f"{_NO_DOWNLOADS}; serve that revision's directory"),
    VllmFlag(("--tokenizer-revision",), "refuse", _NO_DOWNLOADS),
    VllmFlag(("--code-revision",), "refuse", _NO_DOWNLOADS),
    VllmFlag(("--tokenizer",), "refuse", _OWN_TOKENIZER),  # (but see _check_tokenizer)
    VllmFlag(("--enable-lora",), "refuse", _NO_LORA, takes_value=False),
    VllmFlag(("--lora-modules",), "refuse", _NO_LORA),
    VllmFlag(("--max-loras",), "refuse", _NO_LORA),
    VllmFlag(("--max-lora-rank",), "refuse", _NO_LORA),
    VllmFlag(("--max-cpu-loras",), "refuse", _NO_LORA),
    VllmFlag(("--enable-sleep-mode",), "refuse",
             "sleep mode is not supported: stop the server to free its memory",
             takes_value=False),
    VllmFlag(("--logits-processor-pattern",), "refuse",
             "tokenmill runs no logits processors that requests name; logit_bias, "
             "allowed_token_ids, bad_words and structured outputs shape the logits instead"),
    VllmFlag(("--tool-parser-plugin",), "refuse",
             "tokenmill loads no parser plugins from files; --tool-call-parser names a "
             "built-in one"),
    VllmFlag(("--logprobs-mode",), "refuse",
             "logprobs are those of the model's raw logits (vLLM's default, raw_logprobs)",
             works=_is("raw_logprobs")),
    VllmFlag(("--allowed-local-media-path",), "refuse",
             "image files on the server are not read; send data: URLs or allowed http(s) URLs"),
    VllmFlag(("--cpu-offload-gb",), "refuse", "weights stay on the device they run on",
             works=_is(0, 0.0)),
    VllmFlag(("--kv-transfer-config",), "refuse", "disaggregated prefill is not supported"),
    VllmFlag(("--calculate-kv-scales",), "refuse",
             "fp8 KV caches keep vLLM's default scale of 1 (values stored as they are)",
             takes_value=False),
    VllmFlag(("--hf-overrides",), "refuse", "edit the model directory's config.json instead"),
    VllmFlag(("--override-generation-config",), "refuse",
             "edit the model's generation_config.json, or pass --generation-config DIR"),
    VllmFlag(("--otlp-traces-endpoint",), "refuse", "OpenTelemetry tracing is not supported"),
    VllmFlag(("--middleware",), "refuse", "tokenmill loads no middleware from import paths"),
    VllmFlag(("--disable-sliding-window",), "refuse",
             "sliding windows are honoured in the paged cache; lower --max-model-len instead",
             takes_value=False),
)  # fmt: skip


class RefusedOption(ValueError):
    """A vLLM option (with this value) that tokenmill cannot honour."""


def option_name(flag: VllmFlag) -> str:
    """The flag's LLM(...) keyword: --trust-remote-code is trust_remote_code."""
    return flag.names[0].lstrip("-").replace("-", "_").replace(".", "_")


def check_vllm_options(model: str | None, kwargs: dict[str, Any]) -> list[str]:
    """The warnings of the vLLM options among LLM(...)'s keyword arguments, which it takes out
    of `kwargs`; RefusedOption for one that cannot work. An option at its unused value (None,
    False for a switch) passes quietly."""
    warnings: list[str] = []
    if "kv_cache_memory_bytes" in kwargs:  # vLLM's name of kv_cache_memory
        kwargs["kv_cache_memory"] = kwargs.pop("kv_cache_memory_bytes")
    tokenizer = kwargs.pop("tokenizer", None)
    if tokenizer is not None:
        verdict = tokenizer_verdict(str(tokenizer), model)
        if verdict == "refuse":
            raise RefusedOption(f"tokenizer={tokenizer!r}: {_OWN_TOKENIZER}")
        if verdict:
            warnings.append(f"tokenizer={tokenizer!r} has no effect here: {verdict}")
    for flag in VLLM_FLAGS:
        name = option_name(flag)
        if name not in kwargs:  # (tokenizer: taken out above)
            continue
        value = kwargs.pop(name)
        switch = not flag.takes_value and not flag.boolean_optional  # (False: not given)
        unused = value is None or (switch and value is False)
        if unused or (flag.works is not None and flag.works(value)):
            continue
        if flag.kind == "refuse":
            raise RefusedOption(f"{name}={value!r}: {flag.reason}")
        warnings.append(f"{name}={value!r} has no effect here: {flag.reason}")
    images = kwargs.pop("limit_mm_per_prompt", None)
    if images:
        warnings.append(
            f"limit_mm_per_prompt={images!r} has no effect here: LLM takes the images each "
            "prompt gives (the server's --limit-mm-per-prompt caps a request's)"
        )
    return warnings


def tokenizer_verdict(tokenizer: str, model: str | None) -> str:
    """--tokenizer's fate: "" where it names the model itself; beside a GGUF file (vLLM's
    documented command line, which names the base model's tokenizer) a warning, the file
    holding that tokenizer; "refuse" otherwise."""
    if model is not None and Path(tokenizer).resolve() == Path(model).resolve():
        return ""
    if model is not None and model.lower().endswith(".gguf"):
        return "the GGUF file's own tokenizer is used"
    return "refuse"
