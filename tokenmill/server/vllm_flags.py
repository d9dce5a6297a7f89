"""`vllm serve` flags that tokenmill has no flag of its own for: each is accepted, and either
works as in vLLM (with the values that mean the same here), is ignored with one startup
warning saying why it has no effect here, or stops the server with a message saying what
tokenmill does instead. Never Python's bare "unrecognized arguments".

The table is tokenmill/vllm_options.py's (docs/server.md's "vLLM flags" section);
`tests/unit/test_vllm_flags.py` runs a server command line of them.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from tokenmill.vllm_options import VLLM_FLAGS, tokenizer_verdict


def add_vllm_flags(group: argparse._ArgumentGroup) -> None:
    """Register every flag of the table, and the two that map onto tokenmill's own."""
    for flag in VLLM_FLAGS:
        kwargs: dict[str, Any] = {"dest": flag.dest, "default": None, "help": flag.reason}
        if flag.boolean_optional:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif not flag.takes_value:
            kwargs |= {"action": "store_const", "const": True}
        else:
            kwargs["metavar"] = "VALUE"
        group.add_argument(*flag.names, **kwargs)
    group.add_argument(
        "--structured-outputs-config.backend", dest="vllm_structured_outputs_backend",
        default=None, metavar="BACKEND", help="vLLM's name of --guided-decoding-backend",
    )  # fmt: skip
    group.add_argument(
        "--structured-outputs-config", dest="vllm_structured_outputs_config", default=None,
        metavar="JSON", help='vLLM\'s JSON form, e.g. \'{"backend": "xgrammar"}\'',
    )  # fmt: skip


class RefusedFlag(Exception):
    """A vLLM flag (with this value) that tokenmill cannot honour."""


def check_vllm_flags(args: argparse.Namespace) -> list[str]:
    """The startup warnings of the vLLM flags given; RefusedFlag for one that cannot work.
    Maps vLLM's structured-outputs flags onto --guided-decoding-backend."""
    warnings = _check_tokenizer(args)
    for flag in VLLM_FLAGS:
        value = getattr(args, flag.dest, None)
        if value is None or (flag.works is not None and flag.works(value)):
            continue
        name = flag.names[0]
        shown = {True: name, False: "--no-" + name[2:]}.get(value, f"{name} {value}")
        if flag.kind == "refuse":
            raise RefusedFlag(f"{shown}: {flag.reason}")
        warnings.append(f"{shown} has no effect here: {flag.reason}")
    backend = args.vllm_structured_outputs_backend
    if args.vllm_structured_outputs_config is not None:
        try:
            config = json.loads(args.vllm_structured_outputs_config)
        except json.JSONDecodeError as exc:
            raise RefusedFlag(f"--structured-outputs-config is not JSON: {exc}") from None
        unknown = set(config) - {"backend"} if isinstance(config, dict) else {"(not an object)"}
        if unknown:
            raise RefusedFlag(
                f"--structured-outputs-config: only 'backend' is supported, not {sorted(unknown)}"
            )
        backend = config.get("backend", backend)
    if backend is not None:
        args.guided_decoding_backend = backend
    return warnings


def _check_tokenizer(args: argparse.Namespace) -> list[str]:
    """--tokenizer as vllm_options.tokenizer_verdict says (a refusal comes from the table)."""
    tokenizer, model = getattr(args, "vllm_tokenizer", None), getattr(args, "model", None)
    if tokenizer is None:
        return []
    verdict = tokenizer_verdict(tokenizer, model)
    if verdict == "refuse":
        return []
    args.vllm_tokenizer = None
    return [f"--tokenizer {tokenizer} has no effect here: {verdict}"] if verdict else []
