"""The tokenizer of a GGUF file: converted by transformers once, then cached as tokenizer.json."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from tokenmill.errors import ModelLoadError
from tokenmill.model.gguf_reader import GGUFFile, StringArray
from tokenmill.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Bump when what this module stores in the cache changes shape.
_CACHE_FORMAT = "1"

# Ids that end a turn besides EOS: end-of-turn (Llama 3 <|eot_id|>) and end-of-message (tool calls).
_EOS_KEYS = (
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
)


def tokenizer_cache_dir() -> Path:
    """Where converted GGUF tokenizers are kept: $XDG_CACHE_HOME/tokenmill/tokenizers."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(root).expanduser() / "tokenmill" / "tokenizers"


def load_gguf_tokenizer(gguf_file: GGUFFile) -> Tokenizer:
    """The file's tokenizer, identical to transformers' `from_pretrained(..., gguf_file=...)`."""
    hf = _load_hf_tokenizer(gguf_file)
    template = gguf_file.metadata.get("tokenizer.chat_template")
    if not isinstance(template, str):
        template = hf.chat_template if isinstance(hf.chat_template, str) else None
    return Tokenizer(
        hf=hf,
        eos_token_ids=_eos_token_ids(gguf_file.metadata, hf.eos_token_id),
        chat_template=template,
        bos_token=hf.bos_token,
        eos_token=hf.eos_token,
    )


def _eos_token_ids(metadata: dict[str, Any], hf_eos_id: int | None) -> list[int]:
    ids = [int(metadata[key]) for key in _EOS_KEYS if isinstance(metadata.get(key), int)]
    if hf_eos_id is not None:
        ids.append(int(hf_eos_id))
    return list(dict.fromkeys(ids))


def _cache_key(gguf_file: GGUFFile) -> str:
    """Hash of the header (vocabulary, merges, special ids, template) and the converter versions."""
    import tokenizers
    import transformers

    digest = hashlib.sha256(gguf_file.metadata_bytes())
    for part in (_CACHE_FORMAT, transformers.__version__, tokenizers.__version__):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:32]


def _load_hf_tokenizer(gguf_file: GGUFFile) -> Any:
    from transformers import PreTrainedTokenizerFast

    cached = tokenizer_cache_dir() / _cache_key(gguf_file)
    if (cached / "tokenizer.json").is_file():
        try:
            return PreTrainedTokenizerFast.from_pretrained(str(cached), local_files_only=True)
        except Exception as exc:  # a damaged cache entry is rebuilt, never fatal
            logger.warning("ignoring unreadable tokenizer cache %s: %s", cached, exc)
    # AutoTokenizer would first parse the whole file again for its config; the class it
    # picks for a GGUF is this one, whose gguf_file path builds the same backend faster
    # (docs/benchmarks.md, "Loading").
    path = Path(gguf_file.path)
    try:
        hf = PreTrainedTokenizerFast.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot build the tokenizer of GGUF file {path}: {reason}") from exc
    _store(hf, cached)
    return hf


def _store(hf: Any, target: Path) -> None:
    """Save atomically (write a sibling, then rename) so a concurrent reader never sees half."""
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(str(staging))
        os.rename(staging, target)
    except (
        OSError
    ) as exc:  # read-only home, a racing writer that won: the next start converts again
        logger.debug("not caching the GGUF tokenizer at %s: %s", target, exc)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def token_count(gguf_file: GGUFFile) -> int | None:
    """Size of the vocabulary the file lists, or None when it has no tokenizer."""
    tokens = gguf_file.metadata.get("tokenizer.ggml.tokens")
    return tokens.count if isinstance(tokens, StringArray) else None
