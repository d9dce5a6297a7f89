"""Vision-encoder benchmark: what one image costs before the first token, on this machine.

For each shape a random-weight LLaVA-style checkpoint (vision tower, 2-layer MLP projector,
Llama language model; transformers' own config, processor and save_pretrained, the bundled
SmolLM2 tokenizer plus an "<image>" token) is saved to a temporary directory and loaded by
the offline LLM. Random weights suffice: only the time is measured. Then, per shape:

- the image processor's time for one new picture (resize, normalise, expand the placeholder,
  content hash: `ImageProcessor.expand`), which TTFT pays before the encoder;
- the encoder's time for one image: `model.embed_images([data])` on the processor's outputs
  for a 640x480 random picture, one warm-up, then the median [min-max] of --runs calls;
- TTFT of one chat request with one image (max_tokens=1), every run a different picture so
  that neither the encoder cache nor the prefix cache (off as well) can hit, and TTFT of the
  same text without the image, the runs interleaved so that a busy machine slows both alike;
- the encoder's share of TTFT (median encoder time / median TTFT with the image), the number
  of image tokens and the prompt tokens with and without the image.

Shapes: `tiny` is the tests' checkpoint (CLIP 32 px, 8 px patches, 16 image tokens; Llama
hidden 64, 2 layers); `siglip-400m` is SigLIP-SO400M at 384 px (patch 14: 729 image tokens,
"full" features of the last layer) with the SmolLM2-135M language model, ~560M parameters.
Progress goes to stderr, with the load average before and after each measurement: another
busy process on a small machine stalls every multi-threaded op (TTFT doubled in such runs),
so only a quiet run's figures compare; `--threads 1` is far less sensitive. The markdown
table goes to stdout.

python -m tokenmill.bench.vision [--shape tiny|siglip-400m|all] [--runs 5]
    [--dtype float32 [bfloat16]] [--threads N]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:  # imported when the benchmark runs: `tokenmill --help` stays fast
    from PIL.Image import Image

    from tokenmill.llm import LLM

SHAPES = ("tiny", "siglip-400m")
IMAGE_SIZE = (640, 480)  # a photo-sized picture: the processor's resize is part of the work
QUESTION = "Describe this picture in one sentence."
COLUMNS = (
    "shape",
    "dtype",
    "threads",
    "image tokens",
    "prompt tokens (with image / text only)",
    "preprocess ms/image",
    "encoder ms/image, median [min-max]",
    "TTFT with image, ms",
    "TTFT text only, ms",
    "encoder share of TTFT",
)
# the tests' chat template: the image before the text of its message
_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class Result:
    """One shape's measurements (milliseconds), each list one value per run."""

    shape: str
    dtype: str
    threads: int
    image_tokens: int
    prompt_tokens_image: int
    prompt_tokens_text: int
    preprocess_ms: list[float] = field(default_factory=list)
    encoder_ms: list[float] = field(default_factory=list)
    ttft_image_ms: list[float] = field(default_factory=list)
    ttft_text_ms: list[float] = field(default_factory=list)

    @property
    def encoder_share(self) -> float:
        return statistics.median(self.encoder_ms) / statistics.median(self.ttft_image_ms)


def progress(line: str) -> None:
    print(f"bench vision: {line}", file=sys.stderr, flush=True)


def random_image(seed: int, size: tuple[int, int] = IMAGE_SIZE) -> Image:
    """Uniform noise: a different seed is a different picture, hence an encoder cache miss."""
    import numpy as np
    from PIL import Image as PILImage

    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return PILImage.fromarray(pixels)


def save_checkpoint(shape: str, directory: Path) -> Path:
    """A random-weight LLaVA checkpoint of `shape` with its real processor, as transformers
    saves one (so the engine loads it exactly as it would a hub download)."""
    import torch
    import transformers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from tokenmill.model.loader import bundled_model_path

    gguf = Path(bundled_model_path())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    if shape == "tiny":  # tests/conftest.py's LLaVA
        text = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        vision: Any = transformers.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, projection_dim=32,
        )  # fmt: skip
        layer, strategy, extra_tokens, patch = -2, "default", 1, 8
        image_processor: Any = transformers.CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
        save_dtype = torch.float32
    elif shape == "siglip-400m":  # SigLIP-SO400M/14 at 384 px + SmolLM2-135M
        text = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536,
            num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
            max_position_embeddings=8192, rms_norm_eps=1e-5,
            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        # no attention-pooling head: a VLM takes the patch features, not the pooled vector
        vision = transformers.SiglipVisionConfig(
            hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
            num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False,
        )  # fmt: skip
        layer, strategy, extra_tokens, patch = -1, "full", 0, 14
        image_processor = transformers.SiglipImageProcessorPil(size={"height": 384, "width": 384})
        save_dtype = torch.bfloat16  # 1.1 GB on disk instead of 2.3; loaded as asked
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    fields: dict[str, Any] = dict(
        vision_config=vision, text_config=text, image_token_id=image_id,
        vision_feature_layer=layer, vision_feature_select_strategy=strategy,
        tie_word_embeddings=text.tie_word_embeddings,
    )  # fmt: skip
    torch.manual_seed(0)
    model: Any = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**fields))
    model.to(save_dtype)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(str(directory))
    del model
    processor = transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
        vision_feature_select_strategy=strategy, chat_template=_TEMPLATE,
        num_additional_image_tokens=extra_tokens,
    )  # fmt: skip
    processor.save_pretrained(str(directory))
    return directory


def chat_prompt(with_image: bool) -> str:
    image = "<image>" if with_image else ""
    return f"<|im_start|>user\n{image}{QUESTION}<|im_end|>\n<|im_start|>assistant\n"


def timed_generate(llm: LLM, image: Image | None) -> tuple[float, int]:
    """(ms to the first token, prompt tokens) of one request: max_tokens=1, so the whole
    call is the image processor, the encoder and the prefill."""
    prompt: dict[str, Any] = {"prompt": chat_prompt(image is not None), "add_special_tokens": False}
    if image is not None:
        prompt["multi_modal_data"] = {"image": [image]}
    params = SamplingParams(temperature=0.0, max_tokens=1)
    started = time.perf_counter()
    (output,) = llm.generate(prompt, params, use_tqdm=False)
    return (time.perf_counter() - started) * 1e3, len(output.prompt_token_ids or [])


def measure(llm: LLM, shape: str, dtype: str, runs: int) -> Result:
    """The encoder alone, then TTFT with and without an image, on a loaded LLM."""
    import torch

    from tokenmill.executor.uniproc import UniprocExecutor

    executor = llm.engine.core.executor
    assert isinstance(executor, UniprocExecutor), "times the encoder in this process"
    model: Any = executor.worker.model
    cache = executor.worker.runner.encoder_cache
    processor = llm.engine.image_processor
    assert processor is not None and cache is not None, "a vision model"
    placeholder = llm.tokenizer.encode(processor.placeholder, add_special_tokens=False)
    _, (image_input,) = processor.expand(placeholder, [random_image(0)], "image")  # warm-up
    preprocess_ms = []
    for run in range(runs):  # the processor (resize, normalise, expand) and the content hash
        image = random_image(200 + run)
        started = time.perf_counter()
        processor.expand(placeholder, [image], "image")
        preprocess_ms.append((time.perf_counter() - started) * 1e3)
    data = image_input.data
    progress(f"{shape}: encoder, 1 warm-up + {runs} runs ({image_input.num_embeds} rows each)")
    model.embed_images([data])
    encoder_ms = []
    for _ in range(runs):
        started = time.perf_counter()
        model.embed_images([data])
        encoder_ms.append((time.perf_counter() - started) * 1e3)
    progress(
        f"{shape}: preprocessing median {statistics.median(preprocess_ms):.1f} ms, encoder "
        f"median {statistics.median(encoder_ms):.1f} ms"
    )

    progress(f"{shape}: TTFT, 1 warm-up + {runs} runs with a new image each, and text only")
    timed_generate(llm, random_image(1))
    timed_generate(llm, None)
    result = Result(
        shape, dtype, torch.get_num_threads(), image_input.num_embeds, 0, 0,
        preprocess_ms=preprocess_ms, encoder_ms=encoder_ms,
    )  # fmt: skip
    for run in range(runs):
        encoded = cache.num_encoded
        ms, result.prompt_tokens_image = timed_generate(llm, random_image(100 + run))
        if cache.num_encoded != encoded + 1:  # the figure must include the encoder
            raise RuntimeError("the encoder cache hit an image it was not meant to have seen")
        result.ttft_image_ms.append(ms)
        ms, result.prompt_tokens_text = timed_generate(llm, None)
        result.ttft_text_ms.append(ms)
        progress(
            f"{shape}: run {run + 1}/{runs}: TTFT {result.ttft_image_ms[-1]:.1f} ms with the "
            f"image, {ms:.1f} ms text only"
        )
    return result


def bench_shape(shape: str, dtypes: list[str], runs: int, threads: int | None) -> list[Result]:
    """Save the shape's checkpoint, then load and measure it in each dtype."""
    from tokenmill.llm import LLM

    results = []
    with tempfile.TemporaryDirectory(prefix=f"tokenmill-vision-{shape}-") as tmp:
        progress(f"{shape}: saving a random checkpoint to {tmp}")
        started = time.perf_counter()
        directory = save_checkpoint(shape, Path(tmp))
        progress(f"{shape}: saved in {time.perf_counter() - started:.1f} s")
        for dtype in dtypes:
            started = time.perf_counter()
            llm = LLM(
                str(directory), dtype=dtype, device="cpu", cpu_threads=threads,
                enable_prefix_caching=False, max_model_len=1024, kv_cache_memory=256 << 20,
            )  # fmt: skip
            progress(f"{shape}: loaded in {dtype} in {time.perf_counter() - started:.1f} s")
            progress(f"load average before: {_load()}")
            results.append(measure(llm, shape, dtype, runs))
            progress(f"load average after: {_load()} (other busy processes slow every figure)")
            del llm
            gc.collect()
    return results


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"


def format_table(results: list[Result]) -> str:
    """A markdown table, one row per shape and dtype."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in results:
        cells = (
            r.shape,
            r.dtype,
            str(r.threads),
            str(r.image_tokens),
            f"{r.prompt_tokens_image} / {r.prompt_tokens_text}",
            _ms(r.preprocess_ms),
            _ms(r.encoder_ms),
            _ms(r.ttft_image_ms),
            _ms(r.ttft_text_ms),
            f"{r.encoder_share:.0%}",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenmill.bench.vision", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    shapes = list(SHAPES) if args.shape == "all" else [args.shape]
    results = [
        r for shape in shapes for r in bench_shape(shape, args.dtype, args.runs, args.threads)
    ]
    print(format_table(results))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each measurement")
    parser.add_argument(
        "--dtype", nargs="+", choices=["float32", "bfloat16"], default=["float32"],
        help="load the checkpoint in each of these (one row each)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads for torch and the kernels (default: the engine's)",
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
