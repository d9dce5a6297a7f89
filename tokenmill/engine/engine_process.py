"""One data-parallel engine: `python -m tokenmill.engine.engine_process`, started by the
DataParallelEngine (engine/data_parallel.py) with its EngineProcessSpec on stdin.

It loads the whole model (an LLMEngine; with --tensor-parallel-size, its own followers),
connects back to the server over a local authenticated socket (multiprocessing.connection),
and runs the step loop: requests and aborts come in, each step's outputs and the
scheduler's state go out. It dies with the server (PR_SET_PDEATHSIG) and reports a
failure as one line on stdout before exiting non-zero.

Messages in: ("generate", id, prompt ids, SamplingParams, cache salt, priority, images),
("encode", id, prompt ids, PoolingParams, cache salt), ("abort", id), ("stop",).
Out: ("ready", EngineReady), ("outputs", [outputs], EngineState),
("rejected", id, exception), ("failed", text). Each is plain pickle over the connection's
bytes (`send`/`receive`): multiprocessing's own pickler would pass tensors (an embedding)
as shared-memory file descriptors.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import queue
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.distributed.process import read_spec
from tokenmill.engine.client import CacheInfo
from tokenmill.engine.step_stats import StepTokens
from tokenmill.spec_decode.speculator import SpecDecodeCounts

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5


@dataclass(frozen=True, slots=True)
class EngineProcessSpec:
    index: int
    config: EngineConfig
    address: tuple[str, int]
    authkey: bytes


@dataclass(frozen=True, slots=True)
class EngineReady:
    max_model_len: int
    cache: CacheInfo
    pid: int


@dataclass(frozen=True, slots=True)
class EngineState:
    """The scheduler after a step (engine/client.py's EngineStats, less the server's own
    counters)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int
    cpu_threads: tuple[int, int] | None
    spec_decode: SpecDecodeCounts | None
    step_tokens: StepTokens


def send(conn: Connection, message: tuple[Any, ...]) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def receive(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def main() -> int:
    spec: EngineProcessSpec = read_spec()
    logging.basicConfig(
        level=logging.INFO, format=f"%(levelname)s dp engine {spec.index}: %(message)s"
    )
    conn = Client(spec.address, authkey=spec.authkey)
    send(conn, ("hello", spec.index))
    try:
        from tokenmill.engine.async_engine import _load_off_thread

        engine = _load_off_thread(spec.config)
    except BaseException as e:  # noqa: BLE001 - reported to the server, then exit non-zero
        print(f"{type(e).__name__}: {e}", flush=True)
        send(conn, ("failed", f"{type(e).__name__}: {e}"))
        return 1
    import os

    from tokenmill.engine.heap import settle_heap

    settle_heap()  # what is loaded lives as long as the process
    core = engine.core
    ready = EngineReady(core.max_model_len, CacheInfo.of(core), os.getpid())
    send(conn, ("ready", ready))
    try:
        _serve(engine, conn)
    except (EOFError, OSError):
        return 0  # the server closed the connection: it is gone or stopping
    except BaseException as e:  # noqa: BLE001
        logger.exception("engine loop died")
        print(f"{type(e).__name__}: {e}", flush=True)
        with contextlib.suppress(OSError):
            send(conn, ("failed", f"{type(e).__name__}: {e}"))
        return 1
    finally:
        engine.shutdown()
    return 0


def _serve(engine: Any, conn: Connection) -> None:
    """The step loop: apply what came in, step while anything runs, send what changed."""
    from tokenmill import kernels
    from tokenmill.errors import TokenmillError

    inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()

    def read() -> None:  # drains the socket while steps run, so the server never blocks
        try:
            while True:
                message = receive(conn)
                inbox.put(message)
                if message[0] == "stop":
                    return
        except (EOFError, OSError):
            inbox.put(("stop",))

    threading.Thread(target=read, name="tokenmill-dp-inbox", daemon=True).start()
    scheduler = engine.core.scheduler

    def state() -> EngineState:
        return EngineState(
            len(scheduler.running), len(scheduler.waiting), engine.core.kv_cache.pool.usage,
            scheduler.num_preemptions, kernels.cpu_threads_in_use(),
            None if scheduler.speculator is None else scheduler.speculator.counts,
            scheduler.step_tokens.snapshot(),
        )  # fmt: skip

    while True:
        outputs: list[Any] = []
        try:
            message = inbox.get(timeout=_IDLE_WAIT_S) if not engine.has_unfinished else (
                inbox.get_nowait())  # fmt: skip
        except queue.Empty:
            message = None
        while message is not None:
            kind = message[0]
            if kind == "stop":
                return
            try:
                if kind == "generate":
                    _, request_id, ids, params, salt, priority, images = message
                    immediate = engine.add_request(
                        request_id, ids, params, salt, None, priority, images
                    )
                    if immediate is not None:
                        outputs.append(immediate)
                elif kind == "encode":
                    _, request_id, ids, params, salt = message
                    engine.add_pooling_request(request_id, ids, params, salt)
                elif kind == "abort":
                    engine.abort(message[1])
            except (TokenmillError, ValueError) as e:
                send(conn, ("rejected", message[1], e))
            try:
                message = inbox.get_nowait()
            except queue.Empty:
                message = None
        engine.core.check_health()
        if engine.has_unfinished:
            outputs.extend(engine.step())
        send(conn, ("outputs", outputs, state()))  # idle: every _IDLE_WAIT_S, a heartbeat


if __name__ == "__main__":  # run as the module itself, so what it pickles names it
    from tokenmill.engine.engine_process import main as module_main

    sys.exit(module_main())
