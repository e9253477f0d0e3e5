"""`topology.order`: the rank-order baseline ring as a real plan, and the emulated-fabric
topology configs (conf/topology/emulated*.yaml) that bench/fabric.py runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ringctl.config import CONF_DIR, compose
from ringctl.errors import ConfigError
from ringctl.plan import Workload, estimate, make_plan
from ringctl.topology import Topology

EMULATED = ("emulated2node", "emulated2node_rails", "emulated3node")


def cyclic(nodes: int, per_node: int) -> Topology:
    return Topology.from_config({"nodes": nodes, "ranks_per_node": per_node, "distribution": "cyclic"})


def test_rank_order_ring_crosses_nodes_on_every_hop_under_cyclic_placement() -> None:
    topo = cyclic(2, 2)  # ranks 0, 2 on node 0; 1, 3 on node 1
    baseline = make_plan(topo, algorithm="flat", order="rank")
    aware = make_plan(topo, algorithm="flat", order="node")
    assert baseline.ring_order == (0, 1, 2, 3) and aware.ring_order == (0, 2, 1, 3)
    assert baseline.cross_node_hops == 4 and aware.cross_node_hops == 2
    assert [e[2] for e in baseline.edges()] == ["inter"] * 4
    assert [e[2] for e in aware.edges()] == ["intra", "inter", "intra", "inter"]


def test_rank_order_costs_twice_the_inter_time_on_one_shared_nic() -> None:
    # 2 flows leave each node on its one NIC: each gets half of it
    topo = Topology.from_config({
        "nodes": 2, "ranks_per_node": 2, "distribution": "cyclic", "nics_per_node": 1,
        "inter": {"bandwidth_GBps": 0.0125, "latency_us": 0.0}, "intra": {"bandwidth_GBps": 10.0, "latency_us": 0.0},
    })
    work = Workload(seq_len=2048, heads=8, kv_heads=2, head_dim=64, dtype="float32")
    kv = 2 * 512 * 2 * 64 * 4
    base = estimate(make_plan(topo, order="rank"), work)
    aware = estimate(make_plan(topo, order="node"), work)
    assert base.transfer_s["inter"] == pytest.approx(kv / (0.0125e9 / 2), rel=1e-12)
    assert aware.transfer_s["inter"] == pytest.approx(kv / 0.0125e9, rel=1e-12)


@pytest.mark.parametrize(
    ("order", "algorithm", "allowed"),
    [("ring", "flat", "node | rank"), ("rank", "hierarchical", "topology.ring=hierarchical")],
)
def test_bad_order_is_a_config_error(order: str, algorithm: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_plan(cyclic(2, 2), algorithm=algorithm, order=order)
    assert "topology.order" in str(err.value) and order in str(err.value) and allowed in str(err.value)


@pytest.mark.parametrize("name", EMULATED)
def test_emulated_topology_composes_and_every_field_is_commented(name: str) -> None:
    cfg = compose([f"+topology={name}"])
    topo = Topology.from_config(cfg.topology)
    assert topo.world_size == cfg.topology.nodes * cfg.topology.ranks_per_node
    assert cfg.topology.order in ("node", "rank")
    # the inter bandwidth is the tbf rate named in the file's --fabric inter=<N>mbit
    text = (CONF_DIR / "topology" / f"{name}.yaml").read_text()
    mbit = int(text.split("--fabric inter=")[1].split("mbit")[0])
    assert topo.inter.bandwidth_GBps == pytest.approx(mbit * 1e6 / 8 / 1e9)
    fields = [line for line in text.splitlines() if line and not line.startswith(("#", "defaults", "  -"))]
    assert fields and all("#" in line for line in fields), [line for line in fields if "#" not in line]


def test_plan_cli_takes_topology_order(tmp_path: Path) -> None:
    def plan(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ringctl", "plan", "+topology=emulated2node", *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)

    out = plan("topology.order=rank", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["ring_order"] == [0, 1, 2, 3] and data["cross_node_hops"] == 4
    bad = plan("topology.order=random")
    assert bad.returncode == 2 and "topology.order" in bad.stderr and "node | rank" in bad.stderr
