"""Typed configuration: dataclass schemas registered in Hydra's ConfigStore.

Defaults live in the YAML files under conf/ (each group's files extend the schema
registered here as `<group>/schema`); these dataclasses give types and validation.
Only the CLI and the launcher read these objects: the runtime takes a RingPlan and
tensors, never config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

#: the conf/ directory at the repository root (the package is installed editable)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class LinkConfig:
    """One link class of the fabric. Bandwidth is GB/s in one direction, per link (per NIC)."""

    bandwidth_GBps: float = 450.0
    latency_us: float = 2.0


@dataclass
class TopologyConfig:
    """The machine the job runs on, as the planner sees it (see ringctl/topology.py)."""

    name: str = "local"
    nodes: int = 1
    # int for even nodes, or a list with one entry per node for uneven ones
    ranks_per_node: Any = 2
    gpus_per_node: int = 0
    nics_per_node: int = 1
    intra: LinkConfig = field(default_factory=LinkConfig)
    inter: LinkConfig = field(default_factory=lambda: LinkConfig(bandwidth_GBps=50.0, latency_us=5.0))
    ring: str = "flat"  # flat | hierarchical
    distribution: str = "block"  # block | cyclic: how SLURM places ranks on nodes
    # ranks per virtual node when one machine stands in for several nodes (null = real hostnames)
    virtual_node_size: Any = None
    compute_tflops: float = 400.0  # attention FLOP rate per rank for the cost model


cs = ConfigStore.instance()
cs.store(group="topology", name="schema", node=TopologyConfig)
