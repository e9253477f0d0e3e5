"""Threads per rank (ringctl.job.choose_threads) and the CPUs a rank asks SLURM for.

The job end to end records them in results.json (tests/test_launch_local.py runs it)."""

from __future__ import annotations

import os

import pytest

from ringctl.errors import ConfigError
from ringctl.job import GPU_RANK_CPUS, choose_threads, cpus_per_task

LOCAL = {"resources": {"kind": "local", "nodes": 2, "ranks_per_node": 2}, "launcher": {"cpus_per_task": None}}
SLURM = {"resources": {"kind": "slurm", "nodes": 2, "ranks_per_node": 4}, "launcher": {"cpus_per_task": None}}
CORES = len(os.sched_getaffinity(0))


def test_local_ranks_share_the_machines_cores() -> None:
    got = choose_threads(LOCAL, environ={})
    assert (got.count, got.source) == (max(1, CORES // 4), "cores/local_ranks")


def test_users_omp_num_threads_wins() -> None:
    assert choose_threads(LOCAL, environ={"OMP_NUM_THREADS": "3"}).count == 3
    got = choose_threads(SLURM, environ={"OMP_NUM_THREADS": "2,1", "SLURM_CPUS_PER_TASK": "8"})
    assert (got.count, got.source) == (2, "OMP_NUM_THREADS")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='0'"):
        choose_threads(LOCAL, environ={"OMP_NUM_THREADS": "0"})


def test_slurm_cpus_per_task() -> None:
    got = choose_threads(SLURM, environ={"SLURM_CPUS_PER_TASK": "8"})
    assert (got.count, got.source) == (8, "SLURM_CPUS_PER_TASK")
    # a local job started inside an allocation does not take the allocation's figure
    assert choose_threads(LOCAL, environ={"SLURM_CPUS_PER_TASK": "8"}).source == "cores/local_ranks"


def test_local_launcher_cpus_per_task() -> None:
    config = {**LOCAL, "launcher": {"cpus_per_task": 2}}
    assert choose_threads(config, environ={}).count == 2


def test_cpus_per_task_default_and_check() -> None:
    assert cpus_per_task({"cpus_per_task": None}, gpus_per_node=0) == 1
    assert cpus_per_task({"cpus_per_task": None}, gpus_per_node=4) == GPU_RANK_CPUS
    assert cpus_per_task({"cpus_per_task": 16}, gpus_per_node=4) == 16
    with pytest.raises(ConfigError, match=r"launcher\.cpus_per_task"):
        cpus_per_task({"cpus_per_task": 0}, gpus_per_node=0)
