"""Images through the engine equal transformers: LLaVA, Idefics3 (SmolVLM) and Qwen2.5-VL, tiny random
checkpoints with their real processors, float32, greedy.

Each family's prompts put images first, in the middle, last, and two in one prompt; the
engine's prompt ids must equal the processor's over the whole text, and its tokens
transformers' `generate`. Batching with text-only and other image requests, chunked
prefill through the image tokens, preemption, and the prefix cache (the same image hits,
another image never does) must not change a token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import placeholder
from tokenmill import LLM, SamplingParams
from tokenmill.errors import InvalidRequestError

FAMILIES = ("llava", "idefics3", "qwen2_5_vl")
# (the parity tests only: their engine path is LLaVA's)
ALL_FAMILIES = (*FAMILIES, "llava_full", "llava_next")
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
SMALL_KV = {"kv_cache_memory": 64 << 20}  # (the default, a tenth of the RAM, takes seconds to zero)
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


def prompt(family: str, text: str, images: list[Image.Image]) -> dict:
    text = chat(text.replace("<image>", placeholder(family)))
    return {"prompt": text, "add_special_tokens": False, "multi_modal_data": {"image": images}}


@pytest.fixture(scope="module")
def references(tiny_vision_model_dir):
    """family -> (its processor, or for Qwen2.5-VL its image processor and tokenizer; the
    transformers model) for the reference runs."""
    from transformers import (
        AutoImageProcessor,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    out = {}
    for family in ALL_FAMILIES:
        directory = str(tiny_vision_model_dir(family))
        model = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32)
        if family == "qwen2_5_vl":
            processor = (AutoImageProcessor.from_pretrained(directory),
                         AutoTokenizer.from_pretrained(directory))  # fmt: skip
        else:
            processor = AutoProcessor.from_pretrained(directory)
        out[family] = (processor, model.eval())
    return out


def _qwen_inputs(processor, text: str, images: list[Image.Image], **options) -> dict:
    """What Qwen2.5-VL's processor makes (one image pad per merged patch), without its video
    processor: the image pad repeated grid_t * grid_h * grid_w / 4 times."""
    image_processor, tokenizer = processor
    pixels = image_processor(images=images, return_tensors="pt", **options) if images else {}
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = iter((pixels["image_grid_thw"].prod(-1) // 4).tolist() if images else [])
    ids: list[int] = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        ids.extend([pad] * next(counts) if token == pad else [token])
    input_ids = torch.tensor([ids])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": (input_ids == pad).int(), **pixels}  # fmt: skip


@pytest.fixture(scope="module")
def llms(tiny_vision_model_dir):
    return {
        family: LLM(str(tiny_vision_model_dir(family)), dtype="float32", device="cpu", **SMALL_KV)
        for family in ALL_FAMILIES
    }


def reference(references, family: str, text: str, images: list[Image.Image], max_tokens=10):
    """(prompt ids, greedy output ids) from transformers."""
    processor, model = references[family]
    text = chat(text.replace("<image>", placeholder(family)))
    if family == "qwen2_5_vl":
        inputs = _qwen_inputs(processor, text, images)
    else:
        inputs = processor(text=text, images=images, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_tokens, do_sample=False, min_new_tokens=max_tokens
        )
    n = inputs["input_ids"].shape[1]
    return inputs["input_ids"][0].tolist(), out[0, n:].tolist()


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_greedy_tokens_match_transformers(llms, references, family, placement):
    text = PLACEMENTS[placement]
    images = IMAGES[: text.count("<image>")]
    want_prompt, want = reference(references, family, text, images)
    out = llms[family].generate(prompt(family, text, images), GREEDY)[0]
    assert out.prompt_token_ids == want_prompt
    assert list(out.outputs[0].token_ids) == want


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_with_text_and_other_images_equals_alone(llms, family):
    llm = llms[family]
    prompts = [
        prompt(family, PLACEMENTS["first"], [IMAGES[0]]),
        {"prompt": chat("Just text, no picture."), "add_special_tokens": False},  # no images
        prompt(family, PLACEMENTS["two"], [IMAGES[1], IMAGES[2]]),
        prompt(family, PLACEMENTS["last"], [IMAGES[2]]),
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
    llm = LLM(str(tiny_vision_model_dir(family)), dtype="float32", device="cpu", **SMALL_KV)
    text = "Here is a long description of the scene before the picture. " * 4 + "<image> Say it."
    a, b = image(10), image(11)  # same size: identical token ids, different pixels
    cold = llm.generate(prompt(family, text, [a]), GREEDY)[0]
    encoder_cache = llm.engine.core.executor.worker.runner.encoder_cache
    encoded = encoder_cache.num_encoded
    warm = llm.generate(prompt(family, text, [a]), GREEDY)[0]
    other = llm.generate(prompt(family, text, [b]), GREEDY)[0]
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
    cases = [(PLACEMENTS["middle"], [IMAGES[0]]), (PLACEMENTS["two"], [IMAGES[1], IMAGES[2]])]
    expected = [reference(references, family, text, imgs, 40) for text, imgs in cases]
    lengths = [len(prompt_ids) + 40 for prompt_ids, _ in expected]
    blocks = -(-max(lengths) // 16) + 1  # room for either request alone, not for both
    assert blocks * 16 < sum(lengths)
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # K and V, layers, block, KV heads, head dim, fp32
    llm = LLM(
        str(tiny_vision_model_dir(family)), dtype="float32", device="cpu",
        max_num_batched_tokens=8, kv_cache_memory=blocks * block_bytes,
        max_model_len=blocks * 16,
    )  # fmt: skip
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outs = llm.generate([prompt(family, t, imgs) for t, imgs in cases], long)
    assert llm.engine.core.scheduler.num_preemptions > 0
    for (_, want), out in zip(expected, outs, strict=True):
        assert list(out.outputs[0].token_ids) == want


def test_llm_chat_takes_pil_and_data_url_image_parts(llms, references):
    """LLM.chat with vLLM's image parts renders the template's placeholders and equals the
    same prompt given with multi_modal_data."""
    import base64
    import io

    family = "idefics3"
    buffer = io.BytesIO()
    IMAGES[1].save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [
        {"type": "image_pil", "image_pil": IMAGES[0]},
        {"type": "text", "text": " and "},
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": ": which is brighter?"},
    ]
    out = llms[family].chat([{"role": "user", "content": content}], GREEDY)[0]
    want = reference(references, family, PLACEMENTS["two"], [IMAGES[0], IMAGES[1]])[1]
    assert list(out.outputs[0].token_ids) == want
    # an http URL is fetched, as vLLM's LLM.chat does (any host: the script is the caller's)
    with _serving(buffer.getvalue()) as http_url:
        content[2] = {"type": "image_url", "image_url": {"url": http_url}}
        fetched = llms[family].chat([{"role": "user", "content": content}], GREEDY)[0]
    assert list(fetched.outputs[0].token_ids) == want


@contextlib.contextmanager
def _serving(body: bytes) -> Iterator[str]:
    """An http URL of `body` (a PNG) on a local server, while the block runs."""
    from http.server import BaseHTTPRequestHandler

    from tests.local_http import serving

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with serving(Handler) as url:
        yield f"{url}/picture.png"


def test_a_prompt_ending_in_image_tokens_recomputes_its_last_one_from_the_image(llms, references):
    """33 text tokens and an image's 16: the second run finds all but the last token cached
    (three full blocks); that one token, an image token computed alone like a decode step,
    still takes its row from the encoder."""
    family = "llava"
    processor, model = references[family]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    text = processor.tokenizer.encode("Describe this picture in a few words. " * 8)[:33]
    pixels = processor.image_processor(images=[IMAGES[2]], return_tensors="pt")["pixel_values"]
    input_ids = torch.tensor([text + [image_id] * 16])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels,
            max_new_tokens=6, min_new_tokens=6, do_sample=False,
        )  # fmt: skip
    want = out[0, input_ids.shape[1] :].tolist()
    request = {"prompt_token_ids": text + [image_id], "multi_modal_data": {"image": IMAGES[2]}}
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    cold, warm = (llms[family].generate(request, params)[0] for _ in range(2))
    assert len(warm.prompt_token_ids) == 49 and warm.num_cached_tokens == 48
    assert list(cold.outputs[0].token_ids) == want
    assert list(warm.outputs[0].token_ids) == want


def test_mm_processor_kwargs_reach_the_processor_and_the_image_hash(llms, references):
    """Qwen2.5-VL with a smaller max_pixels: fewer image tokens, as transformers' processor
    makes them, and a different image to the caches; an option the processor lacks is a 400."""
    family = "qwen2_5_vl"
    small = {"max_pixels": 16 * 16}
    request = prompt(family, PLACEMENTS["first"], [IMAGES[1]])
    default = llms[family].generate(request, GREEDY)[0]
    out = llms[family].generate({**request, "mm_processor_kwargs": small}, GREEDY)[0]
    assert len(out.prompt_token_ids) < len(default.prompt_token_ids)
    processor, model = references[family]
    text = chat(PLACEMENTS["first"].replace("<image>", placeholder(family)))
    inputs = _qwen_inputs(processor, text, [IMAGES[1]], **small)
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert out.prompt_token_ids == inputs["input_ids"][0].tolist()
    assert list(out.outputs[0].token_ids) == want[0, inputs["input_ids"].shape[1] :].tolist()
    with pytest.raises(InvalidRequestError, match="no option"):
        llms[family].generate({**request, "mm_processor_kwargs": {"nope": 1}}, GREEDY)


def test_qwen2_5_vl_with_the_hubs_flat_config(tiny_vision_model_dir, references, tmp_path):
    """The hub's Qwen2.5-VL config.json keeps the text model's keys at the top and M-RoPE in
    rope_scaling ({"type": "mrope", "mrope_section": ...}); the same weights give the same
    tokens as transformers."""
    import json
    import shutil

    family = "qwen2_5_vl"
    directory = tmp_path / "flat"
    shutil.copytree(tiny_vision_model_dir(family), directory)
    config = json.loads((directory / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    text.pop("model_type", None)
    config |= text | {
        "rope_theta": rope["rope_theta"],
        "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]},
    }
    (directory / "config.json").write_text(json.dumps(config))
    llm = LLM(str(directory), dtype="float32", device="cpu", **SMALL_KV)
    out = llm.generate(prompt(family, PLACEMENTS["two"], [IMAGES[0], IMAGES[1]]), GREEDY)[0]
    want = reference(references, family, PLACEMENTS["two"], [IMAGES[0], IMAGES[1]])[1]
    assert list(out.outputs[0].token_ids) == want


def test_an_option_the_image_processor_lacks_stops_the_load(tiny_vision_model_dir):
    from tokenmill.errors import ModelLoadError
    from tokenmill.model.loader import load_model_source
    from tokenmill.multimodal.processor import ImageProcessor

    directory = str(tiny_vision_model_dir("idefics3"))
    source = load_model_source(directory)
    args = (directory, source.hf_config, source.tokenizer)
    assert ImageProcessor(*args, {"do_image_splitting": False}).kwargs == {
        "do_image_splitting": False
    }
    with pytest.raises(ModelLoadError, match="no option nope"):
        ImageProcessor(*args, {"nope": 1})
