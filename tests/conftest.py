"""Shared fixtures. `slurm_cluster`: a real SLURM dev cluster (slurm/dev-cluster) for the session."""

from __future__ import annotations

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
