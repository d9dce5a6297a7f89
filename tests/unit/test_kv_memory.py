"""The CPU KV cache's memory: zeroed by the kernel as it is first written (none taken at
load), never larger than the memory left."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.unit.test_cpu_threads import _tree
from tokenmill.backends import device
from tokenmill.backends.device import available_memory, kv_cache_bytes, zeros
from tokenmill.config import CacheConfig
from tokenmill.errors import ModelLoadError
from tokenmill.llm import LLM


def _resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_cpu_zeros_are_zero_and_take_memory_only_where_written(dtype: torch.dtype) -> None:
    before = _resident_bytes()
    cache = zeros((32768, 8, 1024), dtype, torch.device("cpu"))  # 256 or 512 MiB
    assert cache.shape == (32768, 8, 1024) and cache.dtype == dtype
    assert _resident_bytes() - before < 32 << 20
    cache[7] = 1.5
    assert float(cache[7].float().sum()) == 1.5 * 8 * 1024
    rows = cache[::997].float()  # (reading untouched pages maps the zero page, takes none)
    assert float(rows[rows != 1.5].abs().sum()) == 0.0
    assert _resident_bytes() - before < 32 << 20
    assert cache.data_ptr() % 4096 == 0


def test_zeros_of_nothing_and_off_the_cpu_are_torch_zeros() -> None:
    assert zeros((0, 4), torch.float32, torch.device("cpu")).shape == (0, 4)
    assert zeros((2, 3), torch.float16, torch.device("meta")).device.type == "meta"


def test_available_memory_is_the_tightest_of_the_kernel_and_the_cgroups(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  16000000 kB\nMemFree: 1000 kB\nMemAvailable:  8000000 kB\n")
    root, membership = _tree(
        tmp_path / "v2",
        "0::/system.slice/app.service\n",
        {
            "system.slice/app.service/memory.max": "max\n",
            "system.slice/app.service/memory.current": "100\n",
            "system.slice/memory.max": f"{3 << 30}\n",  # the slice's limit binds the service
            "system.slice/memory.current": f"{3 << 29}\n",  # (of which page cache it can drop:)
            "system.slice/memory.stat": f"anon 1\ninactive_file {1 << 29}\nactive_file 7\n",
        },
    )
    assert available_memory(meminfo, root, membership) == 2 << 30
    root, membership = _tree(
        tmp_path / "v1",
        "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n",
        {"memory/docker/abc/memory.limit_in_bytes": f"{1 << 30}\n",
         "memory/docker/abc/memory.usage_in_bytes": f"{3 << 28}\n",
         "memory/docker/abc/memory.stat": "total_inactive_file 0\n"},
    )  # fmt: skip
    assert available_memory(meminfo, root, membership) == 1 << 28
    assert available_memory(meminfo, root, tmp_path / "missing") == 8000000 * 1024
    assert available_memory(tmp_path / "missing", root, tmp_path / "missing") is None


def test_the_default_budget_leaves_half_the_memory_left(monkeypatch) -> None:
    monkeypatch.setattr(device, "available_memory", lambda: 1 << 30)
    assert kv_cache_bytes(CacheConfig(), torch.device("cpu")) == 512 << 20
    assert kv_cache_bytes(CacheConfig(kv_cache_memory=3 << 30), torch.device("cpu")) == 3 << 30


def test_a_kv_cache_larger_than_the_memory_left_fails_the_load_naming_the_flag(
    tiny_hf_model_dir,
) -> None:
    with pytest.raises(
        ModelLoadError, match="more than the .* GiB of memory left.*--kv-cache-memory"
    ):
        LLM(str(tiny_hf_model_dir("llama")), dtype="float32", kv_cache_memory=1 << 50)
