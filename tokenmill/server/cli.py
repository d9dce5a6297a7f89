"""The `tokenmill` command: `tokenmill serve [MODEL]` (vLLM's flags) and other subcommands."""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, get_args

from tokenmill.config import (
    Backend,
    EngineConfig,
    GuidedDecodingBackend,
    KVCacheDtype,
    QuantizationSetting,
)
from tokenmill.server.flag_types import parse_bytes, parse_dtype, parse_list, parse_tokens
from tokenmill.server.settings import DEFAULT_MAX_REQUEST_BODY_BYTES

if TYPE_CHECKING:  # imported lazily at run time: `tokenmill --help` stays fast
    from tokenmill.engine.async_engine import AsyncEngine
    from tokenmill.server.settings import ServerSettings

logger = logging.getLogger("tokenmill.server.cli")
_DEFAULTS = EngineConfig()  # flag defaults come from the config tree (one source of truth)

Subparsers = Any  # argparse._SubParsersAction (private type)
DEFAULT_MAX_WAITING_REQUESTS = 1024  # beyond this the server sheds load with 503s
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0  # grace period for in-flight requests on SIGTERM


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    return int(args.run(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenmill", description="An LLM inference engine with an OpenAI-compatible server."
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


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
    _add_server_flags(p.add_argument_group("server"))
    _add_engine_flags(p.add_argument_group("engine"))


def _add_server_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    g.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    g.add_argument(
        "--api-key", default=os.environ.get("TOKENMILL_API_KEY"),
        help="require `Authorization: Bearer <key>` on /v1/* routes "
        "(default: env TOKENMILL_API_KEY; unset = no auth)",
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
        help="weight format (CPU): gguf = a GGUF file's own Q4_1/Q8_0 blocks through the "
        "native kernel, activations quantized to int8 per 32 values (llama.cpp's numerics; a "
        "third of fp16's weight memory, the fastest), gguf-float32 = the same blocks, float32 "
        "activations (closer to the dequantized model), fp16 = float16 weights, float32 math "
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
        "a CPU, torch on a GPU; torch = the plain-torch reference, exact weights "
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
        "--kv-cache-memory", type=parse_bytes, default=None, metavar="BYTES",
        help="KV cache size, e.g. 2GiB, 512MiB, 1e9 (default: sized to the machine)",
    )  # fmt: skip
    g.add_argument(
        "--cpu-threads", type=int, default=None, metavar="N",
        help="CPU: threads for the model's work, pinned (default: torch's, capped at the "
        "cgroup's CPU quota, and lowered while other processes take the cores)",
    )  # fmt: skip
    g.add_argument(
        "--kv-cache-dtype", choices=get_args(KVCacheDtype), default=_DEFAULTS.cache.kv_cache_dtype,
        help="KV cache element type; auto: float16 on a CPU with the GGUF default (int8 "
        "activations), else the model's dtype (default: %(default)s)",
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
        "--seed", type=int, default=_DEFAULTS.model.seed,
        help="seed for requests that give none (default: %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--guided-decoding-backend", choices=get_args(GuidedDecodingBackend),
        default=_DEFAULTS.structured_outputs.guided_decoding_backend,
        help="structured outputs: the grammar backend of requests that name none "
        "(default: %(default)s)",
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


class StartupError(Exception):
    """A reason the server cannot start, said in one line."""


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tokenmill.server.app import build_app
    from tokenmill.server.lifecycle import serve_app

    settings = _server_settings(args)  # first: a bad flag or a taken port should not wait
    sock = _bind(args.host, args.port)  # for the model to load
    if settings.api_key is None and not _is_loopback(sock):
        logger.warning(
            "serving on %s without --api-key: any client that can reach this address can use "
            "the model (set --api-key or TOKENMILL_API_KEY, or --host 127.0.0.1)",
            settings.address,
        )  # fmt: skip
    engine = _load_engine(args)
    settings.served_model_names = args.served_model_name or [args.model or engine.model_name]
    app = build_app(engine, settings)
    # What is loaded by now (model, tokenizer, app) lives as long as the server: keep it out
    # of the garbage collector's full passes, which would otherwise walk it while serving.
    gc.collect()
    gc.freeze()
    config = uvicorn.Config(
        app,
        log_level=args.uvicorn_log_level,
        root_path=args.root_path,
    )
    return serve_app(config, engine, sock, args.shutdown_timeout)


def _server_settings(args: argparse.Namespace) -> ServerSettings:
    from tokenmill.server.limits import RequestLimits
    from tokenmill.server.settings import ServerSettings

    if args.cpu_threads is not None and args.cpu_threads < 1:
        raise StartupError(f"--cpu-threads must be >= 1, got {args.cpu_threads}")
    if args.shutdown_timeout < 0:
        raise StartupError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout:g}")
    return ServerSettings(
        limits=RequestLimits(max_logprobs=args.max_logprobs),
        served_model_names=[],
        api_key=args.api_key or None,
        allowed_origins=args.allowed_origins,
        allowed_methods=args.allowed_methods,
        allowed_headers=args.allowed_headers,
        allow_credentials=args.allow_credentials,
        disable_log_requests=args.disable_log_requests,
        address=f"http://{_url_host(args.host)}:{args.port}{args.root_path}",
        max_request_body_bytes=args.max_request_body_bytes,
    )


def _load_engine(args: argparse.Namespace) -> AsyncEngine:
    from tokenmill.engine.async_engine import AsyncEngine
    from tokenmill.errors import TokenmillError

    config = EngineConfig.from_kwargs(
        model=args.model, dtype=args.dtype, device=args.device, backend=args.backend,
        quantization=args.quantization,
        cpu_threads=args.cpu_threads, generation_config=args.generation_config,
        max_model_len=args.max_model_len, chat_template=args.chat_template, seed=args.seed,
        kv_cache_memory=args.kv_cache_memory, kv_cache_dtype=args.kv_cache_dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        block_size=args.block_size, enable_prefix_caching=args.enable_prefix_caching,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_logprobs=args.max_logprobs,
        guided_decoding_backend=args.guided_decoding_backend,
    )  # fmt: skip
    logger.info("loading %s", args.model or "the bundled default model")
    try:
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


def _is_loopback(sock: socket.socket) -> bool:
    """Whether the bound address is reachable from this machine only."""
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
    `bench structured` (structured-output overhead) and `bench quality` (perplexity and
    greedy agreement of the CPU weight paths)."""
    from tokenmill.bench import offline, quality, serve, structured

    p = subparsers.add_parser("bench", help="benchmark a server or the engine")
    p.set_defaults(run=lambda _: p.print_help() or 2)  # `tokenmill bench` alone: help, exit 2
    commands = p.add_subparsers(title="benchmarks", metavar="BENCHMARK")
    for name, module, help_text in [
        ("serve", serve, "load-test an OpenAI-compatible server (tokenmill, vLLM, llama-server)"),
        ("offline", offline, "single-request and batched throughput of the engine, no HTTP"),
        ("structured", structured, "structured outputs: guided vs free decoding, compile time"),
        ("quality", quality, "perplexity and greedy agreement of each CPU weight path"),
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
