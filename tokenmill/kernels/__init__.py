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
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
# parallel.h runs on the OpenMP threads PyTorch uses; a compiler without OpenMP gets a
# pthread pool instead
_OPENMP = "-fopenmp"
_BUILD_TIMEOUT_S = 120


def enabled() -> bool:
    return os.environ.get("TOKENMILL_NATIVE_KERNELS", "1").lower() not in ("0", "false", "no")


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled library of `<name>.c`, or None (logged once) when it cannot be had."""
    if not enabled():
        return None
    try:
        return ctypes.CDLL(str(_build(name)))
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        logger.warning("native kernel %s unavailable (%s); using the torch fallback", name, e)
        return None


@functools.cache
def function(name: str, symbol: str, *argtypes: Any) -> Callable[..., int] | None:
    """`symbol` of library `name` with its C argument types (returning int), or None."""
    lib = load(name)
    if lib is None:
        return None
    fn = getattr(lib, symbol)
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


def _build(name: str) -> Path:
    source = Path(__file__).with_name(f"{name}.c")
    compiler = _compiler()
    key = hashlib.sha256()
    # every header and source beside it: a kernel may include another's source
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.[ch]")) if h != source]
    flags = " ".join([*_FLAGS, _OPENMP])
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
    try:
        for openmp in ([_OPENMP], []):
            done = subprocess.run(
                [compiler, *_FLAGS, *openmp, "-o", partial, str(source), "-lm"],
                capture_output=True,
                text=True,
                timeout=_BUILD_TIMEOUT_S,
            )
            if done.returncode == 0:
                break
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    logger.info("compiled native kernel %s -> %s", name, target)
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
