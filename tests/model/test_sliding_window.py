"""Sliding-window attention over the paged cache: long prompts against transformers' own
windowed attention, chunked and batched, in a KV cache smaller than the context (blocks
behind the window are freed where every layer slides)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tokenmill import LLM, SamplingParams

WINDOW = 20
BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, 16 tokens, 2 heads of 16, float32


def hf_greedy(directory, prompt: list[int], n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_long_prompts_in_a_cache_smaller_than_the_context(tiny_hf_model_dir, backend):
    """6 blocks (96 tokens) hold a 90-token prompt and 40 more tokens, prefilled in chunks
    of 32: only the window's blocks are kept, and the tokens are transformers'. Three such
    sequences at once need 9 blocks: preempted and recomputed, each keeps its tokens."""
    directory = tiny_hf_model_dir("mistral", sliding_window=WINDOW)
    llm = LLM(
        str(directory),
        dtype="float32",
        backend=backend,
        kv_cache_memory=6 * BLOCK_BYTES,
        max_num_batched_tokens=32,
    )
    core = llm.engine.core
    assert core.info.num_blocks == 6 and core.kv_cache.kv_window == WINDOW
    assert core.max_model_len == 512  # the cache holds a window and a chunk, not the context
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (n,), generator=generator).tolist() for n in (90, 57, 75)]
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    alone = [llm.generate([p], greedy)[0].outputs[0].token_ids for p in prompts]
    assert alone[0] == hf_greedy(directory, prompts[0], 40)
    together = llm.generate(prompts, greedy)
    assert [o.outputs[0].token_ids for o in together] == alone
    assert core.scheduler.num_preemptions > 0
    pool = core.kv_cache.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_blocks_behind_the_window_are_freed_as_a_sequence_advances(tiny_hf_model_dir):
    directory = tiny_hf_model_dir("mistral", sliding_window=WINDOW)
    llm = LLM(str(directory), dtype="float32", kv_cache_memory=64 * BLOCK_BYTES)
    core = llm.engine.core
    held = []
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    llm.engine.add_request("long", list(range(200, 260)), params)
    while core.has_unfinished:
        core.step()
        held.append(core.kv_cache.pool.num_blocks - core.kv_cache.pool.num_free_blocks)
    # the window (20 keys) spans at most 3 blocks of 16, plus the one being written
    assert max(held[1:]) <= 3
    assert held[-1] == 0


def test_a_model_with_global_layers_keeps_every_block(tiny_hf_model_dir):
    """Gemma 3's full-attention layers read the whole context: nothing is freed, and the
    context is what the cache holds."""
    directory = tiny_hf_model_dir(
        "gemma3_text",
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=WINDOW,
        query_pre_attn_scalar=24,
    )
    llm = LLM(str(directory), dtype="float32", kv_cache_memory=6 * BLOCK_BYTES)
    core = llm.engine.core
    assert core.kv_cache.kv_window is None
    assert core.max_model_len == 6 * 16
    prompt = torch.randint(100, 40000, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    assert llm.generate([prompt], greedy)[0].outputs[0].token_ids == hf_greedy(
        directory, prompt, 20
    )
