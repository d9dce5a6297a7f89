"""Tokenizer loading, sandboxed chat templates and incremental detokenization."""
