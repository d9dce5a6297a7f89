"""The `tokenmill` command: `tokenmill serve [MODEL]` (vLLM's flags) and other subcommands."""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import json
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, get_args

from tokenmill.config import (
    Backend,
    DistributedBackend,
    EngineConfig,
    GuidedDecodingBackend,
    KVCacheDtype,
    QuantizationSetting,
    SchedulingPolicy,
)
from tokenmill.server.flag_types import (
    parse_bytes,
    parse_dtype,
    parse_json_object,
    parse_list,
    parse_positive_int,
    parse_speculative_config,
    parse_tokens,
)
from tokenmill.server.settings import DEFAULT_MAX_REQUEST_BODY_BYTES
from tokenmill.server.stats_log import interval_from_env
from tokenmill.server.vllm_flags import RefusedFlag, add_vllm_flags, check_vllm_flags

if TYPE_CHECKING:  # imported lazily at run time: `tokenmill --help` stays fast
    from tokenmill.engine.client import EngineClient
    from tokenmill.server.settings import ServerSettings

logger = logging.getLogger("tokenmill.server.cli")
_DEFAULTS = EngineConfig()  # flag defaults come from the config tree (one source of truth)

Subparsers = Any  # argparse._SubParsersAction (private type)
DEFAULT_MAX_WAITING_REQUESTS = 1024  # beyond this the server sheds load with 503s
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0  # grace period for in-flight requests on SIGTERM


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        argv = with_config_file(list(sys.argv[1:] if argv is None else argv))
    except StartupError as exc:
        parser.error(str(exc))
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    return int(args.run(args) or 0)


class SuggestingParser(argparse.ArgumentParser):
    """An unknown flag's error names the closest known one."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            known = [
                option
                for parser in _all_parsers(self)
                for action in parser._actions
                for option in action.option_strings
            ]
            hints = []
            for arg in message.removeprefix("unrecognized arguments:").split():
                close = difflib.get_close_matches(arg.split("=")[0], known, n=1, cutoff=0.6)
                if arg.startswith("-") and close:
                    hints.append(f"{arg}: did you mean {close[0]}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        super().error(message)


def _all_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(
        prog="tokenmill", description="An LLM inference engine with an OpenAI-compatible server."
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def with_config_file(argv: list[str]) -> list[str]:
    """`serve --config FILE`: the YAML file's keys (flag names, with - or _) as flags placed
    before the command line's own, so the command line wins (as vLLM does)."""
    if "--config" not in argv and not any(a.startswith("--config=") for a in argv):
        return argv
    import yaml

    rest, path = [], None
    iterator = iter(argv)
    for arg in iterator:
        if arg == "--config":
            path = next(iterator, None)
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if not path:
        raise StartupError("--config needs a YAML file")
    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise StartupError(f"cannot read --config {path}: {exc}") from None
    if not isinstance(config, dict):
        raise StartupError(f"--config {path} must map flag names to values")
    known = {o for p in _all_parsers(build_parser()) for a in p._actions for o in a.option_strings}
    flags: list[str] = []
    for key, value in config.items():
        name = str(key).replace("_", "-")
        if name == "model":
            flags += ["--model", str(value)]
        elif value is True:
            flags.append(f"--{name}")
        elif value is False:  # a switch off: its --no- form where it has one, else its default
            if f"--no-{name}" in known:
                flags.append(f"--no-{name}")
        elif isinstance(value, list):
            flags += [f"--{name}", *(str(v) for v in value)]
        elif value is not None:
            flags += [f"--{name}", json.dumps(value) if isinstance(value, dict) else str(value)]
    command = rest.index("serve") + 1 if "serve" in rest else 0
    return rest[:command] + flags + rest[command:]


# --------------------------------------------------------------------------------------
# tokenmill serve
# --------------------------------------------------------------------------------------


def register_serve(subparsers: Subparsers) -> None:
    """Add `serve`, with vLLM's flag names, to the command line."""
    p = subparsers.add_parser(
        "serve",
        help="start the OpenAI-compatible HTTP server",
        description="Start the OpenAI-compatible HTTP server (a drop-in for `vllm serve`).",
    )
    p.set_defaults(run=run_serve)
    p.add_argument(
        "model", nargs="?", default=None, metavar="MODEL",
        help="local Hugging Face model directory, .gguf file, or a name in the local HF cache "
        "(default: the bundled SmolLM2-135M-Instruct)",
    )  # fmt: skip
    p.add_argument(
        "--model", dest="model_flag", default=None, metavar="MODEL",
        help="the model, as the positional MODEL (vLLM's spelling)",
    )  # fmt: skip
    p.add_argument(
        "--config", metavar="FILE",
        help="a YAML file of flags (names as keys); the command line's own flags win",
    )  # fmt: skip
    _add_server_flags(p.add_argument_group("server"))
    _add_engine_flags(p.add_argument_group("engine"))
    add_vllm_flags(
        p.add_argument_group(
            "vLLM flags", "accepted as `vllm serve` takes them: each works, is ignored with a "
            "startup warning, or stops with what tokenmill does instead (docs/server.md)",
        )
    )  # fmt: skip


def _add_server_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    g.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    g.add_argument(
        "--api-key", nargs="+", action="extend", default=None, metavar="KEY",
        help="require `Authorization: Bearer <key>` on /v1/* routes; several keys: any of "
        "them (default: env TOKENMILL_API_KEY, or VLLM_API_KEY; unset = no auth)",
    )  # fmt: skip
    g.add_argument(
        "--uds", default=None, metavar="PATH",
        help="listen on this Unix domain socket instead of --host/--port",
    )  # fmt: skip
    g.add_argument("--ssl-keyfile", default=None, help="TLS: the private key file")
    g.add_argument("--ssl-certfile", default=None, help="TLS: the certificate file")
    g.add_argument(
        "--ssl-ca-certs", default=None, help="TLS: CA certificates to verify clients against"
    )
    g.add_argument(
        "--ssl-cert-reqs", type=int, default=0, metavar="N",
        help="TLS: client certificates: 0 none, 1 optional, 2 required (Python's ssl)",
    )  # fmt: skip
    g.add_argument(
        "--enable-request-id-headers", action="store_true",
        help="X-Request-Id on every response (the request's own, else a new one)",
    )  # fmt: skip
    g.add_argument(
        "--disable-fastapi-docs", action="store_true",
        help="no /docs, /redoc or /openapi.json",
    )  # fmt: skip
    g.add_argument(
        "--disable-playground", action="store_true",
        help="no chat page at / (the playground: docs/server.md)",
    )  # fmt: skip
    g.add_argument(
        "--enable-prompt-tokens-details", action="store_true",
        help="usage.prompt_tokens_details.cached_tokens: prompt tokens from the prefix cache",
    )  # fmt: skip
    g.add_argument(
        "--default-chat-template-kwargs", type=parse_json_object, default=None,
        metavar="JSON", help="keyword arguments to every chat template (e.g. "
        "'{\"enable_thinking\": false}'); a request's chat_template_kwargs override them",
    )  # fmt: skip
    g.add_argument(
        "--enable-force-include-usage", action="store_true",
        help="usage in a last chunk of every stream, as if each request sent "
        "stream_options.include_usage",
    )  # fmt: skip
    g.add_argument(
        "--return-tokens-as-token-ids", action="store_true",
        help='logprobs name tokens "token_id:{id}" (a request\'s return_tokens_as_token_ids '
        "overrides it)",
    )  # fmt: skip
    g.add_argument(
        "--enable-auto-tool-choice", action="store_true",
        help="accepted as in vLLM: tool_choice auto (the default with tools) is always on",
    )  # fmt: skip
    g.add_argument(
        "--tool-call-parser", type=_tool_call_parser, default=None, metavar="NAME",
        help="the tool-call syntax: hermes (Qwen, Hermes), llama3_json, mistral or generic "
        "(default: found from the chat template; generic for templates without tools)",
    )  # fmt: skip
    g.add_argument(
        "--reasoning-parser", choices=["qwen3", "deepseek_r1", "none"], default=None,
        help="reasoning models: the thought (between <think> and </think>) goes to "
        "reasoning_content, and constraints apply after it (default: found from the chat "
        "template; none = off)",
    )  # fmt: skip
    g.add_argument(
        "--allowed-media-domains", nargs="+", default=None, metavar="DOMAIN",
        help="hosts whose http(s) image URLs the server may fetch (default: none; data: URLs "
        "always work); addresses that are not public are refused whatever the name",
    )  # fmt: skip
    g.add_argument(
        "--limit-mm-per-prompt", type=_mm_limits, default=None, metavar="JSON",
        help='most images one request may carry, as vLLM: \'{"image": 4}\' (default: 16)',
    )  # fmt: skip
    g.add_argument(
        "--served-model-name", nargs="+", default=None, metavar="NAME",
        help="name(s) clients send as `model`; the first is reported in responses "
        "(default: the MODEL argument)",
    )  # fmt: skip
    g.add_argument(
        "--chat-template", default=None, metavar="TEMPLATE",
        help="chat template instead of the model's: a file path or the template text",
    )  # fmt: skip
    g.add_argument(
        "--allowed-origins", type=parse_list, default=None, metavar="LIST",
        help='enable CORS for these origins: a JSON list (\'["*"]\') or a comma list '
        "(default: CORS off)",
    )  # fmt: skip
    g.add_argument(
        "--allowed-methods", type=parse_list, default=["*"], metavar="LIST",
        help="CORS: allowed methods, JSON or comma list (default: all)",
    )  # fmt: skip
    g.add_argument(
        "--allowed-headers", type=parse_list, default=["*"], metavar="LIST",
        help="CORS: allowed headers, JSON or comma list (default: all)",
    )  # fmt: skip
    g.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    g.add_argument(
        "--disable-uvicorn-access-log", action="store_true",
        help="no access log line per HTTP request",
    )  # fmt: skip
    g.add_argument(
        "--uvicorn-log-level", default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn's log level; debug and trace also turn on tokenmill's debug logs "
        "(default: %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--disable-log-requests", action="store_true",
        help="no log line per request (prompt text is never logged)",
    )  # fmt: skip
    g.add_argument(
        "--root-path", default="",
        help="path prefix when behind a path-based proxy (the ASGI root_path)",
    )  # fmt: skip
    g.add_argument(
        "--max-request-body-bytes", type=parse_bytes, default=DEFAULT_MAX_REQUEST_BODY_BYTES,
        metavar="BYTES", help="larger request bodies get a 413 (default: 32MiB)",
    )  # fmt: skip
    g.add_argument(
        "--max-waiting-requests", type=int, default=DEFAULT_MAX_WAITING_REQUESTS,
        metavar="N", help="requests that may wait for a place in the running batch; beyond "
        "them a 503 with Retry-After (default: %(default)s; 0 = no bound)",
    )  # fmt: skip
    g.add_argument(
        "--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S, metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long in-flight requests may run before they are cut "
        "off (default: %(default)s)",
    )  # fmt: skip


def _add_engine_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--dtype", type=parse_dtype, default=_DEFAULTS.model.dtype,
        help="auto (the checkpoint's), float32 (float), bfloat16, float16 (half) "
        "(default: %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "-q", "--quantization", choices=get_args(QuantizationSetting), default=None,
        help="weight format (CPU): gguf = a GGUF file's own quantized blocks through the "
        "native kernel, activations quantized to int8 per 32 values (llama.cpp's numerics; a "
        "third of fp16's weight memory, the fastest), gguf-float32 = the same blocks, float32 "
        "activations (closer to the dequantized model), rtn = a float checkpoint's linears "
        "rounded at load to Q8_0 blocks (RTN_NUM_BITS=4: Q4_1) and run as gguf (vLLM's online "
        "round-to-nearest), fp16 = float16 weights, float32 math "
        "(half of float32's weight memory), none = the dtype's own weights (default, when "
        "--dtype is auto on a CPU: gguf for a .gguf file, else fp16; speeds: "
        "docs/benchmarks.md)",
    )  # fmt: skip
    g.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default=_DEFAULTS.model.device,
        help="where to run the model; auto = cuda when available (default: %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--backend", choices=get_args(Backend), default=_DEFAULTS.model.backend,
        help="how the model runs: auto = the CPU backend (native kernels where they run) on "
        "a CPU, the CUDA backend (Triton paged attention) on a GPU; cpu; cuda; torch = the "
        "plain-torch reference, exact weights "
        "(default: %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--max-model-len", type=parse_tokens, default=None, metavar="TOKENS",
        help="context length, prompt + output, e.g. 4096 or 4k (default: the model's)",
    )  # fmt: skip
    g.add_argument(
        "--max-num-seqs", type=int, default=_DEFAULTS.scheduler.max_num_seqs,
        help="most requests in the running batch (default: %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--max-num-batched-tokens", type=int,
        default=_DEFAULTS.scheduler.max_num_batched_tokens,
        help="token budget of one engine step: prefill chunks + decodes (default: 512 on a CPU, "
        "2048 on a GPU)",
    )  # fmt: skip
    g.add_argument(
        "--scheduling-policy", choices=get_args(SchedulingPolicy),
        default=_DEFAULTS.scheduler.scheduling_policy,
        help="fcfs: arrival order; priority: by each request's priority (lower first), then "
        "arrival (default: %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--kv-cache-memory", "--kv-cache-memory-bytes", type=parse_bytes, default=None,
        metavar="BYTES",
        help="KV cache size, e.g. 2GiB, 512MiB, 1e9 (default: on CPU 10%% of RAM, at most "
        "8GiB and half the memory left, taken as requests fill it; on CUDA what "
        "--gpu-memory-utilization leaves)",
    )  # fmt: skip
    g.add_argument(
        "--tensor-parallel-size", "-tp", type=int,
        default=_DEFAULTS.parallel.tensor_parallel_size, metavar="N",
        help="ranks that each hold a shard of every layer (processes on this machine, gloo "
        "on CPU, NCCL on CUDA; docs/scaling.md) (default: %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--pipeline-parallel-size", "-pp", type=int,
        default=_DEFAULTS.parallel.pipeline_parallel_size, metavar="N",
        help="ranks that each hold a run of the layers, activations passed along "
        "(docs/scaling.md) (default: %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--data-parallel-size", "-dp", type=int,
        default=_DEFAULTS.parallel.data_parallel_size, metavar="N",
        help="engines, each with the whole model in its own process, behind this server; "
        "requests go to the least loaded, or to the one holding their prompt's prefix "
        "(docs/scaling.md) (default: %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--distributed-executor-backend", choices=get_args(DistributedBackend), default=None,
        help="how the ranks start: mp, processes on this machine; ray, actors on a Ray "
        "cluster (pip install 'tokenmill[ray]'); external_launcher, every rank started by "
        "torchrun, rank 0 serving (default: mp)",
    )  # fmt: skip
    g.add_argument(
        "--enforce-eager", action="store_true",
        help="CUDA: run every step eagerly, capturing no CUDA graphs (a CPU always does)",
    )  # fmt: skip
    g.add_argument(
        "--cuda-graph-sizes", type=parse_positive_int, nargs="+", default=None, metavar="N",
        help="CUDA: the decode batch sizes captured as CUDA graphs at load, as vLLM: one "
        "number N = 1, 2, 4 and every multiple of 8 up to N; several = those (default: up to "
        "min(2 x --max-num-seqs, 512))",
    )  # fmt: skip
    g.add_argument(
        "--max-seq-len-to-capture", type=parse_tokens,
        default=_DEFAULTS.model.max_seq_len_to_capture, metavar="TOKENS",
        help="CUDA: a step with a longer sequence runs eagerly rather than from a CUDA graph "
        "(default: %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--cpu-threads", type=int, default=None, metavar="N",
        help="CPU: threads for the model's work, pinned (default: torch's, capped at the "
        "cgroup's CPU quota, and lowered while other processes take the cores)",
    )  # fmt: skip
    g.add_argument(
        "--kv-cache-dtype", choices=get_args(KVCacheDtype), default=_DEFAULTS.cache.kv_cache_dtype,
        help="KV cache element type; auto: float16 on a CPU with the GGUF default (int8 "
        "activations), else the model's dtype; float16, bfloat16 or float32; fp8 (= fp8_e4m3, "
        "scale 1) and fp8_e5m2: 8-bit floats, twice the tokens of float16 (default: "
        "%(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--gpu-memory-utilization", type=float, default=_DEFAULTS.cache.gpu_memory_utilization,
        help="CUDA only: share of GPU memory tokenmill may use (default: %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--block-size", type=int, default=_DEFAULTS.cache.block_size,
        help="tokens per KV cache block (default: %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--enable-prefix-caching", action=argparse.BooleanOptionalAction,
        default=_DEFAULTS.cache.enable_prefix_caching,
        help="reuse the KV cache of shared prompt prefixes (default: %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--max-logprobs", type=int, default=_DEFAULTS.model.max_logprobs, metavar="N",
        help="most logprobs / top_logprobs / prompt_logprobs a request may ask for "
        "(default: %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--generation-config", default=_DEFAULTS.model.generation_config, metavar="auto|vllm|DIR",
        help="sampling defaults for requests that leave them unset: auto = the model's "
        "generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty, "
        "max_new_tokens), vllm = none, or a directory holding a generation_config.json "
        "(default: %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--pooler-config", type=parse_json_object, default=None, metavar="JSON",
        help='how /v1/embeddings pools the last hidden states, as vLLM: \'{"pooling_type": '
        '"LAST" | "MEAN" | "CLS", "normalize": true}\' (default: the model\'s '
        "sentence-transformers config, else LAST, normalised)",
    )  # fmt: skip
    g.add_argument(
        "--speculative-config", type=parse_speculative_config, default=None, metavar="JSON",
        help="speculative decoding, as vLLM: '{\"method\": \"ngram\", "
        "\"num_speculative_tokens\": 4, \"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2}' "
        "guesses up to 4 tokens a step from earlier text and checks them in one forward "
        "(output unchanged; faster where the output repeats its input); "
        "'{\"model\": \"path/of/a/draft\", \"num_speculative_tokens\": 4}' takes a "
        "smaller model's guesses (default: off)",
    )  # fmt: skip
    g.add_argument(
        "--mm-processor-kwargs", type=parse_json_object, default=None, metavar="JSON",
        help="a vision model's image processor options for every image, as vLLM (e.g. "
        '\'{"max_pixels": 1003520}\' for Qwen2.5-VL); a request\'s mm_processor_kwargs add '
        "to them",
    )  # fmt: skip
    g.add_argument(
        "--seed", type=int, default=_DEFAULTS.model.seed,
        help="seed for requests that give none (default: %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--guided-decoding-backend", metavar="{" + ",".join(get_args(GuidedDecodingBackend)) + "}",
        default=_DEFAULTS.structured_outputs.guided_decoding_backend,
        help="structured outputs: the grammar backend of requests that name none; vLLM's "
        "auto is the default (default: %(default)s)",
    )  # fmt: skip


def run_serve(args: argparse.Namespace) -> int:
    """Load the model, bind the port, serve until interrupted; a startup failure is one line."""
    _configure_logging(args.uvicorn_log_level)
    try:
        return _serve(args)
    except StartupError as exc:
        print(f"tokenmill serve: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        return 0


def _tool_call_parser(value: str) -> str:
    from tokenmill.tools.formats import format_named

    try:
        return format_named(value).name
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _image_limit(args: argparse.Namespace) -> dict[str, int]:
    """RequestLimits' max_images from --limit-mm-per-prompt, where it names images."""
    limits = args.limit_mm_per_prompt or {}
    return {"max_images": limits["image"]} if "image" in limits else {}


def _mm_limits(value: str) -> dict[str, int]:
    """--limit-mm-per-prompt: '{"image": N}' (JSON, as vLLM; 'image=N' too). Other
    modalities are not supported, so their limit can only be 0."""
    limits: dict[str, Any] = (
        dict(parse_json_object(value))
        if value.lstrip().startswith("{")
        else dict(item.split("=", 1) for item in value.split(",") if "=" in item)
    )
    out = {}
    for key, count in limits.items():
        try:
            number = int(count)  # a JSON number or the text after "="
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{key}: {count!r} is not a count") from None
        if number < 0:
            raise argparse.ArgumentTypeError(f"{key}: {number} is negative")
        if key != "image" and number > 0:
            raise argparse.ArgumentTypeError(f"{key} inputs are not supported (only image)")
        out[key] = number
    return out


class StartupError(Exception):
    """A reason the server cannot start, said in one line."""


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tokenmill.engine.heap import settle_heap
    from tokenmill.server.app import build_app
    from tokenmill.server.lifecycle import serve_app
    from tokenmill.server.settings import default_served_model_names

    settings = _server_settings(args)  # first: a bad flag or a taken port should not wait
    if _launched_follower(args):
        return _follow(args)
    sock = _bind_unix(args.uds) if args.uds else _bind(args.host, args.port)  # for the model
    if not settings.api_keys and not _is_loopback(sock):
        logger.warning(
            "serving on %s without --api-key: any client that can reach this address can use "
            "the model (set --api-key or TOKENMILL_API_KEY, or --host 127.0.0.1)",
            settings.address,
        )  # fmt: skip
    engine = _load_engine(args)
    settings.served_model_names = args.served_model_name or default_served_model_names(
        args.model or engine.model_name
    )
    app = build_app(engine, settings)
    settle_heap()  # what is loaded lives as long as the server (engine/heap.py)
    config = uvicorn.Config(
        app,
        log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log,
        root_path=args.root_path,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        ssl_ca_certs=args.ssl_ca_certs,
        ssl_cert_reqs=args.ssl_cert_reqs,
    )
    return serve_app(config, engine, sock, args.shutdown_timeout)


def _backend_name(name: str) -> str:
    """--guided-decoding-backend in vLLM's spellings: auto is the default backend."""
    backend = name.strip().lower().replace("_", "-")
    if backend == "auto":
        return _DEFAULTS.structured_outputs.guided_decoding_backend
    if backend == "guidance":
        raise StartupError(
            "structured outputs backend 'guidance' (llguidance) is not part of tokenmill; use "
            + ", ".join(get_args(GuidedDecodingBackend))
        )
    if backend not in get_args(GuidedDecodingBackend):
        raise StartupError(
            f"unknown structured outputs backend {name!r}; use auto or one of "
            + ", ".join(get_args(GuidedDecodingBackend))
        )
    return backend


def _server_settings(args: argparse.Namespace) -> ServerSettings:
    from tokenmill.multimodal.media import MediaPolicy
    from tokenmill.server.limits import RequestLimits
    from tokenmill.server.settings import ServerSettings
    from tokenmill.tokenizer.chat_template import RESERVED_VARIABLES

    if args.data_parallel_size < 1:
        raise StartupError(f"--data-parallel-size must be >= 1, got {args.data_parallel_size}")
    if args.data_parallel_size > 1 and args.distributed_executor_backend == "external_launcher":
        raise StartupError(
            "--data-parallel-size runs its engines itself: not with external_launcher"
        )
    if args.pipeline_parallel_size < 1:
        raise StartupError(
            f"--pipeline-parallel-size must be >= 1, got {args.pipeline_parallel_size}"
        )
    if args.tensor_parallel_size < 1:
        raise StartupError(f"--tensor-parallel-size must be >= 1, got {args.tensor_parallel_size}")
    if args.cpu_threads is not None and args.cpu_threads < 1:
        raise StartupError(f"--cpu-threads must be >= 1, got {args.cpu_threads}")
    if args.shutdown_timeout < 0:
        raise StartupError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout:g}")
    if args.model_flag is not None:
        if args.model is not None and args.model != args.model_flag:
            raise StartupError(f"two models: {args.model} and --model {args.model_flag}")
        args.model = args.model_flag
    try:
        for warning in check_vllm_flags(args):
            logger.warning("%s", warning)
    except RefusedFlag as exc:
        raise StartupError(str(exc)) from None
    args.guided_decoding_backend = _backend_name(args.guided_decoding_backend)
    reserved = sorted(RESERVED_VARIABLES & (args.default_chat_template_kwargs or {}).keys())
    if reserved:
        raise StartupError(
            f"--default-chat-template-kwargs may not set {', '.join(reserved)}: reserved for "
            "the renderer"
        )
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        raise StartupError("TLS needs both --ssl-keyfile and --ssl-certfile")
    stats_interval = None  # (VLLM_LOG_STATS_INTERVAL is read only where the line is on)
    if not args.vllm_disable_log_stats:
        try:
            stats_interval = interval_from_env()
        except ValueError as exc:
            raise StartupError(str(exc)) from None
    env_key = os.environ.get("TOKENMILL_API_KEY") or os.environ.get("VLLM_API_KEY")
    scheme = "https" if args.ssl_certfile else "http"
    address = f"{scheme}://{_url_host(args.host)}:{args.port}{args.root_path}"
    return ServerSettings(
        limits=RequestLimits(max_logprobs=args.max_logprobs, **_image_limit(args)),
        media=MediaPolicy(
            allowed_domains=(
                frozenset(d.lower() for d in args.allowed_media_domains)
                if args.allowed_media_domains
                else None
            )
        ),
        served_model_names=[],
        api_key=args.api_key or ([env_key] if env_key else None),
        allowed_origins=args.allowed_origins,
        allowed_methods=args.allowed_methods,
        allowed_headers=args.allowed_headers,
        allow_credentials=args.allow_credentials,
        disable_log_requests=args.disable_log_requests,
        log_stats_interval_s=stats_interval,
        address=f"unix:{args.uds}" if args.uds else address,
        max_request_body_bytes=args.max_request_body_bytes,
        request_id_headers=args.enable_request_id_headers,
        docs=not args.disable_fastapi_docs,
        playground=not args.disable_playground,
        prompt_tokens_details=args.enable_prompt_tokens_details,
        force_include_usage=args.enable_force_include_usage,
        default_chat_template_kwargs=args.default_chat_template_kwargs,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        tool_call_parser=args.tool_call_parser,
    )


def _launched_follower(args: argparse.Namespace) -> bool:
    """A rank other than 0 that torchrun started (external_launcher): it serves no HTTP."""
    return (
        args.distributed_executor_backend == "external_launcher"
        and os.environ.get("RANK", "0") != "0"
    )


def _follow(args: argparse.Namespace) -> int:
    """Rank RANK of the launcher's group: load this rank's part and follow rank 0's steps
    until it stops (or is gone: exit 3)."""
    from tokenmill.backends.device import resolve_device
    from tokenmill.distributed.group import DEFAULT_TIMEOUT_S
    from tokenmill.executor.follower import FollowerSpec, run
    from tokenmill.executor.multiproc import launched_here, per_rank_share
    from tokenmill.model.loader import load_model_source

    config = _engine_config(args)
    size = max(args.tensor_parallel_size, args.pipeline_parallel_size)
    rank = int(os.environ["RANK"])
    if int(os.environ.get("WORLD_SIZE", "1")) != size:
        raise StartupError(
            f"the launcher started {os.environ.get('WORLD_SIZE')} processes for {size} ranks"
        )
    source = load_model_source(args.model)
    logger.info("rank %d of %d (external launcher): loading its part of %s", rank, size,
                source.name)  # fmt: skip
    device = resolve_device(config.model.device)
    model_config, cache_config = per_rank_share(
        config.model, config.cache, device, launched_here(size)
    )
    spec = FollowerSpec(rank, size, "", None, source.path, model_config, cache_config,
                        DEFAULT_TIMEOUT_S, args.pipeline_parallel_size > 1)  # fmt: skip
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 stops the others
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return run(spec)


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig.from_kwargs(
        model=args.model, dtype=args.dtype, device=args.device, backend=args.backend,
        quantization=args.quantization,
        cpu_threads=args.cpu_threads, generation_config=args.generation_config,
        enforce_eager=args.enforce_eager, cuda_graph_sizes=args.cuda_graph_sizes,
        max_seq_len_to_capture=args.max_seq_len_to_capture,
        pooler_config=args.pooler_config, mm_processor_kwargs=args.mm_processor_kwargs,
        speculative_config=args.speculative_config,
        max_model_len=args.max_model_len, chat_template=args.chat_template, seed=args.seed,
        kv_cache_memory=args.kv_cache_memory, kv_cache_dtype=args.kv_cache_dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        block_size=args.block_size, enable_prefix_caching=args.enable_prefix_caching,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        scheduling_policy=args.scheduling_policy,
        max_logprobs=args.max_logprobs,
        guided_decoding_backend=args.guided_decoding_backend,
        reasoning_parser=args.reasoning_parser,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        data_parallel_size=args.data_parallel_size,
        distributed_executor_backend=args.distributed_executor_backend,
    )  # fmt: skip


def _load_engine(args: argparse.Namespace) -> EngineClient:
    from tokenmill.engine.async_engine import AsyncEngine
    from tokenmill.errors import TokenmillError

    config = _engine_config(args)
    logger.info("loading %s", args.model or "the bundled default model")
    try:
        if args.data_parallel_size > 1:
            from tokenmill.engine.data_parallel import DataParallelEngine

            return DataParallelEngine(
                config, args.data_parallel_size, args.max_waiting_requests or None
            )
        return AsyncEngine.from_config(config, args.max_waiting_requests or None)
    except TokenmillError as exc:
        raise StartupError(exc.message) from None
    except (OSError, ValueError, RuntimeError, NotImplementedError) as exc:
        logger.debug("model load failed", exc_info=True)
        raise StartupError(f"cannot load the model: {type(exc).__name__}: {exc}") from None


def _bind(host: str, port: int) -> socket.socket:
    """Bind before serving so a taken port is a clean one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _bind_unix(path: str) -> socket.socket:
    """A Unix domain socket at `path` (a stale socket file there is replaced)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(sock: socket.socket) -> bool:
    """Whether the bound address is reachable from this machine only."""
    if sock.family == socket.AF_UNIX:
        return True
    host = sock.getsockname()[0]
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _configure_logging(uvicorn_level: str) -> None:
    level = logging.DEBUG if uvicorn_level in ("debug", "trace") else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


# --------------------------------------------------------------------------------------
# tokenmill bench
# --------------------------------------------------------------------------------------


def register_bench(subparsers: Subparsers) -> None:
    """Add `bench serve` (HTTP load generator), `bench offline` (engine throughput),
    `bench structured` (structured-output overhead), `bench quality` (perplexity and
    greedy agreement of the CPU weight paths) and `bench plot` (a `bench serve` result's chart)."""
    from tokenmill.bench import offline, plot, quality, serve, structured

    p = subparsers.add_parser("bench", help="benchmark a server or the engine")
    p.set_defaults(run=lambda _: p.print_help() or 2)  # `tokenmill bench` alone: help, exit 2
    commands = p.add_subparsers(title="benchmarks", metavar="BENCHMARK")
    for name, module, help_text in [
        ("serve", serve, "load-test an OpenAI-compatible server (tokenmill, vLLM, llama-server)"),
        ("offline", offline, "single-request and batched throughput of the engine, no HTTP"),
        ("structured", structured, "structured outputs: guided vs free decoding, compile time"),
        ("quality", quality, "perplexity and greedy agreement of each CPU weight path"),
        ("plot", plot, "chart a `bench serve --json` result: tok/s, TTFT, ITL by concurrency"),
    ]:
        sub = commands.add_parser(
            name, help=help_text, description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        module.add_arguments(sub)
        sub.set_defaults(run=module.run_command)


# Each subcommand is a function that adds its parser and sets `run`; add new ones here.
SUBCOMMANDS: list[Callable[[Subparsers], None]] = [register_serve, register_bench]


if __name__ == "__main__":
    sys.exit(main())
