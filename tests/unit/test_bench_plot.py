"""`tokenmill bench plot` and `bench serve --plot`: the chart of a recorded side-by-side run
(tests/unit/data/bench_serve_side_by_side.json, `bench serve --json` against tokenmill and
llama-server, the run docs/benchmarks.md shows)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tokenmill.bench import plot, serve

RECORDED = Path(__file__).parent / "data" / "bench_serve_side_by_side.json"


@pytest.fixture
def result() -> dict[str, Any]:
    return dict(json.loads(RECORDED.read_text()))


def _lines(figure: Any) -> dict[tuple[str, str], Any]:
    """(panel title, line label) -> the line."""
    return {(ax.get_title(), line.get_label()): line for ax in figure.axes for line in ax.lines}


def test_every_server_gets_throughput_ttft_and_itl_lines(result: dict[str, Any]) -> None:
    figure = plot.plot_result(result)
    lines = _lines(figure)
    names = [run["name"] for run in result["runs"]]
    assert names == ["tokenmill", "llama-server"]
    expected = {
        ("Output throughput", "output_throughput", ""),
        ("Time to first token", "ttft_ms_p50", " p50"),
        ("Time to first token", "ttft_ms_p99", " p99"),
        ("Inter-token latency", "itl_ms_p50", " p50"),
        ("Inter-token latency", "itl_ms_p99", " p99"),
    }
    assert set(lines) == {(title, name + suffix) for title, _, suffix in expected for name in names}
    for run in result["runs"]:
        for title, field, suffix in expected:
            line = lines[(title, run["name"] + suffix)]
            assert list(line.get_xdata()) == [lv["concurrency"] for lv in run["levels"]]
            assert list(line.get_ydata()) == [lv[field] for lv in run["levels"]]
    caption = figure.get_suptitle()
    assert "tokenmill vs llama-server" in caption and "128 output tokens" in caption


def test_a_level_without_a_figure_is_left_out_of_its_line(result: dict[str, Any]) -> None:
    changed = copy.deepcopy(result)
    changed["runs"][1]["levels"][0]["ttft_ms_p99"] = None  # e.g. every request failed
    line = _lines(plot.plot_result(changed))[("Time to first token", "llama-server p99")]
    assert list(line.get_xdata()) == [lv["concurrency"] for lv in result["runs"][1]["levels"][1:]]


def test_the_command_writes_a_png(
    result: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "chart.png"
    assert plot.main([str(RECORDED), "-o", str(out)]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > image.height > 300
    assert "chart written to" in capsys.readouterr().err


def test_the_command_names_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.json"
    assert plot.main([str(missing), "-o", str(tmp_path / "x.png")]) == 1
    assert "missing.json" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    empty.write_text('{"runs": []}')
    assert plot.main([str(empty), "-o", str(tmp_path / "x.png")]) == 1
    assert "no runs" in capsys.readouterr().err
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"runs": [{"name": "a", "levels": [{"output_throughput": 1}]}]}')
    assert plot.main([str(wrong), "-o", str(tmp_path / "x.png")]) == 1
    assert "not a `bench serve --json` result" in capsys.readouterr().err


def test_bench_serve_plot_needs_matplotlib_before_it_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = serve.importlib.util.find_spec
    monkeypatch.setattr(
        serve.importlib.util, "find_spec", lambda name: None if name == "matplotlib" else real(name)
    )
    # no server at this address: the check comes first
    argv = ["--base-url", "http://127.0.0.1:9/v1", "--plot", "x.png"]
    assert serve.main(argv) == 2
    assert "pip install 'tokenmill[bench]'" in capsys.readouterr().err
