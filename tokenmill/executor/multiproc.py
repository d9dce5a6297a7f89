"""Several processes run the model: tensor parallelism (every rank holds a shard of every
layer) or pipeline parallelism (every rank holds a run of layers), the leader rank (0) in
this process and a follower for every other rank, joined in a torch.distributed group (gloo
on CPU, NCCL on CUDA).

Followers are started by the backend named by --distributed-executor-backend: `mp`, child
processes on this machine (`python -m tokenmill.executor.follower`); `ray`, Ray actors on
the cluster's nodes (executor/ray_followers.py); `external_launcher`, processes torchrun
started (they join through its env:// rendezvous; this process is rank 0).

The engine above sees one executor: the leader's runner prepares each step, broadcasts
it, runs its part of the forward and samples. A follower that exits or hangs fails the
step in flight (PeerError, fatal to the engine) or, while the server is idle, is noticed by
a watcher thread: `check_health()` then raises and the engine stops.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import weakref
from dataclasses import replace
from typing import Protocol

import torch

from tokenmill.backends.device import (
    cgroup_cpu_quota,
    check_kv_cache_fits,
    configure_cpu_threads,
    kv_cache_bytes,
    resolve_device,
)
from tokenmill.config import CacheConfig, DistributedBackend, ModelConfig
from tokenmill.distributed.group import (
    DEFAULT_TIMEOUT_S,
    ParallelGroup,
    PeerError,
    create_group,
    from_environment,
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

_STOP_WAIT_S = 10.0  # how long followers get to leave after "stop" before they are killed


class Followers(Protocol):
    describe: str  # for the log: pids, nodes

    def failed(self) -> str | None:
        """Why a follower ended, once one has; None while all run."""
        ...

    def load_failure(self, wait_s: float) -> str | None:
        """What a follower that failed while loading said (waits up to wait_s for it)."""
        ...

    def stop(self, wait_s: float) -> None:
        """After the "stop" step: wait for them to leave, then kill the rest."""
        ...


class ChildFollowers:
    """Followers as child processes of this one (`mp`)."""

    def __init__(self, specs: list[FollowerSpec]):
        self.processes = [start_child("tokenmill.executor.follower", s) for s in specs]
        self.describe = "pid " + ", ".join(str(p.pid) for p in self.processes)

    def failed(self) -> str | None:
        for process in self.processes:
            code = process.poll()
            if code is not None:
                reason = failure_line(process)
                return f"worker (pid {process.pid}) exited with code {code}" + (
                    f": {reason}" if reason else ""
                )
        return None

    def load_failure(self, wait_s: float) -> str | None:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            for process in self.processes:
                code = process.poll()
                if code is not None and code != EXIT_PEER_GONE:
                    return failure_line(process) or f"a worker exited with code {code}"
            time.sleep(0.1)
        return None

    def stop(self, wait_s: float) -> None:
        stop_children(self.processes, wait_s)


class LaunchedFollowers:
    """Followers a launcher started (torchrun): not this process's to watch or stop; a
    collective fails when one is gone."""

    describe = "started by the launcher"

    def failed(self) -> str | None:
        return None

    def load_failure(self, wait_s: float) -> str | None:
        return None

    def stop(self, wait_s: float) -> None:
        pass


class MultiprocExecutor(Executor):
    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        source: ModelSource,
        grammars: StructuredOutputManager | None,
        size: int,
        pipeline: bool = False,
        backend: DistributedBackend | None = None,
    ):
        kind = self._kind = "pipeline" if pipeline else "tensor"
        device = resolve_device(model_config.device)
        backend = backend or "mp"
        self._threads = torch.get_num_threads()  # this process's, restored at shutdown
        local = size if backend != "external_launcher" else launched_here(size)
        self.worker_threads_pinned = model_config.cpu_threads is None and device.type == "cpu"
        model_config, cache_config = per_rank_share(model_config, cache_config, device, local)
        if device.type == "cuda" and backend == "external_launcher":
            device = _local_gpu()
        self._failure: list[str] = []  # why the group broke, once it has (the watcher's too)
        self._stopping = threading.Event()
        self.group: ParallelGroup | None = None
        self.followers, (host, port) = _start_followers(
            backend, size, pipeline, source, model_config, cache_config
        )
        self._finalizer = weakref.finalize(
            self, _stop, self.followers, None, self._stopping, self._failure
        )
        try:
            self.group = (
                _launched_group(device, size)
                if backend == "external_launcher"
                else create_group(0, size, host, port, device)
            )
            self._finalizer.detach()
            self._finalizer = weakref.finalize(
                self, _stop, self.followers, self.group, self._stopping, self._failure
            )
            self.worker = Worker(model_config, cache_config, source, grammars, self.group, pipeline)
        except (PeerError, ModelLoadError, RuntimeError) as e:
            reason = self.followers.load_failure(5.0) or str(e)
            self._failure.append(reason)  # the group may be mid-collective: no "stop" step
            self.shutdown()
            raise ModelLoadError(f"{kind}-parallel load failed: {reason}") from None
        except BaseException as e:
            self._failure.append(str(e))
            self.shutdown()
            raise
        threading.Thread(
            target=_watch, args=(self.followers, self._stopping, self._failure, kind),
            name="tokenmill-ranks-watch", daemon=True,
        ).start()  # fmt: skip
        self.info = ModelInfo.of(self.worker, 1 if pipeline else size, size if pipeline else 1)
        logger.info(
            "%s parallel: %d ranks (%s, %s), followers %s",
            kind, size, "nccl" if device.type == "cuda" else "gloo", backend,
            self.followers.describe,
        )  # fmt: skip

    def execute(self, scheduled: list[ScheduledSequence]) -> ModelOutput:
        self.check_health()
        try:
            return self.worker.execute(scheduled)
        except PeerError as e:
            self._failure.append(str(e))  # the group is broken for good
            raise

    def logits_for(self, scheduled: list[ScheduledSequence]) -> torch.Tensor:
        self.check_health()
        try:
            return self.worker.runner.logits_for(scheduled)
        except PeerError as e:
            self._failure.append(str(e))
            raise

    def forget(self, request_id: str) -> None:
        self.worker.forget(request_id)

    @property
    def failure(self) -> str | None:
        """Why the group broke, once it has."""
        return self._failure[0] if self._failure else None

    def check_health(self) -> None:
        if self._failure:
            raise PeerError(self._failure[0])

    def shutdown(self) -> None:
        """Stop the followers (a "stop" step, then kill any that stay) and drop the group."""
        if self._stopping.is_set():
            return
        self._finalizer.detach()
        _stop(self.followers, self.group, self._stopping, self._failure)
        if self.worker_threads_pinned:  # the rank's share of the threads was this process's
            torch.set_num_threads(self._threads)
            configure_cpu_threads(None)


def _watch(followers: Followers, stopping: threading.Event, failure: list[str], kind: str) -> None:
    """Notice a follower that ends while this process lives (idle or not). Holds no
    reference to the executor, which is collected (and its followers stopped) when unused."""
    while not stopping.is_set():
        failed = followers.failed()
        if failed is not None:
            if not stopping.is_set():
                failure.append(f"{kind}-parallel {failed}")
                logger.error("%s; the engine stops", failure[-1])
            return
        time.sleep(0.2)


def launched_here(size: int) -> int:
    """How many of a launcher's ranks run on this machine (torchrun's LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", size))


def _local_gpu() -> torch.device:
    """This launched rank's GPU: LOCAL_RANK's (made the current device)."""
    index = int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _launched_group(device: torch.device, size: int) -> ParallelGroup:
    """torchrun's group, which must be this engine's ranks with this process as rank 0 (the
    others run `tokenmill serve`, which follows: server/cli.py)."""
    group = from_environment(device)
    if group.size != size or group.rank != 0:
        group.close()
        raise ModelLoadError(
            f"external_launcher: this is rank {group.rank} of {group.size} launched "
            f"processes; the engine needs {size} ranks, this one rank 0 (the others run "
            "`tokenmill serve ... --distributed-executor-backend external_launcher`)"
        )
    return group


def _start_followers(
    backend: DistributedBackend,
    size: int,
    pipeline: bool,
    source: ModelSource,
    model_config: ModelConfig,
    cache_config: CacheConfig,
) -> tuple[Followers, tuple[str, int]]:
    """The followers, and the address where the leader's group store listens for them."""
    if backend == "external_launcher":
        return LaunchedFollowers(), ("", 0)
    host, port = "127.0.0.1", free_port()

    def spec(rank: int, leader: str) -> FollowerSpec:
        return FollowerSpec(rank, size, leader, port, source.path, model_config, cache_config,
                            DEFAULT_TIMEOUT_S, pipeline)  # fmt: skip

    followers: Followers
    if backend == "ray":
        from tokenmill.executor.ray_followers import RayFollowers

        device = resolve_device(model_config.device)
        # (the leader's store listens on every interface; its own client uses the loopback)
        followers = RayFollowers(spec, size, 1.0, 1.0 if device.type == "cuda" else 0.0)
    else:
        followers = ChildFollowers([spec(rank, host) for rank in range(1, size)])
    return followers, (host, port)


def per_rank_share(
    model_config: ModelConfig, cache_config: CacheConfig, device: torch.device, ranks: int
) -> tuple[ModelConfig, CacheConfig]:
    """On a CPU the `ranks` processes on this machine share it: each gets its share of the
    threads (of the cgroup's CPU quota, where there is one) and of the KV cache memory
    (which then holds as many tokens as one process would), unless they are set."""
    if device.type != "cpu" or ranks <= 1:
        return model_config, cache_config
    if model_config.cpu_threads is None:
        threads, quota = torch.get_num_threads(), cgroup_cpu_quota()
        if quota is not None:
            threads = min(threads, max(1, math.ceil(quota)))
        model_config = replace(model_config, cpu_threads=max(1, threads // ranks))
    total = kv_cache_bytes(cache_config, device)
    check_kv_cache_fits(total, device)  # (the ranks' caches together)
    budget = total // ranks
    return model_config, replace(cache_config, kv_cache_memory=budget)


def _stop(
    followers: Followers,
    group: ParallelGroup | None,
    stopping: threading.Event,
    failure: list[str],
) -> None:
    """A "stop" step where the group still works (a broken one may hold followers inside a
    collective, where the step would wait out the timeout), then kill what stays. Without
    the stop step no follower leaves of its own accord: they are killed at once."""
    stopping.set()
    healthy = not failure and followers.failed() is None
    if healthy and group is not None and group.pg is not None:
        with contextlib.suppress(PeerError):
            group.broadcast_object(("stop", None))
    followers.stop(_STOP_WAIT_S if healthy else 0.0)
    if group is not None:
        group.close()
