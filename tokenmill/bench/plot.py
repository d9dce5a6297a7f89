"""Charts of a `tokenmill bench serve` result: output tokens/s, TTFT and inter-token latency
against concurrency, one line per server (p50 solid, p99 dashed).

`tokenmill bench serve --plot out.png` draws the run it just made; `tokenmill bench plot
RESULT.json -o out.png` draws one recorded with `--json`. matplotlib is an optional extra:
`pip install 'tokenmill[bench]'`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# (panel title, y label, [(LevelReport field, line style, label suffix)])
PANELS: list[tuple[str, str, list[tuple[str, str, str]]]] = [
    ("Output throughput", "output tokens/s", [("output_throughput", "-", "")]),
    ("Time to first token", "ms", [("ttft_ms_p50", "-", " p50"), ("ttft_ms_p99", "--", " p99")]),
    ("Inter-token latency", "ms", [("itl_ms_p50", "-", " p50"), ("itl_ms_p99", "--", " p99")]),
]


class PlotError(Exception):
    """Why a chart cannot be drawn, in one line."""


def plot_result(result: dict[str, Any]) -> Figure:
    """The chart of one result (`bench serve`'s JSON): a panel per measurement, a line per
    server and percentile; levels a server did not measure are left out of its line."""
    try:  # a bare Figure draws to files without pyplot or a display backend
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotError(
            "charts need matplotlib: pip install 'tokenmill[bench]'"
        ) from exc  # fmt: skip
    runs = result.get("runs") or []
    if not runs:
        raise PlotError("the result has no runs to draw")
    figure = Figure(figsize=(15, 4.6), layout="constrained")
    axes = figure.subplots(1, len(PANELS))
    concurrencies = sorted({lv["concurrency"] for run in runs for lv in run["levels"]})
    colors = [f"C{i}" for i in range(len(runs))]
    for ax, (title, unit, series) in zip(axes, PANELS, strict=True):
        for run, color in zip(runs, colors, strict=True):
            for name, style, suffix in series:
                points = [(lv["concurrency"], lv[name]) for lv in run["levels"]]
                points = [(c, v) for c, v in points if v is not None]
                if not points:
                    continue
                xs, ys = zip(*points, strict=True)
                label = f"{_run_name(run)}{suffix}"
                ax.plot(xs, ys, style, color=color, marker="o", markersize=4, label=label)
        ax.set_title(title)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(unit)
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle(_caption(result), fontsize="medium")
    return figure


def save_plot(result: dict[str, Any], path: str) -> None:
    plot_result(result).savefig(path, dpi=110)


def _run_name(run: dict[str, Any]) -> str:
    return str(run.get("name") or run.get("base_url") or "server")


def _caption(result: dict[str, Any]) -> str:
    """What every request was, from the result's workload."""
    w = result.get("workload") or {}
    parts = [
        f"{w.get('endpoint', 'chat')}",
        f"~{w.get('prompt_tokens', '?')} prompt tokens",
        f"{w.get('output_tokens', '?')} output tokens",
        f"temperature {w.get('temperature', '?')}",
    ]
    if w.get("shared_prefix_tokens"):
        parts.append(f"{w['shared_prefix_tokens']} shared prefix tokens")
    if busy := result.get("background_load"):
        parts.append(f"{busy} busy process{'es' if busy > 1 else ''} beside the server")
    names = " vs ".join(_run_name(run) for run in result.get("runs") or [])
    return f"{names}: " + ", ".join(parts)


# --------------------------------------------------------------------------------------
# Command line: tokenmill bench plot
# --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("result", metavar="RESULT.json", help="written by `bench serve --json`")
    parser.add_argument("-o", "--output", required=True, metavar="PNG",
                        help="the chart's file (PNG, SVG or PDF by its suffix)")  # fmt: skip


def run_command(args: argparse.Namespace) -> int:
    try:
        with open(args.result) as f:
            result = json.load(f)
        save_plot(result, args.output)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, PlotError) as exc:
        print(f"bench plot: error: {_describe(exc)}", file=sys.stderr)
        return 1
    print(f"chart written to {args.output}", file=sys.stderr)
    return 0


def _describe(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"not a `bench serve --json` result: no {exc} field"
    return str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenmill bench plot", description=__doc__)
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
