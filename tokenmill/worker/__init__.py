"""The worker layer: one device's model, KV cache tensors and sampler (worker.py), and the
runner that turns a step's scheduled sequences into tokens (model_runner.py)."""
