"""ParallelGroup: the ranks that hold one model's shards, over a torch.distributed process
group (gloo on CPU, NCCL on CUDA). The group is made from a TCPStore rather than torch's
global default group, so one process may hold several engines (and tests may build them
one after another); `from_environment` joins a group torchrun or a cluster launcher set up.

A model is built under `building_for(group)`: its layers read `current()` then and keep the
group, to shard their weights and to all-reduce their outputs.

Timeouts: every collective of a step waits at most `timeout` (a peer that hangs fails the
step); a follower waiting for the next step waits without limit, as an idle server sends
none (a leader that dies closes the connection, which ends the wait at once).
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tokenmill.errors import ModelLoadError

# how long one collective of a step may wait for the other ranks
DEFAULT_TIMEOUT_S = float(os.environ.get("TOKENMILL_COLLECTIVE_TIMEOUT", "120"))
_FOREVER = timedelta(days=365)


class PeerError(RuntimeError):
    """A collective failed: a rank died, hung past the timeout, or the group was closed."""


@dataclass(slots=True)
class ParallelGroup:
    """rank of size; `pg` is None for a group of one (every collective is then a no-op)."""

    rank: int = 0
    size: int = 1
    pg: Any = field(default=None, repr=False)  # torch.distributed ProcessGroup
    timeout: timedelta = timedelta(seconds=DEFAULT_TIMEOUT_S)
    device: torch.device = torch.device("cpu")
    store: Any = field(default=None, repr=False)  # keeps the TCPStore alive
    join_timeout: timedelta = timedelta(seconds=300)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of x, in place (x itself with one rank).

        On a CPU with more than two ranks the partial sums are gathered and added in rank
        order, so every element is the same chain of additions whatever the tensor's size:
        a ring all-reduce adds in an order that depends on where an element falls in its
        chunks, i.e. on the batch, and greedy output would then depend on the batch (with
        two ranks a + b == b + a, so the ring is exact). On CUDA, NCCL's all-reduce."""
        if self.pg is None:
            return x
        if self.size > 2 and self.device.type == "cpu":
            x = x.contiguous()
            parts = [torch.empty_like(x) for _ in range(self.size)]
            self._wait(self.pg.allgather(parts, x, self.timeout))
            total = parts[0]
            for part in parts[1:]:
                total += part
            return x.copy_(total)
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.SUM  # type: ignore[assignment]
        options.timeout = self.timeout
        self._wait(self.pg.allreduce([x], options))
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's x [..., n] joined along the last dimension [..., n * size], on the
        leader; None on the others."""
        if self.pg is None:
            return x
        x = x.contiguous()
        outputs = [[torch.empty_like(x) for _ in range(self.size)]] if self.is_leader else []
        options = dist.GatherOptions()
        options.rootRank = 0
        options.timeout = self.timeout
        self._wait(self.pg.gather(outputs, [x], options))
        return torch.cat(outputs[0], dim=-1) if self.is_leader else None

    def min_int(self, value: int) -> int:
        """The smallest of the ranks' values (at load: waits as long as joining may, as the
        ranks finish loading at their own pace)."""
        if self.pg is None:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.MIN  # type: ignore[assignment]
        options.timeout = self.join_timeout
        self._wait(self.pg.allreduce([t], options))
        return int(t.item())

    def send(self, x: torch.Tensor, rank: int) -> None:
        """x (contiguous) to `rank`, which receives it with `recv` into a like tensor."""
        self._wait(self.pg.send([x], rank, 0), self.timeout)

    def recv(self, x: torch.Tensor, rank: int) -> None:
        """Into x, what `rank` sends."""
        self._wait(self.pg.recv([x], rank, 0), self.timeout)

    def broadcast_object(self, obj: Any = None, wait_forever: bool = False) -> Any:
        """The leader's `obj` on every rank (pickled; the others pass None)."""
        if self.pg is None:
            return obj
        timeout = _FOREVER if wait_forever else self.timeout
        if self.is_leader:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            size = torch.tensor([len(data)], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        self._broadcast(size, timeout)
        if self.is_leader:
            payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
        self._broadcast(payload, self.timeout)
        return obj if self.is_leader else pickle.loads(payload.numpy().tobytes())

    def _broadcast(self, t: torch.Tensor, timeout: timedelta) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        options.rootTensor = 0
        options.timeout = timeout
        on_device = t.to(self.device) if self.device.type != "cpu" else t
        self._wait(self.pg.broadcast([on_device], options))
        if on_device is not t:
            t.copy_(on_device.cpu())

    def _wait(self, work: Any, timeout: timedelta | None = None) -> None:
        try:
            if timeout is None:
                work.wait()  # the options' timeout
            elif not work.wait(timeout):
                raise RuntimeError(f"timed out after {timeout.total_seconds():g} s")
        except RuntimeError as e:  # gloo: "Connection closed by peer", "Timed out ..."
            raise PeerError(f"tensor-parallel rank {self.rank}: {e}") from None

    def close(self) -> None:
        """Drop the process group (the other ranks' next collective then fails)."""
        pg, self.pg = self.pg, None
        if pg is None:
            return
        with contextlib.suppress(Exception):
            if self.store is None and dist.is_initialized():  # from_environment's
                dist.destroy_process_group()
            else:
                pg.shutdown()
        self.store = None


SINGLE = ParallelGroup()


def create_group(
    rank: int,
    size: int,
    host: str,
    port: int,
    device: torch.device,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    join_timeout_s: float = 300.0,
) -> ParallelGroup:
    """Join the group whose leader (rank 0) listens on host:port; waits for every rank."""
    if size == 1:
        return ParallelGroup(device=device)
    join = timedelta(seconds=join_timeout_s)
    try:
        store = dist.TCPStore(host, port, size, rank == 0, timeout=join)
        pg: Any
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            # NCCL's watchdog holds every operation to this (the per-call timeouts are
            # gloo's): without a bound, an idle follower's wait for the next step is not
            # aborted; a hung rank then waits too (docs/scaling.md says so)
            options._timeout = _FOREVER
            pg = dist.ProcessGroupNCCL(store, rank, size, options)
        else:
            pg = dist.ProcessGroupGloo(store, rank, size, join)
    except RuntimeError as e:
        raise ModelLoadError(
            f"tensor-parallel rank {rank} could not join {host}:{port}: {e}"
        ) from None
    return ParallelGroup(rank, size, pg, timedelta(seconds=timeout_s), device, store, join)


def from_environment(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> ParallelGroup:
    """The group a launcher set up through torch's environment variables (torchrun: RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT; its agent's store, where it runs one): torch's
    default process group, so one such group per process."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    join = timedelta(seconds=300)
    try:
        if not dist.is_initialized():
            dist.init_process_group(backend, init_method="env://", timeout=join)
        pg = dist.distributed_c10d._get_default_group()
    except (RuntimeError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot join the launcher's process group (env://): {e}") from None
    rank, size = dist.get_rank(), dist.get_world_size()
    return ParallelGroup(rank, size, pg, timedelta(seconds=timeout_s), device, None, join)


_building: ParallelGroup = SINGLE


def current() -> ParallelGroup:
    """The tensor-parallel group of the model being built (one rank of one outside)."""
    return _building


@contextlib.contextmanager
def building_for(group: ParallelGroup) -> Iterator[None]:
    """Build a model's layers for `group`: each takes its shard of every weight."""
    global _building
    saved, _building = _building, group
    try:
        yield
    finally:
        _building = saved
