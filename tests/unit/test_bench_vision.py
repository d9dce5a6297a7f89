"""`python -m tokenmill.bench.vision`: the tiny shape end to end (checkpoint saved by
transformers, loaded by the offline LLM, encoder and TTFT timed), checking the table's
shape and that every figure is there and positive; timings themselves are never asserted."""

from __future__ import annotations

import re

import pytest

from tokenmill.bench import vision


def test_tiny_shape_prints_one_full_row(capsys: pytest.CaptureFixture[str]) -> None:
    assert vision.main(["--shape", "tiny", "--runs", "2"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 3  # header, separator, one row
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == list(vision.COLUMNS)
    assert lines[1] == "|" + " --- |" * len(vision.COLUMNS)
    row = dict(zip(header, (c.strip() for c in lines[2].strip("|").split("|")), strict=True))
    assert (row["shape"], row["dtype"]) == ("tiny", "float32")
    assert int(row["threads"]) >= 1
    assert row["image tokens"] == "16"  # 32 px / 8 px patches, the CLS position dropped
    with_image, text_only = (
        int(n) for n in row["prompt tokens (with image / text only)"].split("/")
    )
    assert with_image == text_only + 16  # the text plus the image's 16 tokens
    for column in vision.COLUMNS[5:9]:  # "median [min-max]"
        found = re.fullmatch(r"([\d.]+) \[([\d.]+)-([\d.]+)\]", row[column])
        assert found, (column, row[column])
        median, low, high = (float(g) for g in found.groups())
        assert 0 < low <= median <= high
    assert re.fullmatch(r"\d+%", row["encoder share of TTFT"])
    assert "tiny: run 2/2" in captured.err  # progress goes to stderr


def test_format_table_share_is_median_encoder_over_median_ttft() -> None:
    result = vision.Result(
        "tiny", "float32", 2, 16, 32, 17, preprocess_ms=[1.0], encoder_ms=[1.0, 3.0, 2.0],
        ttft_image_ms=[8.0, 10.0, 12.0], ttft_text_ms=[4.0],
    )  # fmt: skip
    assert result.encoder_share == pytest.approx(0.2)
    assert format_row(vision.format_table([result]))[-1] == "20%"


def format_row(table: str) -> list[str]:
    return [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
