"""The engine: requests, KV cache, scheduler, the step loop and its async front."""
