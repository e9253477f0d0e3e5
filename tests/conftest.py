"""Shared fixtures. `slurm_cluster`: a real SLURM dev cluster (slurm/dev-cluster) for the session.

TRITON_INTERPRET=1 is set here, before any test module imports triton: triton.jit reads it
at import time, and the kernel tests (test_kernels, test_masks) run Triton on the CPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# launches record themselves in a per-user index too: keep the suite's out of the user's own
os.environ.setdefault("RINGCTL_STATE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), f"ringctl-tests-state-{os.getpid()}"))

from collections.abc import Iterator

import pytest

from slurm_cluster import DevCluster, running_cluster


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[DevCluster]:
    """2 SLURM nodes x 8 CPUs (more than the host has, via config_overrides), with accounting.

    Use `slurm_cluster.env` (SLURM_CONF set) for subprocesses or submitit, or
    `slurm_cluster.run("sbatch", ...)`; node names are `slurm_cluster.node_names`.
    Skipped when not root or SLURM is not installed, except under CI=true (then it fails).
    A fresh cluster restarts its job ids: give submitit a fresh folder (tmp_path).
    """
    with running_cluster("plain", nodes=2, cpus=8, prefix="node") as cluster:
        yield cluster
