"""The model's own sampling defaults, from its generation_config.json (vLLM's
`--generation-config`): they apply to requests that leave those fields unset."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tokenmill.errors import ModelLoadError, TokenmillError
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

FILE = "generation_config.json"
# generation_config.json field -> SamplingParams field (vLLM reads the same ones)
FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def sampling_defaults(setting: str, model_path: str) -> dict[str, Any]:
    """SamplingParams field -> default. `setting`: "auto" reads the model directory's file
    (none for a GGUF file, or a directory without one), "vllm" ignores it, anything else is
    a directory holding one. Values a SamplingParams would reject fail the load."""
    if setting == "vllm":
        return {}
    if setting == "auto":
        directory = Path(model_path)
        if not directory.is_dir() or not (directory / FILE).is_file():
            return {}
    else:
        directory = Path(setting)
        if not (directory / FILE).is_file():
            raise ModelLoadError(f"--generation-config {setting!r}: no {FILE} in that directory")
    file = directory / FILE
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{file}: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file}: not a JSON object")
    defaults = {FIELDS[k]: v for k, v in data.items() if k in FIELDS and v is not None}
    try:
        SamplingParams(**defaults)
    except (TokenmillError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{file}: {e}") from None
    if defaults:
        shown = ", ".join(f"{k}={v}" for k, v in defaults.items())
        logger.info(
            "sampling defaults from the model's %s for requests that leave them unset: %s "
            "(--generation-config vllm ignores them)",
            FILE,
            shown,
        )
    return defaults
