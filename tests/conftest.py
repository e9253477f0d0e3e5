"""Shared fixtures. `slurm_cluster`: a real SLURM dev cluster (slurm/dev-cluster) for the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from slurm_cluster import DevCluster, DevClusterError, cluster_state_dir, require_dev_cluster, start, stop


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[DevCluster]:
    """2 SLURM nodes x 8 CPUs (more than the host has, via config_overrides), with accounting.

    Use `slurm_cluster.env` (SLURM_CONF set) for subprocesses or submitit, or
    `slurm_cluster.run("sbatch", ...)`; node names are `slurm_cluster.node_names`.
    Skipped when not root or SLURM is not installed, except under CI=true (then it fails).
    A fresh cluster restarts its job ids: give submitit a fresh folder (tmp_path).
    """
    require_dev_cluster()
    try:
        cluster = start(cluster_state_dir("plain"), nodes=2, cpus=8, prefix="node")
    except DevClusterError as err:
        pytest.fail(str(err), pytrace=False)
    try:
        yield cluster
    finally:
        stop(cluster)
