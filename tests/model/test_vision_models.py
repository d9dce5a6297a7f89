"""Images through the engine equal transformers: LLaVA and Idefics3 (SmolVLM), tiny random
checkpoints with their real processors, float32, greedy.

Each family's prompts put images first, in the middle, last, and two in one prompt; the
engine's prompt ids must equal the processor's over the whole text, and its tokens
transformers' `generate`. Batching with text-only and other image requests, chunked
prefill through the image tokens, preemption, and the prefix cache (the same image hits,
another image never does) must not change a token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tokenmill import LLM, SamplingParams

FAMILIES = ("llava", "idefics3")
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PLACEMENTS = {
    "first": "<image>Describe the picture.",
    "middle": "Look at <image> and tell me what it is.",
    "last": "What is in this picture? <image>",
    "two": "<image> and <image>: which is brighter?",
}


def image(seed: int, size: tuple[int, int] = (50, 40)) -> Image.Image:
    pixels = np.random.RandomState(seed).rand(size[1], size[0], 3) * 255
    return Image.fromarray(pixels.astype("uint8"))


IMAGES = [image(0), image(1, (70, 45)), image(2, (33, 60))]


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def prompt(text: str, images: list[Image.Image]) -> dict:
    return {
        "prompt": chat(text),
        "add_special_tokens": False,
        "multi_modal_data": {"image": images},
    }


@pytest.fixture(scope="module")
def references(tiny_vision_model_dir):
    """family -> (transformers' processor, model) for the reference runs."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = {}
    for family in FAMILIES:
        directory = tiny_vision_model_dir(family)
        model = AutoModelForImageTextToText.from_pretrained(str(directory), dtype=torch.float32)
        out[family] = (AutoProcessor.from_pretrained(str(directory)), model.eval())
    return out


@pytest.fixture(scope="module")
def llms(tiny_vision_model_dir):
    return {
        family: LLM(str(tiny_vision_model_dir(family)), dtype="float32", device="cpu")
        for family in FAMILIES
    }


def reference(references, family: str, text: str, images: list[Image.Image], max_tokens=10):
    """(prompt ids, greedy output ids) from transformers."""
    processor, model = references[family]
    inputs = processor(
        text=chat(text), images=images, return_tensors="pt", add_special_tokens=False
    )
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_tokens, do_sample=False, min_new_tokens=max_tokens
        )
    n = inputs["input_ids"].shape[1]
    return inputs["input_ids"][0].tolist(), out[0, n:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_greedy_tokens_match_transformers(llms, references, family, placement):
    text = PLACEMENTS[placement]
    images = IMAGES[: text.count("<image>")]
    want_prompt, want = reference(references, family, text, images)
    out = llms[family].generate(prompt(text, images), GREEDY)[0]
    assert out.prompt_token_ids == want_prompt
    assert list(out.outputs[0].token_ids) == want


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_with_text_and_other_images_equals_alone(llms, family):
    llm = llms[family]
    prompts = [
        prompt(PLACEMENTS["first"], [IMAGES[0]]),
        {"prompt": chat("Just text, no picture."), "add_special_tokens": False},
        prompt(PLACEMENTS["two"], [IMAGES[1], IMAGES[2]]),
        prompt(PLACEMENTS["last"], [IMAGES[2]]),
    ]
    alone = [llm.generate(p, GREEDY)[0].outputs[0].token_ids for p in prompts]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert together == alone


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_shares_blocks_of_the_same_image_only(
    tiny_vision_model_dir, references, family
):
    """A long text, then the image: a second request with the same image reuses the blocks
    holding its tokens; one with another image (same size, so the same placeholder tokens)
    reuses only the text's blocks before it, and both equal transformers."""
    llm = LLM(str(tiny_vision_model_dir(family)), dtype="float32", device="cpu")
    text = "Here is a long description of the scene before the picture. " * 4 + "<image> Say it."
    a, b = image(10), image(11)  # same size: identical token ids, different pixels
    cold = llm.generate(prompt(text, [a]), GREEDY)[0]
    encoder_cache = llm.engine.core.executor.worker.runner.encoder_cache
    encoded = encoder_cache.num_encoded
    warm = llm.generate(prompt(text, [a]), GREEDY)[0]
    other = llm.generate(prompt(text, [b]), GREEDY)[0]
    image_start = _first_image_position(llm, cold.prompt_token_ids)
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
    assert warm.num_cached_tokens > image_start  # blocks past the image's first token reused
    assert other.prompt_token_ids == cold.prompt_token_ids
    assert 0 < other.num_cached_tokens <= image_start
    assert list(other.outputs[0].token_ids) == reference(references, family, text, [b])[1]
    assert list(cold.outputs[0].token_ids) == reference(references, family, text, [a])[1]
    # the warm request's image was not encoded again; the other image was
    assert encoder_cache.num_encoded == encoded + 1


def _first_image_position(llm: LLM, prompt_ids: list[int]) -> int:
    processor = llm.engine.image_processor
    assert processor is not None
    return prompt_ids.index(processor.image_token_id)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_and_preemption_through_image_tokens(
    tiny_vision_model_dir, references, family
):
    """8-token chunks split every image's tokens over several steps; a KV cache too small
    for both requests' growth preempts one of them, which is recomputed (its image
    re-inserted) and still equals transformers."""
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # K and V, layers, block, KV heads, head dim, fp32
    llm = LLM(
        str(tiny_vision_model_dir(family)), dtype="float32", device="cpu",
        max_num_batched_tokens=8, kv_cache_memory=8 * block_bytes, max_model_len=128,
    )  # fmt: skip
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    cases = [(PLACEMENTS["middle"], [IMAGES[0]]), (PLACEMENTS["two"], [IMAGES[1], IMAGES[2]])]
    outs = llm.generate([prompt(t, imgs) for t, imgs in cases], long)
    assert llm.engine.core.scheduler.num_preemptions > 0
    for (text, imgs), out in zip(cases, outs, strict=True):
        assert list(out.outputs[0].token_ids) == reference(references, family, text, imgs, 40)[1]
