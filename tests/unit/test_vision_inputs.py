"""The parts of image input that need no model: multimodal rotary positions and tables,
image positions under prompt truncation, prefix-cache keys with images, the encoder cache,
--limit-mm-per-prompt, template content detection, and llama.cpp's mmproj GGUF refused."""

from __future__ import annotations

import argparse

import gguf
import numpy as np
import pytest
import torch

from tokenmill.engine.input_processor import InputProcessor
from tokenmill.engine.kv_cache import KVCacheManager
from tokenmill.engine.request import Request
from tokenmill.errors import InvalidRequestError, ModelLoadError
from tokenmill.layers.rotary import MRotaryEmbedding, RotaryEmbedding
from tokenmill.model.loader import load_model_source
from tokenmill.multimodal.inputs import ImageInput
from tokenmill.multimodal.mrope import mrope_positions
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.cli import _mm_limits
from tokenmill.tokenizer.chat_template import template_reads_parts
from tokenmill.worker.encoder_cache import EncoderCache


def image(offset: int, length: int, key: str = "a", grid=None) -> ImageInput:
    rows = torch.arange(offset, offset + length)
    return ImageInput(key, {}, offset, length, rows, grid)


def test_mrope_positions_follow_the_grid_then_the_larger_side():
    """2 text tokens, a 2x3 grid of image tokens, 2 text tokens (Qwen2-VL's rule)."""
    positions, delta = mrope_positions(10, (image(2, 6, grid=(1, 2, 3)),))
    assert positions.tolist() == [
        [0, 1, 2, 2, 2, 2, 2, 2, 5, 6],  # time
        [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],  # height (rows)
        [0, 1, 2, 3, 4, 2, 3, 4, 5, 6],  # width (columns)
    ]
    assert delta == 7 - 10  # the token at index 10 sits at position 7


def test_mrotary_tables_equal_plain_rotary_for_text_and_mix_sections_for_images():
    plain = RotaryEmbedding(8, 64, 10000.0, None)
    multi = MRotaryEmbedding(8, 64, 10000.0, None, [1, 1, 2])
    for rotary in (plain, multi):
        rotary.build(torch.device("cpu"))
    text = torch.arange(5)
    same = multi.cos_sin_for(torch.stack([text, text, text]), torch.float32)
    assert torch.equal(same.cos, plain.cos_sin_for(text, torch.float32).cos)
    mixed = multi.cos_sin_for(torch.tensor([[3], [5], [7]]), torch.float32)
    cos = mixed.cos[0, 0]
    table = plain.cos_sin
    assert table is not None
    # frequency pair 0 turns with time (3), pair 1 with height (5), pairs 2-3 with width (7)
    expected = torch.stack([table[3, 0, 0], table[5, 0, 1], table[7, 0, 2], table[7, 0, 3]])
    assert torch.allclose(cos[:4], expected) and torch.allclose(cos[4:], expected)


def test_truncation_moves_images_and_refuses_to_cut_one():
    processor = InputProcessor(vocab_size=100, max_model_len=64)
    prompt = list(range(20))
    params = SamplingParams(truncate_prompt_tokens=15, max_tokens=1)
    item = processor.validate(prompt, params, images=(image(8, 4),))
    assert item.images[0].offset == 3 and item.images[0].positions.tolist() == [3, 4, 5, 6]
    with pytest.raises(InvalidRequestError) as cut:
        processor.validate(prompt, params, images=(image(2, 4),))
    assert cut.value.param == "truncate_prompt_tokens"
    beam = SamplingParams(use_beam_search=True, n=2, max_tokens=2)
    with pytest.raises(InvalidRequestError, match="beam search"):
        processor.validate(prompt, beam, images=(image(2, 4),))


def test_prefix_blocks_are_keyed_by_the_images_they_hold():
    """Same tokens: the same image finds the cached blocks; another image finds only the
    blocks before its first token."""
    manager = KVCacheManager(num_blocks=16, block_size=4)

    def request(name: str, key: str) -> Request:
        r = Request(name, [7] * 17, SamplingParams(max_tokens=1), frozenset(), 64)
        r.images = (image(6, 8, key),)  # tokens 6..13: blocks 1, 2 and 3
        return r

    first = request("first", "cat")
    assert manager.allocate(first, 17)
    first.num_computed_tokens = 17
    manager.cache_full_blocks(first)
    assert len(manager.find_cached_prefix(request("same", "cat"))) == 4
    assert len(manager.find_cached_prefix(request("other", "dog"))) == 1


class CountingEncoder:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def embed_images(self, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        self.calls.append(len(images))
        return [torch.full((int(i["n"]), 2), float(i["n"])) for i in images]


def test_encoder_cache_encodes_each_image_once_per_step_and_evicts_oldest():
    encoder = CountingEncoder()
    cache = EncoderCache(encoder, max_rows=5)

    def item(key: str, n: int) -> ImageInput:
        return ImageInput(key, {"n": torch.tensor(n)}, 0, n, torch.arange(n))

    rows = cache.rows([item("a", 2), item("b", 3), item("a", 2)])
    assert encoder.calls == [2] and rows["b"].shape == (3, 2)  # one call, "a" once
    cache.rows([item("a", 2)])
    assert encoder.calls == [2]  # cached
    cache.rows([item("c", 2)])  # 7 rows > 5: the least recently used ("b") goes
    cache.rows([item("b", 3)])
    assert encoder.calls == [2, 1, 1]


def test_limit_mm_per_prompt_parses_vllm_forms():
    assert _mm_limits('{"image": 4}') == {"image": 4}
    assert _mm_limits("image=2,video=0") == {"image": 2, "video": 0}
    for bad in ('{"image": -1}', '{"video": 1}', '{"image": "many"}'):
        with pytest.raises(argparse.ArgumentTypeError):
            _mm_limits(bad)


def test_templates_that_loop_over_content_parts_are_detected():
    assert template_reads_parts("{% for c in message['content'] %}{{ c.text }}{% endfor %}")
    assert template_reads_parts("{% for line in m.content %}{% endfor %}")
    assert not template_reads_parts("{{ message['content'] }}")
    assert not template_reads_parts(None)


def test_an_mmproj_gguf_says_what_it_is(tmp_path):
    path = tmp_path / "mmproj-model-f16.gguf"
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_tensor("v.patch_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="mmproj"):
        load_model_source(str(path))
