"""Thread pools sized from the CPUs a process may use and the torch processes beside it."""

from __future__ import annotations

import os
import subprocess
import sys

from cbd.core.threads import thread_env, threads_per_process, usable_cpus


def test_threads_split_the_cpus_between_processes():
    assert threads_per_process(1, cpus=2) == 2
    assert threads_per_process(2, cpus=2) == 1
    assert threads_per_process(3, cpus=2) == 1  # never zero
    assert threads_per_process(2, cpus=16) == 8


def test_an_explicit_omp_num_threads_wins():
    assert thread_env(4, {"OMP_NUM_THREADS": "3"}) == {}
    assert thread_env(1, {"CBD_TORCH_PROCESSES": "1"}) == dict.fromkeys(("OMP_NUM_THREADS", "MKL_NUM_THREADS"),
                                                                       str(usable_cpus()))
    n = str(max(1, usable_cpus() // 2))
    assert thread_env(None, {"CBD_TORCH_PROCESSES": "2"})["OMP_NUM_THREADS"] == n


def test_usable_cpus_follows_the_affinity_mask():
    if not hasattr(os, "sched_setaffinity"):
        return
    code = "import os; os.sched_setaffinity(0, {0}); from cbd.core.threads import usable_cpus; print(usable_cpus())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


def test_a_cgroup_quota_caps_the_cpus(tmp_path):
    (tmp_path / "cpu.max").write_text("100000 100000\n")  # one CPU's worth
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) >= 1
