"""Thread count: one per physical core, from /proc/cpuinfo, honouring the CPU affinity."""

from __future__ import annotations

import os

import pytest
import torch

from cholla.errors import InvalidRequestError
from cholla.threads import physical_cores, set_threads

# Two cores with two hyper-threads each: logical CPUs 0/2 share core 0, 1/3 core 1.
SMT_CPUINFO = "\n\n".join(
    f"processor\t: {cpu}\nphysical id\t: 0\ncore id\t\t: {cpu % 2}\nflags\t\t: avx512f" for cpu in range(4)
)


def test_hyperthreads_count_once(tmp_path, monkeypatch):
    path = tmp_path / "cpuinfo"
    path.write_text(SMT_CPUINFO)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert physical_cores(str(path)) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2})  # pinned to core 0's two threads
    assert physical_cores(str(path)) == 1


def test_without_core_ids_falls_back_to_usable_cpus(tmp_path, monkeypatch):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\n\nprocessor\t: 1\n")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert physical_cores(str(path)) == 2


def test_set_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert set_threads() == physical_cores()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_threads() == 1 and torch.get_num_threads() == 1
        with pytest.raises(InvalidRequestError):
            set_threads(0)
    finally:
        torch.set_num_threads(before)
