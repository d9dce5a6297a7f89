"""Grammar backends alone: compile time (first vs cached) and per-token mask cost.

No engine: the structured-output manager alone, over the model's tokenizer.
`tokenmill bench structured` reports these compile times too (tokenmill.bench.structured).

python -m tokenmill.bench.grammar_backends [--model PATH] [--backends xgrammar outlines lm-format-enforcer]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from tokenmill.structured.manager import StructuredOutputManager
from tokenmill.structured.spec import StructuredSpec, spec_from_request_fields

# a moderately large schema: nested objects, arrays, enums, ranges, patterns
MEDIUM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999999},
        "name": {"type": "string", "maxLength": 40},
        "email": {"type": "string", "pattern": "^[a-z0-9.]{1,20}@[a-z]{1,12}\\.(com|org)$"},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer", "guest"]},
        "active": {"type": "boolean"},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 8},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "country": {"type": "string", "enum": ["FR", "DE", "US", "JP"]},
            },
            "required": ["city", "zip", "country"],
        },
        "orders": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
                    "price": {"type": "number"},
                },
                "required": ["sku", "quantity", "price"],
            },
            "maxItems": 5,
        },
    },
    "required": ["id", "name", "email", "role", "address", "orders"],
}
MEDIUM_DOCUMENT = json.dumps(
    {
        "id": 4821,
        "name": "Ada Lovelace",
        "email": "ada@example.org",
        "role": "editor",
        "active": True,
        "score": 97.5,
        "tags": ["math", "engines", "poetry"],
        "address": {"street": "12 St James's Square", "city": "London", "zip": "10001",
                    "country": "US"},
        "orders": [
            {"sku": "AE-1843", "quantity": 2, "price": 19.99},
            {"sku": "NOTE-G", "quantity": 1, "price": 5.0},
        ],
    }
)  # fmt: skip


def bench_backend(manager: StructuredOutputManager, backend: str, repeats: int) -> dict[str, Any]:
    """Compile times and the per-token cost of fill_bitmask + accept_token on MEDIUM_DOCUMENT."""
    spec = _spec(guided_json=MEDIUM_SCHEMA, guided_decoding_backend=backend)
    start = time.perf_counter()
    manager.compile(_spec(guided_regex="[0-9]", guided_decoding_backend=backend))
    setup_s = time.perf_counter() - start  # backend construction (+ vocab, for the first one)
    first_s, compiled = _timed(manager, spec)
    cached_s, _ = _timed(manager, spec)
    token_ids = manager.tokenizer.encode(MEDIUM_DOCUMENT, add_special_tokens=False)
    first_matcher_us = _walk_us(compiled, manager, token_ids)
    steady_us = min(_walk_us(compiled, manager, token_ids) for _ in range(repeats))
    return {
        "backend": backend,
        "setup_s": round(setup_s, 3),
        "compile_first_s": round(first_s, 3),
        "compile_cached_us": round(cached_s * 1e6, 1),
        "tokens": len(token_ids),
        "fill_accept_first_us_per_token": round(first_matcher_us, 1),
        "fill_accept_us_per_token": round(steady_us, 1),
    }


def _spec(**fields: Any) -> StructuredSpec:
    spec = spec_from_request_fields(**fields)
    if spec is None:
        raise ValueError("no constraint given")
    return spec


def _timed(manager: StructuredOutputManager, spec: StructuredSpec) -> tuple[float, Any]:
    start = time.perf_counter()
    compiled = manager.compile(spec)
    return time.perf_counter() - start, compiled


def _walk_us(compiled: Any, manager: StructuredOutputManager, token_ids: list[int]) -> float:
    """Mean microseconds per token: fill the row, accept the token (the engine's per-step work)."""
    bitmask = manager.allocate_bitmask(1)
    matcher = compiled.new_matcher()
    start = time.perf_counter()
    for token_id in token_ids:
        matcher.fill_bitmask(bitmask, 0)
        if not matcher.accept_token(token_id):
            raise AssertionError(f"token {token_id} rejected")
    return (time.perf_counter() - start) / len(token_ids) * 1e6


def bench_apply(manager: StructuredOutputManager, batch_sizes: list[int]) -> list[dict[str, Any]]:
    """apply_bitmask on CPU float32 logits, every row constrained."""
    results = []
    for batch in batch_sizes:
        logits = torch.randn(batch, manager.vocab_size)
        bitmask = manager.allocate_bitmask(batch)
        rows = torch.arange(batch)
        manager.apply_bitmask(logits, bitmask, rows)
        start = time.perf_counter()
        for _ in range(50):
            manager.apply_bitmask(logits, bitmask, rows)
        per_call = (time.perf_counter() - start) / 50 * 1e6
        results.append({"batch": batch, "apply_bitmask_us": round(per_call, 1)})
    return results


def main(argv: list[str] | None = None) -> None:
    from tokenmill.model.loader import load_model_source

    parser = argparse.ArgumentParser(
        prog="python -m tokenmill.bench.grammar_backends",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="model path (default: the bundled one)")
    parser.add_argument(
        "--backends", nargs="+", default=["xgrammar", "outlines", "lm-format-enforcer"]
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    tokenizer = load_model_source(args.model).tokenizer
    manager = StructuredOutputManager(tokenizer, tokenizer.vocab_size)
    for backend in args.backends:
        print(json.dumps(bench_backend(manager, backend, args.repeats)))
    for row in bench_apply(manager, [1, 32]):
        print(json.dumps(row))
    manager.close()


if __name__ == "__main__":
    main()
