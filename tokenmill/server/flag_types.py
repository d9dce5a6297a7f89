"""Types of the command line's flag values: sizes in bytes, token counts, lists, dtypes."""

from __future__ import annotations

import argparse
import json
import re

from tokenmill.config import DTYPE_ALIASES
from tokenmill.errors import ModelLoadError
from tokenmill.spec_decode.config import SpeculativeConfig

_BYTE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def parse_bytes(value: str) -> int:
    """'2GiB' -> 2147483648; '1e9', '512MB', '1024' also work."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", value)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _BYTE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {value!r} (e.g. 2GiB, 512MiB)")
    try:
        return int(float(match.group(1)) * _BYTE_UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {value!r}") from None


def parse_tokens(value: str) -> int:
    """'4096', '4k' (= 4096) or '1m' (= 1048576) tokens."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", value)
    if not match:
        raise argparse.ArgumentTypeError(f"not a token count: {value!r} (e.g. 4096 or 4k)")
    scale = {"": 1, "k": 1024, "m": 1024 * 1024}[match.group(2).lower()]
    return int(match.group(1)) * scale


def parse_positive_int(value: str) -> int:
    """A whole number from 1 (a batch size)."""
    if not value.strip().isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {value!r}")
    return int(value)


def parse_list(value: str) -> list[str]:
    """A JSON list of strings, or a comma-separated list."""
    text = value.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not a JSON list: {value!r} ({exc})") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise argparse.ArgumentTypeError(f"not a JSON list of strings: {value!r}")
        return items
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_dtype(value: str) -> str:
    dtype = DTYPE_ALIASES.get(value, value)
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise argparse.ArgumentTypeError(
            f"unknown dtype {value!r}: auto, float32 (float), bfloat16, float16 (half)"
        )
    return dtype


def parse_json_object(value: str) -> dict[str, object]:
    """A JSON object (vLLM's JSON-valued flags, e.g. --pooler-config)."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {value!r} ({exc})") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {value!r}")
    return parsed


def parse_speculative_config(value: str) -> dict[str, object]:
    """--speculative-config: a JSON object speculative decoding can run, checked before
    the model loads (tokenmill/spec_decode/config.py names what is wrong)."""
    parsed = parse_json_object(value)
    try:
        SpeculativeConfig.from_dict(parsed)
    except ModelLoadError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return parsed
