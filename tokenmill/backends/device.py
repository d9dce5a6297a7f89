"""The machine: device and dtype choice, CPU threads, and how much memory the KV cache gets."""

from __future__ import annotations

import logging
import math
import mmap
import os
from pathlib import Path

import torch

from tokenmill import kernels
from tokenmill.config import CacheConfig
from tokenmill.errors import ModelLoadError

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CPU_KV_SHARE = 0.10  # of physical RAM, by default, on CPU
_CPU_KV_CAP = 8 << 30  # bytes; more rarely helps a CPU, which is compute-bound long before
_CUDA_ACTIVATION_RESERVE = 1 << 30  # bytes left free on the GPU for activations


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was requested but PyTorch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise ModelLoadError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def configure_cpu_threads(pinned: int | None) -> str:
    """Set the CPU thread count (torch's and the native kernels'); says what it chose.

    `pinned` (--cpu-threads) fixes it. Otherwise torch's default, capped at the cgroup's CPU
    quota (a container limited to 1.5 CPUs gets 2 threads, not one per host core), is where
    the kernels' pool starts; the pool then runs calls on fewer threads while waiting for
    descheduled ones costs more than they add, and probes back up (kernels/parallel.h)."""
    if pinned is not None:
        kernels.set_cpu_threads(pinned)
        return f"{pinned} CPU threads (pinned)"
    threads, quota = torch.get_num_threads(), cgroup_cpu_quota()
    if quota is not None and math.ceil(quota) < threads:
        threads = max(1, math.ceil(quota))
        torch.set_num_threads(threads)
    kernels.set_cpu_threads(None)
    where = f", CPU quota {quota:g}" if quota is not None else ""
    return f"{threads} CPU threads (adaptive{where})"


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros; on a CPU in private anonymous memory, which the kernel zeroes a page at a
    time as it is first written: a KV cache of gigabytes is ready at once and takes memory
    as requests fill it (torch.zeros writes every byte first: ~2 s a GiB on a 2-core VM)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes == 0 or not hasattr(mmap, "MAP_PRIVATE"):
        return torch.zeros(shape, dtype=dtype, device=device)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)  # (a fork copies it on write)
    return torch.frombuffer(region, dtype=torch.uint8).view(dtype).view(shape)


def cgroup_cpu_quota(
    root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")
) -> float | None:
    """CPUs' worth of time the process's cgroup may use (cgroup v2 cpu.max, or v1 CFS quota,
    the tightest along the path), or None when unlimited or unknown."""
    limits: list[float] = []
    for here, v2 in _cgroup_dirs(root, membership, "cpu", ("cpu,cpuacct", "cpu")):
        if v2:
            limits += _quota(here / "cpu.max", None)
        else:
            limits += _quota(here / "cpu.cfs_quota_us", here / "cpu.cfs_period_us")
    return min(limits) if limits else None


def available_memory(
    meminfo: Path = Path("/proc/meminfo"),
    root: Path = Path("/sys/fs/cgroup"),
    membership: Path = Path("/proc/self/cgroup"),
) -> int | None:
    """Bytes this process may still take: the kernel's MemAvailable, and the room left under
    the cgroup's memory limit (v2 memory.max, or v1 memory.limit_in_bytes; the tightest along
    the path), its usage less the page cache the kernel can drop (inactive_file: the weights'
    files just read, as cAdvisor's working set); None when neither is known."""
    room: list[int] = []
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                room.append(int(line.split()[1]) * 1024)  # (kB)
    except (OSError, ValueError, IndexError):
        pass
    for here, v2 in _cgroup_dirs(root, membership, "memory", ("memory",)):
        limit, used, cache = ("memory.max", "memory.current", "inactive_file") if v2 else (
            "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")  # fmt: skip
        try:
            usage = int((here / used).read_text()) - _stat(here / "memory.stat", cache)
            room.append(int((here / limit).read_text()) - usage)
        except (OSError, ValueError):  # ("max": unlimited; v1 writes a huge number instead)
            continue
    return max(0, min(room)) if room else None


def _stat(path: Path, key: str) -> int:
    """A counter of a cgroup's memory.stat; 0 when it is not there."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_dirs(
    root: Path, membership: Path, controller: str, v1_mounts: tuple[str, ...]
) -> list[tuple[Path, bool]]:
    """The directories that hold the process's limits of `controller`, each with whether it
    is cgroup v2: on v2 every directory from the process's own up to the root (a limit
    anywhere above binds it too); on v1 the process's directory under the controller's
    mount."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return []
    found: list[tuple[Path, bool]] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            here = root / path.lstrip("/")
            while True:
                found.append((here, True))
                if here == root or root not in here.parents:
                    break
                here = here.parent
        elif controller in controllers.split(","):
            for base in v1_mounts:
                here = root / base / path.lstrip("/")
                if here.is_dir():
                    found.append((here, False))
                    break
    return found


def _quota(quota_file: Path, period_file: Path | None) -> list[float]:
    """[quota / period] from "QUOTA PERIOD" (v2) or two files (v1); [] when unlimited."""
    try:
        words = quota_file.read_text().split()
        if period_file is not None:
            words += period_file.read_text().split()
        quota, period = words[0], float(words[1])
    except (OSError, IndexError, ValueError):
        return []
    if quota in ("max", "-1") or period <= 0:
        return []
    return [float(quota) / period]


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on GPUs that have it (else float16); float32 on CPU, where
    PyTorch's bfloat16 GEMV is slow and float32 matches the reference exactly (the weight
    format, not the dtype, is what makes CPU decode fast: formats.py)."""
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    if dtype != "auto":
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def kv_cache_bytes(config: CacheConfig, device: torch.device) -> int:
    """The KV cache budget: as configured, else a share of the machine."""
    if config.kv_cache_memory is not None:
        return int(config.kv_cache_memory)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        budget = int(config.gpu_memory_utilization * total) - used - _CUDA_ACTIVATION_RESERVE
        if budget <= 0:
            raise ModelLoadError(
                f"no GPU memory left for the KV cache: {used / 2**30:.1f} GiB of {total / 2**30:.1f} GiB "
                f"in use, gpu_memory_utilization={config.gpu_memory_utilization}"
            )
        return budget
    total_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    room = available_memory()
    half_the_room = room // 2 if room is not None else _CPU_KV_CAP
    return int(min(total_ram * _CPU_KV_SHARE, _CPU_KV_CAP, half_the_room))


def check_kv_cache_fits(nbytes: int, device: torch.device) -> None:
    """Refuse a CPU KV cache larger than the memory left: it takes memory only as requests
    fill it (zeros()), so one too large would otherwise be killed mid-serving, not here."""
    room = available_memory() if device.type == "cpu" else None
    if room is not None and nbytes > room:
        raise ModelLoadError(
            f"the KV cache would take {nbytes / 2**30:.2f} GiB, more than the "
            f"{room / 2**30:.2f} GiB of memory left on this machine; lower --kv-cache-memory"
        )
