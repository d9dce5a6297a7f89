"""Follower ranks as Ray actors (`--distributed-executor-backend ray`): placed by Ray on any
node of the cluster this process joined (or a local one it starts), each runs
executor/follower.py's `run` and joins the leader's group over TCP. `pip install
tokenmill[ray]`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tokenmill.errors import ModelLoadError
from tokenmill.executor.follower import EXIT_PEER_GONE, FollowerSpec, run

logger = logging.getLogger(__name__)

_PLACE_TIMEOUT_S = 300.0


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ModelLoadError(
            "--distributed-executor-backend ray needs Ray: pip install 'tokenmill[ray]'"
        ) from None
    if not ray.is_initialized():
        ray.init(address="auto" if _cluster_running(ray) else None, log_to_driver=True)
    return ray


def _cluster_running(ray: Any) -> bool:
    """Whether `ray start` runs a cluster this machine can join (else a local one)."""
    import os

    return bool(os.environ.get("RAY_ADDRESS")) or os.path.exists("/tmp/ray/ray_current_cluster")


class _Actor:
    """One follower rank in a Ray worker process."""

    def run(self, spec: FollowerSpec) -> int:
        return run(spec)

    def node_ip(self) -> str:
        import ray

        return str(ray.util.get_node_ip_address())


class RayFollowers:
    """The leader's handle on its Ray actors."""

    def __init__(
        self, make_spec: Callable[[int, str], FollowerSpec], size: int, num_cpus: float,
        num_gpus: float,
    ):  # fmt: skip
        """Actors for ranks 1..size-1; `make_spec(rank, leader address)`: the address as
        that actor's node reaches the leader (the loopback on the leader's own node)."""
        self.ray = ray = _ray()
        actor = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_Actor)
        self.actors = [actor.remote() for _ in range(1, size)]
        try:
            nodes = ray.get([a.node_ip.remote() for a in self.actors], timeout=_PLACE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            for a in self.actors:
                ray.kill(a)
            raise ModelLoadError(
                f"Ray could not place {size - 1} follower actors ({num_cpus:g} CPU, "
                f"{num_gpus:g} GPU each) within {_PLACE_TIMEOUT_S:g} s: does the cluster "
                "have the resources?"
            ) from None
        here = str(ray.util.get_node_ip_address())
        self.runs = [
            a.run.remote(make_spec(rank, "127.0.0.1" if node == here else here))
            for rank, (a, node) in enumerate(zip(self.actors, nodes, strict=True), start=1)
        ]
        self.describe = f"Ray actors on {', '.join(sorted(set(nodes)))}"

    def failed(self) -> str | None:
        """Why a rank ended, once one has (an actor that returned or died)."""
        if not self.runs:  # stopped
            return None
        done, _ = self.ray.wait(self.runs, num_returns=1, timeout=0)
        if not done:
            return None
        try:
            code = self.ray.get(done[0])
        except Exception as e:  # noqa: BLE001 - RayActorError, the follower's exception
            return f"Ray follower failed: {type(e).__name__}: {e}"
        return f"Ray follower exited with code {code}"

    def load_failure(self, wait_s: float) -> str | None:
        if not self.runs:
            return None
        done, _ = self.ray.wait(self.runs, num_returns=1, timeout=wait_s)
        if not done:
            return None
        try:
            code = self.ray.get(done[0])
        except Exception as e:  # noqa: BLE001
            return f"{type(e).__name__}: {e}".splitlines()[-1]
        return None if code == EXIT_PEER_GONE else f"a Ray follower exited with code {code}"

    def stop(self, wait_s: float) -> None:
        """After the "stop" step: wait for the actors' runs to return, then kill them and
        drop their handles now, while Ray runs (a handle that outlives `ray.shutdown()`
        makes Ray end the whole process when it is collected)."""
        if self.runs:
            self.ray.wait(self.runs, num_returns=len(self.runs), timeout=wait_s)
        for a in self.actors:
            self.ray.kill(a)
        self.actors, self.runs = [], []
