"""The OpenAI-compatible HTTP server and the `tokenmill` command line."""
