"""Tensor parallelism on one node: the leader rank (0) in this process, one follower
process per other rank (`python -m tokenmill.executor.follower`), joined in a
torch.distributed group (gloo on CPU, NCCL on CUDA).

The engine above sees one executor: the leader's runner prepares each step, broadcasts
it, runs its shard of the forward (the layers all-reduce between ranks) and samples from
the logits the ranks gather to it. A follower that exits or hangs fails the step in
flight (PeerError, fatal to the engine) or, while the server is idle, is noticed by a
watcher thread: `check_health()` then raises and the engine stops.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import threading
import time
import weakref
from dataclasses import replace

import torch

from tokenmill.backends.device import kv_cache_bytes, resolve_device
from tokenmill.config import CacheConfig, ModelConfig
from tokenmill.distributed.group import (
    DEFAULT_TIMEOUT_S,
    ParallelGroup,
    PeerError,
    create_group,
)
from tokenmill.distributed.process import failure_line, free_port, start_child, stop_children
from tokenmill.errors import ModelLoadError
from tokenmill.executor.base import Executor, ModelInfo
from tokenmill.executor.follower import EXIT_PEER_GONE, FollowerSpec
from tokenmill.model.source import ModelSource
from tokenmill.structured.manager import StructuredOutputManager
from tokenmill.worker.inputs import ModelOutput, ScheduledSequence
from tokenmill.worker.worker import Worker

logger = logging.getLogger(__name__)

_STOP_WAIT_S = 10.0  # how long followers get to leave after "stop" before SIGKILL


class MultiprocExecutor(Executor):
    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        source: ModelSource,
        grammars: StructuredOutputManager | None,
        tensor_parallel_size: int,
    ):
        size = tensor_parallel_size
        device = resolve_device(model_config.device)
        model_config, cache_config = _per_rank(model_config, cache_config, device, size)
        port = free_port()
        self.failure: str | None = None  # why the group broke, once it has
        self._stopping = threading.Event()
        self.followers = [
            start_child(
                "tokenmill.executor.follower",
                FollowerSpec(
                    rank,
                    size,
                    "127.0.0.1",
                    port,
                    source.path,
                    model_config,
                    cache_config,
                    DEFAULT_TIMEOUT_S,
                ),  # fmt: skip
            )
            for rank in range(1, size)
        ]
        stopping = self._stopping
        self._finalizer = weakref.finalize(self, _stop_followers, self.followers, None, stopping)
        try:
            self.tp: ParallelGroup = create_group(0, size, "127.0.0.1", port, device)
            self._finalizer.detach()
            self._finalizer = weakref.finalize(
                self, _stop_followers, self.followers, self.tp, stopping
            )
            self.worker = Worker(model_config, cache_config, source, grammars, self.tp)
        except (PeerError, ModelLoadError, RuntimeError) as e:
            reason = self._followers_failure() or str(e)
            self.shutdown()
            raise ModelLoadError(f"tensor-parallel load failed: {reason}") from None
        except BaseException:
            self.shutdown()
            raise
        threading.Thread(target=self._watch, name="tokenmill-tp-watch", daemon=True).start()
        worker = self.worker
        self.info = ModelInfo(
            arch=worker.model.config,
            num_parameters=worker.num_parameters,
            device=worker.device,
            dtype=worker.dtype,
            quantization=worker.quantization,
            cpu_threads=worker.cpu_threads,
            num_blocks=worker.num_blocks,
            kv_cache_bytes=worker.kv_cache_bytes * size,
            kv_cache_dtype=worker.kv_cache_dtype,
            tensor_parallel_size=size,
        )
        logger.info(
            "tensor parallel: %d ranks (%s), followers pid %s",
            size, "nccl" if device.type == "cuda" else "gloo",
            ", ".join(str(p.pid) for p in self.followers),
        )  # fmt: skip

    def execute(self, scheduled: list[ScheduledSequence]) -> ModelOutput:
        self.check_health()
        try:
            return self.worker.execute(scheduled)
        except PeerError as e:
            self.failure = self.failure or str(e)  # the group is broken for good
            raise

    def logits_for(self, scheduled: list[ScheduledSequence]) -> torch.Tensor:
        self.check_health()
        try:
            return self.worker.runner.logits_for(scheduled)
        except PeerError as e:
            self.failure = self.failure or str(e)
            raise

    def forget(self, request_id: str) -> None:
        self.worker.forget(request_id)

    def check_health(self) -> None:
        if self.failure is not None:
            raise PeerError(self.failure)

    def shutdown(self) -> None:
        """Stop the followers (a "stop" step, then SIGKILL for any that stay) and drop the
        group."""
        if self._stopping.is_set():
            return
        self._finalizer.detach()
        _stop_followers(self.followers, getattr(self, "tp", None), self._stopping)

    def _watch(self) -> None:
        """Notice a follower that exits while this process lives (idle or not)."""
        sentinels = {p.pid: p for p in self.followers}
        while sentinels and not self._stopping.is_set():
            for pid, process in list(sentinels.items()):
                code = process.poll()
                if code is None:
                    continue
                del sentinels[pid]
                if self._stopping.is_set():
                    return
                self.failure = f"tensor-parallel worker (pid {pid}) exited with code {code}" + (
                    f": {reason}" if (reason := failure_line(process)) else ""
                )
                logger.error("%s; the engine stops", self.failure)
                return
            time.sleep(0.2)

    def _followers_failure(self) -> str | None:
        """What a follower that failed at load said, waiting briefly for it to say it."""
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            for process in self.followers:
                code = process.poll()
                if code is not None and code != EXIT_PEER_GONE:
                    return failure_line(process) or f"a worker exited with code {code}"
            time.sleep(0.1)
        return None


def _per_rank(
    model_config: ModelConfig, cache_config: CacheConfig, device: torch.device, size: int
) -> tuple[ModelConfig, CacheConfig]:
    """On a CPU the ranks share the machine: each gets its share of the threads and of the
    KV cache memory (which then holds as many tokens as one process would)."""
    if device.type != "cpu":
        return model_config, cache_config
    if model_config.cpu_threads is None:
        threads = max(1, torch.get_num_threads() // size)
        model_config = replace(model_config, cpu_threads=threads)
    budget = kv_cache_bytes(cache_config, device) // size
    return model_config, replace(cache_config, kv_cache_memory=budget)


def _stop_followers(
    followers: list[subprocess.Popen[bytes]],
    tp: ParallelGroup | None,
    stopping: threading.Event,
) -> None:
    stopping.set()
    if tp is not None and tp.pg is not None and all(p.poll() is None for p in followers):
        with contextlib.suppress(PeerError):
            tp.broadcast_object(("stop", None))
    stop_children(followers, _STOP_WAIT_S)
    if tp is not None:
        tp.close()
