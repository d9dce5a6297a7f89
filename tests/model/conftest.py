"""The bundled model behind the offline API, shared by the engine-level tests (transformers'
reference, `hf_reference`, is tests/conftest.py's)."""

import pytest


@pytest.fixture(scope="session")
def bundled_llm(bundled_gguf_path):
    """The bundled model in float32 behind the offline API, shared by the engine-level tests."""
    from tokenmill import LLM

    return LLM(bundled_gguf_path, dtype="float32", kv_cache_memory=256 << 20)
