"""`tokenmill bench quality`: llama-perplexity's chunking, and perplexity / greedy agreement
of the CPU paths on a tiny random model, checked against transformers."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tokenmill.bench import quality
from tokenmill.server import cli

CTX = 64


def test_make_chunks_follows_llama_perplexity() -> None:
    tokens = list(range(10, 10 + 2 * 8 + 5))  # 21 tokens: two whole chunks of 8, rest dropped
    assert quality.make_chunks(tokens, 8, None) == [tokens[0:8], tokens[8:16]]
    assert quality.make_chunks(tokens, 8, 1) == [[1, *tokens[1:8]], [1, *tokens[9:16]]]
    with pytest.raises(ValueError, match="at least 32"):
        quality.make_chunks(tokens, 16, None)


def test_default_text_ships_with_the_package() -> None:
    assert len(quality.default_text().split()) > 2000


def _transformers_mean_nll(model_dir: Path, chunks: list[list[int]]) -> float:
    """Mean NLL of the second half of every chunk, computed independently."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    first = CTX // 2
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in chunks:
            logits = model(torch.tensor([chunk])).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            targets = torch.tensor(chunk[first + 1 :])
            total -= logprobs[first:-1].gather(1, targets[:, None]).sum().item()
            count += len(targets)
    return total / count


def test_quality_on_a_tiny_model(
    tiny_hf_model_dir: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model_dir = tiny_hf_model_dir("llama")
    text_file = tmp_path / "text.txt"
    text_file.write_text(quality.default_text()[:1500], encoding="utf-8")
    code = cli.main(
        ["bench", "quality", str(model_dir), "--text", str(text_file), "--ctx", str(CTX),
         "--paths", "gguf,fp16,none", "--question", "", "--kv-cache-memory", "8MiB",
         "--kv-cache-dtype", "fp8_e5m2", "--json"]
    )  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "quality: none chunk 1/" in captured.err  # progress on stderr
    assert report["ctx"] == CTX and report["file_format"] == "safetensors"
    assert report["chunks"] == report["text_tokens"] // CTX >= 2
    paths = {r["path"]: r for r in report["paths"]}
    assert list(paths) == ["gguf", "fp16", "none"]
    assert paths["gguf"]["status"].startswith("skipped")  # not a GGUF file
    reference = paths["none"]
    assert reference["status"] == "ok" and reference["weights"] == "float32"
    assert reference["kv_cache_dtype"] == "float32"  # the reference keeps its cache
    assert reference["scored_tokens"] == report["chunks"] * (CTX - CTX // 2 - 1)
    assert math.isfinite(reference["perplexity"]) and reference["perplexity"] > 1
    assert reference["greedy_agreement"] == 1.0
    assert 0 <= reference["top1"] <= 1
    fp16 = paths["fp16"]
    if fp16["status"] == "ok":  # fp16 needs the native kernels or fbgemm
        assert math.isfinite(fp16["perplexity"]) and fp16["perplexity"] > 1
        assert 0 <= fp16["greedy_agreement"] <= 1
        assert fp16["kv_cache_dtype"] == "float8_e5m2"

    tokenizer_tokens = quality.make_chunks(
        _tokenize(model_dir, text_file.read_text(encoding="utf-8")), CTX, None
    )
    assert len(tokenizer_tokens) == report["chunks"]
    expected = _transformers_mean_nll(model_dir, tokenizer_tokens)
    assert reference["mean_nll"] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert reference["perplexity"] == pytest.approx(math.exp(expected), rel=1e-3)


def _tokenize(model_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    assert tokenizer("x")["input_ids"] == tokenizer("x", add_special_tokens=False)["input_ids"]
    return list(tokenizer(text)["input_ids"])


def test_table_lists_every_path() -> None:
    report = {
        "model": "m", "ctx": 8, "chunks": 2, "text_tokens": 20, "question": "q?",
        "paths": [
            {"path": "gguf", "status": "skipped: not a GGUF file", "answer": None},
            {"path": "none", "status": "ok", "weights": "float32", "kv_cache_dtype": "float32",
             "perplexity": 3.5, "greedy_agreement": 1.0, "top1": 0.5,
             "prompt_tokens_per_s": 10.0, "answer": "Paris"},
        ],
    }  # fmt: skip
    table = quality.format_table(report)
    assert "| gguf | skipped: not a GGUF file |" in table
    assert "| none | float32 | float32 | 3.5000 | 1.0000 | 0.5000 | 10.0 |" in table
    assert 'none: "Paris"' in table


def test_parse_bytes() -> None:
    assert quality._parse_bytes("8MiB") == 8 * 2**20
    assert quality._parse_bytes("1e9") == 10**9
    assert quality._parse_bytes("2GB") == 2 * 10**9
    assert quality._parse_bytes("1024") == 1024


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "quality", "--paths", "int4"]) == 2
    assert "unknown paths ['int4']" in capsys.readouterr().err
