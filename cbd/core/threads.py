"""How many threads each torch process gets: the CPUs this process may use, shared by the torch
processes that run side by side. Torch-free (the supervisor decides before its children import torch).

Two torch processes with default thread pools on two cores slow each other 3-7x (a chain build fell
from 127 to 35 tokens/s beside a second one), because each pool assumes it owns every core. The rule:

    threads = max(1, usable CPUs // torch processes on this machine)

where usable CPUs are the ones the scheduler lets this process run on (``sched_getaffinity``), capped
by a cgroup CPU quota (containers), and the process count is what the caller starts (``cbd serve
--workers N``) or ``CBD_TORCH_PROCESSES`` says (operators running several ``cbd worker`` side by side).
An explicit ``OMP_NUM_THREADS`` always wins.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from pathlib import Path

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 ``cpu.max`` quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def threads_per_process(processes: int = 1, cpus: int | None = None) -> int:
    return max(1, (cpus if cpus is not None else usable_cpus()) // max(1, processes))


def thread_env(processes: int | None = None, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The thread variables a torch process should start with (empty when the user set them)."""
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS"):
        return {}
    if processes is None:
        processes = int(env.get("CBD_TORCH_PROCESSES") or 1)
    n = str(threads_per_process(processes))
    return dict.fromkeys(THREAD_VARS, n)


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX); elsewhere bf16 is
    emulated and slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
