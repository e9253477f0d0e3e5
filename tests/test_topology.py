"""Topology: rank placement from config (SLURM block/cyclic), discovery from node names,
validation, and composition of every conf/topology file with Hydra's compose API."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ringctl.config import CONF_DIR, compose
from ringctl.errors import ConfigError
from ringctl.topology import LinkClass, Topology, place_ranks

TOPOLOGY_FILES = {"1node": (1, "flat"), "2node": (2, "hierarchical"), "4node": (4, "hierarchical"), "16node": (16, "hierarchical")}


@pytest.mark.parametrize(
    "counts, distribution, expected",
    [
        ((2, 2), "block", (0, 0, 1, 1)),
        ((2, 2), "cyclic", (0, 1, 0, 1)),
        ((4, 4), "cyclic", (0, 1, 0, 1, 0, 1, 0, 1)),
        ((3, 1, 2), "block", (0, 0, 0, 1, 2, 2)),
        # cyclic deals round-robin over nodes that still have room: 0 1 2 | 0 2 | 0
        ((3, 1, 2), "cyclic", (0, 1, 2, 0, 2, 0)),
    ],
)
def test_place_ranks(counts: tuple[int, ...], distribution: str, expected: tuple[int, ...]) -> None:
    assert place_ranks(counts, distribution) == expected


def test_from_config_mapping_and_dataclass() -> None:
    topo = Topology.from_config({"nodes": 2, "ranks_per_node": 4, "distribution": "cyclic", "nics_per_node": 2,
                                 "inter": {"bandwidth_GBps": 25.0, "latency_us": 3.0}})
    assert topo.nodes == 2 and topo.world_size == 8 and topo.is_even
    assert topo.rank_to_node == (0, 1, 0, 1, 0, 1, 0, 1)
    assert topo.ranks_of_nodes() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert topo.inter == LinkClass("inter", 25.0, 3.0) and topo.nics_per_node == 2
    assert topo.intra == LinkClass("intra", 450.0, 2.0)  # schema default where the mapping is silent
    composed = compose(["+topology=2node", "topology.nodes=3", "topology.ranks_per_node=[2,1,2]"]).topology
    from_schema = Topology.from_config(OmegaConf.to_object(composed))  # the typed TopologyConfig
    assert from_schema.ranks_per_node == (2, 1, 2) and not from_schema.is_even
    assert from_schema.rank_to_node == (0, 0, 1, 2, 2)


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"nodes": 0}, "topology.nodes"),
        ({"nodes": -2}, "topology.nodes"),
        ({"nodes": 2, "ranks_per_node": 0}, "topology.ranks_per_node"),
        ({"nodes": 2, "ranks_per_node": [1, 2, 3]}, "topology.ranks_per_node"),
        ({"nodes": 2, "distribution": "plane"}, "topology.distribution"),
        ({"inter": {"bandwidth_GBps": 0.0}}, "topology.inter.bandwidth_GBps"),
        ({"intra": {"bandwidth_GBps": -5.0}}, "topology.intra.bandwidth_GBps"),
        ({"intra": {"latency_us": -1.0}}, "topology.intra.latency_us"),
        ({"nics_per_node": 0}, "topology.nics_per_node"),
        ({"compute_tflops": 0.0}, "topology.compute_tflops"),
    ],
)
def test_from_config_rejects(cfg: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        Topology.from_config(cfg)
    assert info.value.key == key
    assert "allowed" in str(info.value) and "\n" not in str(info.value)


def test_placement_must_match_counts() -> None:
    with pytest.raises(ConfigError, match=r"topology\.rank_to_node"):
        Topology((2, 2), rank_to_node=(0, 0, 0, 1))


def test_discover_orders_nodes_by_first_appearance() -> None:
    # SLURM's plane/arbitrary placements and uneven tasks: whatever the names say
    topo = Topology.discover(["b", "a", "b", "c", "a", "b"], nics_per_node=2)
    assert topo.node_names == ("b", "a", "c")
    assert topo.rank_to_node == (0, 1, 0, 2, 1, 0)
    assert topo.ranks_per_node == (3, 2, 1)
    assert topo.nics_per_node == 2
    assert topo.rank_to_node[0] == 0


def test_discover_virtual_nodes() -> None:
    one_host = Topology.discover(["h"] * 6, virtual_node_size=2)
    assert one_host.rank_to_node == (0, 0, 1, 1, 2, 2) and one_host.nodes == 3
    uneven = Topology.discover(["h"] * 5, virtual_node_size=2)
    assert uneven.ranks_per_node == (2, 2, 1)
    # two real hosts, cyclic numbering: each host's ranks (in rank order) cut into pairs
    two_hosts = Topology.discover(["x", "y"] * 4, virtual_node_size=2)
    assert two_hosts.rank_to_node == (0, 1, 0, 1, 2, 3, 2, 3)
    with pytest.raises(ConfigError, match=r"topology\.virtual_node_size"):
        Topology.discover(["h"] * 4, virtual_node_size=0)


@pytest.mark.parametrize("name", sorted(TOPOLOGY_FILES))
def test_compose_topology_files(name: str) -> None:
    nodes, ring = TOPOLOGY_FILES[name]
    cfg = compose([f"+topology={name}"])
    assert isinstance(cfg.topology.nodes, int)  # typed by the schema
    assert cfg.topology.name == name and cfg.topology.nodes == nodes and cfg.topology.ring == ring
    topo = Topology.from_config(cfg.topology)
    assert topo.world_size == nodes * 8 and topo.nics_per_node == 8
    assert topo.intra.bandwidth_GBps > topo.inter.bandwidth_GBps > 0
    overridden = compose([f"+topology={name}", "topology.distribution=cyclic", "topology.nodes=3"])
    assert Topology.from_config(overridden.topology).rank_to_node[:4] == (0, 1, 2, 0)


@pytest.mark.parametrize("name", sorted(TOPOLOGY_FILES))
def test_topology_file_fields_are_commented(name: str) -> None:
    lines = (Path(CONF_DIR) / "topology" / f"{name}.yaml").read_text().splitlines()
    fields = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith(("#", "-")) and ln.strip() != "defaults:"]
    assert fields, name
    uncommented = [ln for ln in fields if "#" not in ln]
    assert not uncommented, f"{name}.yaml fields without a comment: {uncommented}"


def test_compose_rejects_unknown_topology() -> None:
    with pytest.raises(ConfigError) as info:
        compose(["+topology=nope"])
    assert info.value.key == "topology" and "2node" in info.value.allowed
