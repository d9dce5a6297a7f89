"""`python -m tokenmill.bench.parallel`: the communication arithmetic checked by hand, the paper
table's rows, and one quick real run of the collectives over a 2-rank gloo group (a follower
process, as the engine's) checking the table's rows and that every figure is there; timings
themselves are never asserted."""

from __future__ import annotations

import json
import re

import pytest

from tokenmill.bench import parallel


def test_step_communication_counts_a_smollm2_decode_step_by_hand() -> None:
    # SmolLM2-135M over 3 ranks, 8 decode rows that all sample, float32 activations:
    # step message (2 broadcasts) + embedding all-reduce + 2 x 30 layer all-reduces
    # + logits message (2 broadcasts) + the logits gather = 2 + 61 + 3 = 66
    # all-reduce of [8, 576] f32 = 18,432 B; ring: 2 * 2/3 of it = 24,576 B, 61 of them
    # gather: 2 other ranks x 8 rows x 16,384 logits x 4 B = 1,048,576 B
    assert parallel.step_communication(30, 576, 49152, 3, 8, 8) == (66, 61 * 24576 + 1048576)
    # gloo on a CPU with 3 ranks: all_gather + sum, (n - 1) * S = 36,864 B each
    assert parallel.step_communication(30, 576, 49152, 3, 8, 8, all_reduce="all_gather") == (
        66,
        61 * 36864 + 1048576,
    )
    # two ranks: the ring moves 2 * 1/2 * S = S, as the all-gather does
    ring = parallel.step_communication(30, 576, 49152, 2, 8, 8)
    assert ring == parallel.step_communication(30, 576, 49152, 2, 8, 8, all_reduce="all_gather")
    assert ring == (66, 61 * 18432 + 8 * 24576 * 4)
    # a 256-token prefill chunk of which one row samples
    assert parallel.step_communication(30, 576, 49152, 2, 256, 1) == (
        66,
        61 * 256 * 576 * 4 + 24576 * 4,
    )
    # no row samples: no logits message, no gather
    assert parallel.step_communication(30, 576, 49152, 2, 8, 0) == (63, 61 * 18432)
    # the vocabulary padded up to a multiple of the ranks (10 -> 3 x 4); a ring's share of
    # an all-reduce that does not split evenly is rounded down (2 * 2/3 * 8 B -> 10 B)
    assert parallel.step_communication(1, 4, 10, 3, 1, 1, activation_bytes=2) == (
        8,
        3 * (2 * 2 * 8 // 3) + 2 * 1 * 4 * 4,
    )
    assert parallel.step_communication(30, 576, 49152, 1, 8, 8) == (0, 0)
    with pytest.raises(ValueError):
        parallel.step_communication(30, 576, 49152, 2, 1, 2)


def test_paper_rows_cover_both_models_at_every_tp_and_batch() -> None:
    rows = parallel.paper_rows()
    assert [(r.model, r.tp, r.batch) for r in rows] == [
        (m, tp, b) for m in ("Llama-3.2-1B", "Llama-3-8B") for tp in (2, 4, 8) for b in (1, 256)
    ]
    first = rows[0]  # Llama-3.2-1B, TP=2, batch 1, bfloat16 activations, float32 logits
    assert first.collectives == 2 + 33 + 3
    # 33 all-reduces of [1, 2048] bf16 = 4,096 B (ring, 2 ranks: S); gather 64,128 x 4 B
    assert first.bytes == 33 * 4096 + 64128 * 4
    assert first.comm_us == pytest.approx(38 * 10 + first.bytes / 450e9 * 1e6)
    assert first.floor_us == pytest.approx(2 * 1_235_814_400 / 2 / 3.35e12 * 1e6)
    assert first.comm_share == pytest.approx(first.comm_us / (first.comm_us + first.floor_us))
    big = rows[-1]  # Llama-3-8B, TP=8, batch 256: the FLOPs floor is under the weights'
    assert (big.model, big.tp, big.batch, big.collectives) == ("Llama-3-8B", 8, 256, 70)
    assert big.floor_us == pytest.approx(2 * 8_030_261_248 / 8 / 3.35e12 * 1e6)
    table = parallel.format_paper(rows).splitlines()
    assert len(table) == 2 + 12
    assert table[2].startswith("| Llama-3.2-1B | 2 | 1 | 38 | 0.39 | 381 | 369 | 51% |")


def test_quick_collectives_over_two_ranks(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    out = tmp_path / "parallel.json"
    argv = ["--quick", "--only", "collectives", "--ranks", "2", "--json", str(out)]
    assert parallel.main(argv) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0].startswith("### Collectives")
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == ["ranks", "collective", "T=1", "T=8", "T=32", "T=256"]
    table = [line for line in lines[4:] if line.startswith("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    assert [(r[0], r[1]) for r in rows] == [
        ("2", "all_reduce [T, 576] f32"),
        ("2", "gather_last_dim [T, 24576] f32"),
        ("2", "broadcast_object step"),
        ("2", "broadcast_object logits"),
        ("2", "(all_gather + sum [T, 576] f32)"),
    ]
    for row in rows:
        for cell in row[2:]:
            found = re.fullmatch(r"(\d+) \[(\d+)-(\d+)\]( \(\d+ B\))?", cell)
            assert found, cell
            assert int(found[2]) <= int(found[1]) <= int(found[3])
    assert re.fullmatch(
        r"CPU over this part \(\d+ s\): this benchmark [\d.]+ cores, other "
        r"processes [\d.]+ cores, of \d+",
        lines[-1],
    ), lines[-1]
    report = json.loads(out.read_text())
    assert report["runs"] == 2 and len(report["collectives"]) == 5 * 4
    for entry in report["collectives"]:
        assert entry["ranks"] == 2 and entry["iters"] == 3 and len(entry["us"]) == 2
        assert entry["payload_bytes"] > 0 and all(us > 0 for us in entry["us"])
    assert "collectives: 2 ranks" in captured.err  # progress goes to stderr


def test_tp_table_and_the_prediction_from_the_collectives() -> None:
    def collective(op: str, us: float) -> parallel.CollectiveResult:
        return parallel.CollectiveResult(2, op, 8, 1, 10, [us])

    measured = [
        collective("all_reduce", 1000.0),
        collective("gather_last_dim", 2000.0),
        collective("broadcast_object step", 3000.0),
        collective("broadcast_object logits", 4000.0),
    ]
    base = parallel.TPResult("m", 1, True, "2", 8, 64, [100.0], [200.0], [40.0], [0.0], 0)
    split = parallel.TPResult("m", 2, True, "1", 8, 64, [50.0], [100.0], [80.0], [60.0], 64)
    assert parallel.predicted_step_ms(split, measured) == pytest.approx(61 + 2 + 3 + 4)
    assert parallel.predicted_step_ms(split, measured[:3]) is None
    assert parallel.predicted_step_ms(base, []) == 0.0
    assert split.collective_share == pytest.approx(0.75)
    split.predicted_ms = 70.0
    table = parallel.format_tp([base, split]).splitlines()
    assert len(table) == 4
    last = [c.strip() for c in table[3].strip("|").split("|")]
    assert last[1] == "2" and last[6] == "60.00 (64)" and last[7] == "75%"
    assert last[8] == "70.00" and last[9] == "0.50x"
