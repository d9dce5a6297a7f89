"""Hugging Face model directories: config.json, safetensors shards and the tokenizer beside them."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tokenmill.errors import ModelLoadError
from tokenmill.model.source import ModelSource
from tokenmill.tokenizer.tokenizer import Tokenizer

_INDEX = "model.safetensors.index.json"
_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_NOT_PARAMETERS = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed
_REQUIRED_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)


def load_hf_directory(path: Path, name: str) -> ModelSource:
    """A ModelSource over a transformers-style directory; raises ModelLoadError when unusable."""
    config = read_json(path / "config.json", "model config")
    shards = _index_shards(path)
    dtypes = Counter(dtype for _, dtype in shards.values())
    hf_config = normalize_hf_config(config, set(shards), dtypes.most_common(1)[0][0])
    tokenizer = load_hf_tokenizer(path, config)
    by_file: dict[Path, list[str]] = {}
    for weight_name, (file, _) in shards.items():
        by_file.setdefault(file, []).append(weight_name)

    def read_weights(skip: frozenset[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for weight_name in names:
                    if weight_name not in skip:
                        yield weight_name, f.get_tensor(weight_name)

    return ModelSource(
        name=name,
        path=str(path),
        file_format="safetensors",
        hf_config=hf_config,
        tokenizer=tokenizer,
        num_weights=len(shards),
        read_weights=read_weights,
    )


def read_json(file: Path, what: str) -> dict[str, Any]:
    if not file.is_file():
        raise ModelLoadError(f"{file.parent} has no {file.name} ({what})")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {file}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file} does not hold a JSON object")
    return data


def _safetensors_files(path: Path) -> tuple[list[Path], set[str] | None]:
    """The shard files, plus the weight names the index promises (None without an index)."""
    if (path / _INDEX).is_file():
        weight_map = read_json(path / _INDEX, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{path / _INDEX} has no weight_map")
        files = [path / file for file in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.is_file():
                raise ModelLoadError(f"{path / _INDEX} lists {file.name}, which is missing")
        return files, set(weight_map)
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"], None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
        found = f"only PyTorch pickles ({', '.join(sorted(pickled))})" if pickled else "no weights"
        raise ModelLoadError(
            f"{path} has {found}; tokenmill loads *.safetensors only "
            "(convert with transformers: from_pretrained(...).save_pretrained(...))"
        )
    return files, None


def _index_shards(path: Path) -> dict[str, tuple[Path, str]]:
    """weight name -> (shard file, stored dtype), from the shard headers alone."""
    files, promised = _safetensors_files(path)
    shards: dict[str, tuple[Path, str]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                keys: list[str] = f.keys()  # the handle itself is not iterable
                for key in keys:
                    if not key.endswith(_NOT_PARAMETERS):
                        shards[key] = (file, f.get_slice(key).get_dtype())
        except Exception as exc:  # safetensors raises SafetensorError for any bad header
            raise ModelLoadError(f"cannot read safetensors file {file}: {exc}") from exc
    if promised is not None and (missing := sorted(promised - set(shards))):
        raise ModelLoadError(f"{path / _INDEX} lists {missing[0]}, which no shard holds")
    if not shards:
        raise ModelLoadError(f"the safetensors files in {path} hold no tensors")
    return shards


def normalize_hf_config(
    config: dict[str, Any], weight_names: set[str], stored_dtype: str
) -> dict[str, Any]:
    """config.json with every key the engine reads filled in, in the pre-5.0 (rope_theta) form;
    a vision model's language model (`text_config`) filled in where it is."""
    text = config.get("text_config")
    if isinstance(text, dict):
        if "tie_word_embeddings" in config:  # the outer flag is the one transformers ties by
            text = {**text, "tie_word_embeddings": config["tie_word_embeddings"]}
        inner = normalize_hf_config(text, weight_names, stored_dtype)
        return {**config, "text_config": inner, "torch_dtype": inner["torch_dtype"]}
    for key in _REQUIRED_KEYS:
        if not isinstance(config.get(key), int):
            raise ModelLoadError(f"config.json lacks an integer '{key}'")
    out = dict(config)
    num_heads = config["num_attention_heads"]
    # transformers >= 5 writes rope_parameters = {rope_theta, rope_type, ...scaling}
    rope = config.get("rope_parameters") or {}
    out["rope_theta"] = float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    out["rope_scaling"] = _rope_scaling(config.get("rope_scaling") or rope)
    out["num_key_value_heads"] = config.get("num_key_value_heads") or num_heads
    out["head_dim"] = config.get("head_dim") or config["hidden_size"] // num_heads
    out["rms_norm_eps"] = config.get("rms_norm_eps") or 1e-6
    out["max_position_embeddings"] = config.get("max_position_embeddings") or 2048
    out["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False)) or not any(
        n.endswith("lm_head.weight") for n in weight_names
    )
    if "attention_bias" not in out:  # Qwen2 has q/k/v biases without saying so
        out["attention_bias"] = any(n.endswith("self_attn.q_proj.bias") for n in weight_names)
    out["torch_dtype"] = _DTYPES.get(stored_dtype) or str(
        config.get("torch_dtype") or config.get("dtype") or "float32"
    )
    return out


def _rope_scaling(scaling: dict[str, Any]) -> dict[str, Any] | None:
    """HF's rope_scaling dict keyed by "rope_type" (older configs say "type"), or None."""
    out = {k: v for k, v in scaling.items() if k not in ("rope_theta", "type")}
    out["rope_type"] = scaling.get("rope_type") or scaling.get("type") or "default"
    return None if out["rope_type"] == "default" else out


def load_hf_tokenizer(path: Path, config: dict[str, Any]) -> Tokenizer:
    """The directory's tokenizer via transformers (local files only), plus EOS ids and template."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {reason}") from exc
    generation = path / "generation_config.json"
    eos = (
        read_json(generation, "generation config").get("eos_token_id")
        if generation.is_file()
        else None
    )
    if eos is None:
        eos = config.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if hf.eos_token_id is not None:
        eos_ids.append(hf.eos_token_id)
    return Tokenizer(
        hf=hf,
        eos_token_ids=list(dict.fromkeys(int(i) for i in eos_ids)),
        chat_template=_chat_template(path, hf.chat_template),
        bos_token=hf.bos_token,
        eos_token=hf.eos_token,
    )


def _chat_template(path: Path, from_tokenizer: Any) -> str | None:
    """The default chat template: the tokenizer's, else chat_template.jinja / .json beside it."""
    template = from_tokenizer
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None and (path / "chat_template.json").is_file():
        template = read_json(path / "chat_template.json", "chat template").get("chat_template")
    if isinstance(template, dict):  # several named templates
        template = template.get("default")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
