"""The CPU thread count: the cgroup CPU quota caps it, --cpu-threads pins it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenmill import kernels
from tokenmill.backends import device
from tokenmill.backends.device import cgroup_cpu_quota, configure_cpu_threads


def _tree(tmp_path: Path, membership: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "membership").write_text(membership)
    return root, tmp_path / "membership"


def test_v2_quota_is_the_tightest_along_the_path(tmp_path: Path) -> None:
    root, membership = _tree(
        tmp_path,
        "0::/system.slice/app.service\n",
        {
            "system.slice/app.service/cpu.max": "max 100000\n",
            "system.slice/cpu.max": "150000 100000\n",  # 1.5 CPUs for the whole slice
            "cpu.max": "max 100000\n",
        },
    )
    assert cgroup_cpu_quota(root, membership) == 1.5


def test_v1_quota_and_no_quota(tmp_path: Path) -> None:
    root, membership = _tree(
        tmp_path,
        "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n",
        {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
         "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"},
    )  # fmt: skip
    assert cgroup_cpu_quota(root, membership) == 0.5
    root, membership = _tree(
        tmp_path / "none",
        "3:cpu,cpuacct:/\n0::/\n",
        {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
         "cpu.max": "max 100000\n"},
    )  # fmt: skip
    assert cgroup_cpu_quota(root, membership) is None
    assert cgroup_cpu_quota(root, tmp_path / "missing") is None


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    kernels.set_cpu_threads(None)


def test_the_quota_caps_the_default_and_a_pin_wins(
    monkeypatch: pytest.MonkeyPatch, restore_threads: None
) -> None:
    torch.set_num_threads(4)
    monkeypatch.setattr(device, "cgroup_cpu_quota", lambda: 1.5)
    assert configure_cpu_threads(None) == "2 CPU threads (adaptive, CPU quota 1.5)"
    assert torch.get_num_threads() == 2
    assert configure_cpu_threads(3) == "3 CPU threads (pinned)"
    assert torch.get_num_threads() == 3
    with pytest.raises(ValueError, match=">= 1"):
        configure_cpu_threads(0)
