"""JSON schema -> regex for the regex-based paths: outlines-core's conversion plus integer ranges.

outlines-core ignores minimum/maximum on integers; bounded integer subschemas are swapped for
a placeholder constant before the conversion and for an exact range regex after it.
"""

from __future__ import annotations

import json
import math
from typing import Any, TypeGuard

from tokenmill.structured import constraints
from tokenmill.structured.spec import StructuredSpec

_PLACEHOLDER = "tokenmillIntRange{}x"  # alphanumeric: appears verbatim in the regex
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def json_regex(spec: StructuredSpec) -> str:
    """The regex of a json/json_object spec (whitespace pattern applied); 400 if unsupported."""
    from outlines_core.json_schema import build_regex_from_schema

    ranges: list[str] = []
    schema = json.loads(constraints.schema_text(spec))
    try:
        schema = _replace_integer_ranges(schema, ranges)
        regex = str(build_regex_from_schema(json.dumps(schema), spec.whitespace_pattern))
    except ValueError as exc:
        raise constraints.invalid(
            spec, f"unsupported JSON schema: {constraints.compiler_message(exc)}"
        ) from exc
    for i, range_regex in enumerate(ranges):
        regex = regex.replace(f'"{_PLACEHOLDER.format(i)}"', range_regex)
    return regex


def _replace_integer_ranges(node: Any, ranges: list[str]) -> Any:
    """A copy of `node` with each bounded integer schema replaced by a placeholder const."""
    if isinstance(node, list):
        return [_replace_integer_ranges(item, ranges) for item in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "integer" and any(key in node for key in _BOUNDS):
        ranges.append(integer_range_regex(*_integer_bounds(node)))
        return {"const": _PLACEHOLDER.format(len(ranges) - 1)}
    return {key: _replace_integer_ranges(value, ranges) for key, value in node.items()}


def _integer_bounds(schema: dict[str, Any]) -> tuple[int | None, int | None]:
    """Inclusive integer bounds from minimum/maximum and their exclusive forms (draft 6+)."""
    lows, highs = [], []
    minimum, maximum = schema.get("minimum"), schema.get("maximum")
    exclusive_min, exclusive_max = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if minimum is not None:  # draft 4: exclusiveMinimum is a flag on minimum
        lows.append(math.floor(minimum) + 1 if exclusive_min is True else math.ceil(minimum))
    if _is_number(exclusive_min):
        lows.append(math.floor(exclusive_min) + 1)
    if maximum is not None:
        highs.append(math.ceil(maximum) - 1 if exclusive_max is True else math.floor(maximum))
    if _is_number(exclusive_max):
        highs.append(math.ceil(exclusive_max) - 1)
    return (max(lows) if lows else None), (min(highs) if highs else None)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def integer_range_regex(low: int | None, high: int | None) -> str:
    """A regex matching exactly the decimal integers in [low, high] (None = unbounded)."""
    if low is not None and high is not None and low > high:
        raise ValueError(f"integer range [{low}, {high}] is empty")
    parts = []
    if low is None or low < 0:  # negatives: -n for n in [max(1, -high), -low]
        smallest = 1 if high is None or high >= 0 else -high
        parts += ["-" + part for part in _naturals(smallest, None if low is None else -low)]
    if high is None or high >= 0:
        parts += _naturals(max(0, low or 0), high)
    return "(" + "|".join(parts) + ")"


def _naturals(low: int, high: int | None) -> list[str]:
    """Alternatives matching the integers in [low, high] (0 <= low), without leading zeros."""
    if high is None:  # [low, 10^d - 1] then every longer number
        digits = len(str(low))
        return _naturals(low, 10**digits - 1) + [f"[1-9][0-9]{{{digits},}}"]
    if low > high:
        return []
    if len(str(low)) < len(str(high)):
        split = 10 ** len(str(low))
        return _naturals(low, split - 1) + _naturals(split, high)
    return _same_length(str(low), str(high))


def _same_length(low: str, high: str) -> list[str]:
    """Alternatives matching the digit strings in [low, high], both of the same length."""
    if low == high:
        return [low]
    if len(low) == 1:
        return [f"[{low}-{high}]"]
    if low[0] == high[0]:
        return [low[0] + part for part in _same_length(low[1:], high[1:])]
    rest = len(low) - 1
    parts, tail = [], []
    first = int(low[0])
    if low[1:] != "0" * rest:
        parts = [low[0] + part for part in _same_length(low[1:], "9" * rest)]
        first += 1
    last = int(high[0])
    if high[1:] != "9" * rest:
        tail = [high[0] + part for part in _same_length("0" * rest, high[1:])]
        last -= 1
    if first <= last:
        parts.append(f"[{first}-{last}][0-9]{{{rest}}}")
    return parts + tail
