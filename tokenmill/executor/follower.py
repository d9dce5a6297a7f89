"""A tensor-parallel follower rank: `python -m tokenmill.executor.follower`, started by the
MultiprocExecutor with its FollowerSpec pickled on stdin. It loads its shard of the model,
joins the leader's process group and runs the leader's steps until told to stop; it dies
with the leader (PR_SET_PDEATHSIG), ignores Ctrl-C (the leader stops it), and reports a
failure as one line on stdout before exiting non-zero."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

from tokenmill.config import CacheConfig, ModelConfig
from tokenmill.distributed.process import EXIT_PARENT_GONE, read_spec

EXIT_PEER_GONE = EXIT_PARENT_GONE  # the leader ended or failed first


@dataclass(frozen=True, slots=True)
class FollowerSpec:
    rank: int
    size: int
    host: str
    port: int
    model_path: str
    model_config: ModelConfig
    cache_config: CacheConfig
    timeout_s: float


def main() -> int:
    spec: FollowerSpec = read_spec()
    logging.basicConfig(
        level=logging.WARNING, format=f"%(levelname)s tp rank {spec.rank}: %(message)s"
    )
    # heavy imports after the spec: a broken leader stops the child before it pays for them
    from tokenmill.backends.device import resolve_device
    from tokenmill.distributed.group import PeerError, create_group
    from tokenmill.model.loader import load_model_source
    from tokenmill.worker.worker import Worker

    tp = None
    try:
        source = load_model_source(spec.model_path)
        device = resolve_device(spec.model_config.device)
        tp = create_group(spec.rank, spec.size, spec.host, spec.port, device, spec.timeout_s)
        worker = Worker(spec.model_config, spec.cache_config, source, None, tp)
        worker.runner.follow()
        return 0
    except PeerError:
        return EXIT_PEER_GONE
    except BaseException as e:  # noqa: BLE001 - reported to the leader, then exit non-zero
        print(f"{type(e).__name__}: {e}", flush=True)
        logging.getLogger(__name__).exception("tensor-parallel rank %d failed", spec.rank)
        return 1
    finally:
        if tp is not None:
            tp.close()


if __name__ == "__main__":  # run as the module itself, so what it pickles names it
    from tokenmill.executor.follower import main as module_main

    sys.exit(module_main())
