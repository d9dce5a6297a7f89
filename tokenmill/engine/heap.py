"""The garbage collector as a serving process sets it (the server, a data-parallel engine
process, and the host-overhead benchmark, which measures the engine as it serves).

Two settings, once the model is loaded:
- What is loaded by then (model, tokenizer, app) lives as long as the process: frozen out
  of the collector's full passes, which would otherwise walk it while serving.
- A step at batch 256 makes ~1,500 objects that live until the next (scheduled sequences,
  outputs). At Python's default young threshold (700) a young collection runs two or three
  times a step, walks them all and moves them to an older generation, to be walked again;
  at 20,000 it runs every dozen steps and finds most of them already freed. Host overhead
  per step at batch 256: 1.46 -> 1.32 ms (docs/benchmarks.md, "Host overhead per step").
  Garbage in reference cycles waits a little longer; nothing the engine makes per step has
  cycles.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000


def settle_heap() -> None:
    """Freeze what is loaded and raise the young generation's threshold (call once, after
    loading; for the whole process)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
