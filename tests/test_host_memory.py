"""train.retain_host_memory: freed host memory stays in the process, so repeated steps stop faulting pages in."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# A "step" writes six 4 MiB buffers and frees them, as a training step does with its activations; the
# probe prints the minor page faults of 20 steps after five.
PROBE = """
import ctypes, resource, sys
import torch
if sys.argv[1] == "retain":
    from tada_dist.host_memory import retain_freed_memory
    assert retain_freed_memory()
else:  # glibc as it starts: 128 KiB mmap and trim thresholds.
    # Left alone, glibc moves them as a process frees memory, so how often it gives pages back depends on
    # what the imports did before; pinned, the comparison does not.
    from tada_dist.host_memory import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    libc = ctypes.CDLL(None)
    assert libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024) == 1
def step():
    buffers = [torch.ones(1024 * 1024) for _ in range(6)]
    del buffers
for _ in range(5):  # the heap grows to its working size
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_WRITTEN = 20 * 6 * (4 * 1024 * 1024 // 4096)


def faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(result.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting applies to glibc's malloc only")
def test_retained_memory_is_reused_without_page_faults():
    assert faults("system") > PAGES_WRITTEN // 2  # glibc hands the pages back after each step
    assert faults("retain") < PAGES_WRITTEN // 10


def test_the_setting_reports_whether_it_applied():
    from tada_dist.host_memory import retain_freed_memory

    assert retain_freed_memory() is (platform.libc_ver()[0] == "glibc" and sys.platform.startswith("linux"))
