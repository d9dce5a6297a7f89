"""tokenmill: an LLM inference engine with an OpenAI-compatible server."""

from typing import TYPE_CHECKING, Any

from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import (
    BeamSearchParams,
    GuidedDecodingParams,
    SamplingParams,
    StructuredOutputsParams,
)

if TYPE_CHECKING:
    from tokenmill.llm import LLM, TextPrompt, TokensPrompt

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "BeamSearchParams",
    "GuidedDecodingParams",
    "PoolingParams",
    "SamplingParams",
    "StructuredOutputsParams",
    "TextPrompt",
    "TokensPrompt",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # LLM pulls in torch and the model code; import it only when asked for.
    if name in ("LLM", "TextPrompt", "TokensPrompt"):
        from tokenmill import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
