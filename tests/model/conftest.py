"""The bundled model behind the offline API, shared by the engine-level tests (transformers'
reference, `hf_reference`, is tests/conftest.py's)."""

import pytest


@pytest.fixture(scope="session")
def bundled_llm(bundled_gguf_path):
    """The bundled model in float32 behind the offline API: PyTorch's matmuls over exact
    weights, for the tests that hold outputs to float32's."""
    from tokenmill import LLM

    return LLM(bundled_gguf_path, dtype="float32", kv_cache_memory=256 << 20)


@pytest.fixture(scope="session")
def default_llm(bundled_gguf_path):
    """The bundled model as `tokenmill serve` runs it on a CPU (its GGUF blocks through the
    native kernels): ~5x float32's speed, for the tests of what the engine does with any
    model's tokens."""
    from tokenmill import LLM

    return LLM(bundled_gguf_path, kv_cache_memory=256 << 20)
