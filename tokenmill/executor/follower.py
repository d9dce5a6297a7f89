"""A follower rank of a tensor- or pipeline-parallel group. It loads its share of the model,
joins the leader's process group and runs the leader's steps until told to stop.

Started three ways: by the MultiprocExecutor as `python -m tokenmill.executor.follower`
(FollowerSpec pickled on stdin; it dies with the leader, PR_SET_PDEATHSIG, ignores Ctrl-C,
and reports a failure as one line on stdout before exiting non-zero); as a Ray actor
(executor/ray_followers.py) on any node of a Ray cluster; or by torchrun, every rank but 0
of `tokenmill serve --distributed-executor-backend external_launcher` (server/cli.py).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

from tokenmill.config import CacheConfig, ModelConfig
from tokenmill.distributed.process import EXIT_PARENT_GONE, read_spec

EXIT_PEER_GONE = EXIT_PARENT_GONE  # the leader ended or failed first

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FollowerSpec:
    rank: int
    size: int
    host: str  # the leader's address: its TCPStore (None port: torch's env:// rendezvous)
    port: int | None
    model_path: str
    model_config: ModelConfig
    cache_config: CacheConfig
    timeout_s: float
    pipeline: bool = False  # the ranks are pipeline stages (else tensor-parallel shards)


def run(spec: FollowerSpec) -> int:
    """Load, join, follow; the exit status (0: stopped by the leader). A failure is raised
    after the group is closed (the leader then sees the rank gone)."""
    from tokenmill.backends.device import resolve_device
    from tokenmill.distributed.group import PeerError, create_group, from_environment
    from tokenmill.model.loader import load_model_source
    from tokenmill.worker.worker import Worker

    group = None
    try:
        source = load_model_source(spec.model_path)
        device = resolve_device(spec.model_config.device)
        if device.type == "cuda":  # a GPU per rank on this machine (torchrun: LOCAL_RANK's)
            import os

            import torch

            local = int(os.environ.get("LOCAL_RANK", spec.rank))
            index = local % max(1, torch.cuda.device_count())
            torch.cuda.set_device(index)
            device = torch.device("cuda", index)
        if spec.port is None:
            group = from_environment(device, spec.timeout_s)
        else:
            group = create_group(spec.rank, spec.size, spec.host, spec.port, device,
                                 spec.timeout_s)  # fmt: skip
        worker = Worker(spec.model_config, spec.cache_config, source, None, group, spec.pipeline)
        worker.runner.follow()
        return 0
    except PeerError:
        return EXIT_PEER_GONE
    finally:
        if group is not None:
            group.close()


def main() -> int:
    spec: FollowerSpec = read_spec()
    logging.basicConfig(
        level=logging.WARNING, format=f"%(levelname)s rank {spec.rank}: %(message)s"
    )
    try:
        return run(spec)
    except BaseException as e:  # noqa: BLE001 - reported to the leader, then exit non-zero
        print(f"{type(e).__name__}: {e}", flush=True)
        logger.exception("rank %d failed", spec.rank)
        return 1


if __name__ == "__main__":  # run as the module itself, so what it pickles names it
    from tokenmill.executor.follower import main as module_main

    sys.exit(module_main())
