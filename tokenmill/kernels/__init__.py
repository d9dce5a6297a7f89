"""Native CPU kernels: C sources compiled on first use with the system C compiler, loaded
with ctypes, cached per machine.

They do what no PyTorch op does well on CPU (e.g. attention that reads the paged KV cache
in place). Each has a torch fallback: when there is no compiler, the build fails, or
TOKENMILL_NATIVE_KERNELS=0, `load()` returns None and callers take the torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_FLAGS = (
    "-O3",
    "-march=native",
    "-fno-math-errno",
    # lets the compiler vectorize float sums (the reduction order changes, as in BLAS)
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
    "-shared",
    "-fPIC",
    "-pthread",
)
_LIBRARY = "all"  # all.c: every kernel, one library, one thread pool (parallel.h)
_BUILD_TIMEOUT_S = 120


def enabled() -> bool:
    return os.environ.get("TOKENMILL_NATIVE_KERNELS", "1").lower() not in ("0", "false", "no")


_pinned_threads: int | None = None  # --cpu-threads: a fixed count, no adaptation


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (logged once) when it cannot be had."""
    if not enabled():
        return None
    start = time.monotonic()
    try:
        path = _build(_LIBRARY)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        logger.warning("native kernels unavailable (%s); using the torch fallback", e)
        return None
    _configure_pool(lib)
    # the engine's model load reaches here first (the CPU backend's weight formats), so a
    # first run's compile happens before the server reports healthy, never on a request
    logger.debug("native kernels loaded from %s in %.2f s", path, time.monotonic() - start)
    return lib


def warm_up(device_type: str) -> None:
    """Build (first run: a compile of some seconds) and load the library now, before the
    server reports healthy, when the model runs on a CPU: the sampler's row kernels use it
    whichever backend runs the model, so otherwise a first request could pay the compile."""
    if device_type == "cpu":
        load()


@functools.cache
def function(symbol: str, *argtypes: Any) -> Callable[..., int] | None:
    """`symbol` of the kernel library with its C argument types (returning int), or None."""
    lib = load()
    if lib is None:
        return None
    fn = getattr(lib, symbol)
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


# the KV cache element types the kernels read and write, by their format code (kv_format.h)
KV_FORMATS = {
    torch.float32: 0,
    torch.float16: 1,
    torch.float8_e5m2: 2,
    torch.float8_e4m3fn: 3,
    torch.bfloat16: 4,
}


def kv_format(dtype: torch.dtype) -> int:
    """kv_format.h's code for a KV cache of `dtype` (float32, float16, bfloat16,
    float8_e5m2 or float8_e4m3fn)."""
    try:
        return KV_FORMATS[dtype]
    except KeyError:
        raise ValueError(f"the native kernels hold no {dtype} KV cache") from None


def set_cpu_threads(threads: int | None) -> None:
    """Pin the CPU thread count (torch's and the kernels'), or with None let the kernels'
    pool adapt it to the CPU time the process gets (the default; parallel.h)."""
    global _pinned_threads
    if threads is not None:
        if threads < 1:
            raise ValueError(f"the CPU thread count must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    _pinned_threads = threads
    if load.cache_info().currsize and (lib := load()) is not None:
        _configure_pool(lib)


def cpu_threads_in_use() -> tuple[int, int] | None:
    """(threads the kernels' calls get now, times the pool has lowered that), or None while
    the kernels are not loaded."""
    stats = pool_stats()
    if stats is None:
        return None
    return stats["limit"] or torch.get_num_threads(), stats["reductions"]


def pool_stats() -> dict[str, int] | None:
    """The thread pool's counters (calls, their time and stall time in ns, reductions,
    probes, the current thread limit (0: none), threads started), or None while the kernels
    are not loaded (this never builds them)."""
    lib = load() if load.cache_info().currsize else None
    if lib is None:
        return None
    out = (ctypes.c_int64 * 7)()
    lib.tm_pool_stats(out)
    names = ("calls", "total_ns", "stall_ns", "reductions", "probes", "limit", "threads")
    return dict(zip(names, out, strict=True))


def _configure_pool(lib: ctypes.CDLL) -> None:
    lib.tm_pool_configure(ctypes.c_int(torch.get_num_threads()))
    lib.tm_pool_set_adaptive(ctypes.c_int(_pinned_threads is None))


def _build(name: str) -> Path:
    source = Path(__file__).with_name(f"{name}.c")
    compiler = _compiler()
    key = hashlib.sha256()
    # every header and source beside it: a kernel may include another's source
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.[ch]")) if h != source]
    flags = " ".join(_FLAGS)
    for part in (source.read_bytes(), *headers, flags.encode(), compiler.encode()):
        key.update(part)
    key.update(_cpu_id())
    target = _cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target, then rename: concurrent processes never load a partial file
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    logger.info("compiling native kernel %s (first run on this machine)", name)
    start = time.monotonic()
    try:
        done = subprocess.run(
            [compiler, *_FLAGS, "-o", partial, str(source), "-lm"],
            capture_output=True,
            text=True,
            timeout=_BUILD_TIMEOUT_S,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    logger.info("compiled native kernel %s in %.1f s -> %s", name, time.monotonic() - start, target)
    return target


def _compiler() -> str:
    candidates = [os.environ.get("CC"), (sysconfig.get_config_var("CC") or "").split(" ")[0]]
    for candidate in [*candidates, "cc", "gcc", "clang"]:
        if candidate and (path := shutil.which(candidate)):
            return path
    raise RuntimeError("no C compiler found (set CC)")


def _cache_dir() -> Path:
    root = os.environ.get("TOKENMILL_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
    base = Path(root) if root else Path.home() / ".cache"
    return (base if os.environ.get("TOKENMILL_CACHE_DIR") else base / "tokenmill") / "kernels"


def _cpu_id() -> bytes:
    """The CPU's feature flags: a library built with -march=native only runs where they match."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.encode()
    except OSError:
        pass
    import platform

    return platform.processor().encode() or platform.machine().encode()
