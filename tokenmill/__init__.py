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
    from tokenmill.engine.outputs import CompletionOutput, PoolingRequestOutput, RequestOutput
    from tokenmill.engine.scoring import ScoringRequestOutput
    from tokenmill.llm import LLM, TextPrompt, TokensPrompt

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "BeamSearchParams",
    "CompletionOutput",
    "GuidedDecodingParams",
    "PoolingParams",
    "PoolingRequestOutput",
    "RequestOutput",
    "SamplingParams",
    "ScoringRequestOutput",
    "StructuredOutputsParams",
    "TextPrompt",
    "TokensPrompt",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # LLM and the outputs pull in torch and the model code; import them only when asked for.
    if name in ("LLM", "TextPrompt", "TokensPrompt"):
        from tokenmill import llm

        return getattr(llm, name)
    if name in ("CompletionOutput", "PoolingRequestOutput", "RequestOutput"):
        from tokenmill.engine import outputs

        return getattr(outputs, name)
    if name == "ScoringRequestOutput":
        from tokenmill.engine import scoring

        return scoring.ScoringRequestOutput
    raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
