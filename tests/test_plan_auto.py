"""topology.ring=auto: the cost model's faster ring, and the side-by-side figures `ringctl plan`
shows (flat, hierarchical, rank-order; the sequence length from which transfer hides)."""

from __future__ import annotations

import pytest

from ringctl.errors import ConfigError
from ringctl.plan import Workload, alternatives, estimate, make_plan, overlap_seq_len
from ringctl.topology import LinkClass, Topology

H100_LAYER = Workload(batch=1, seq_len=131072, heads=32, kv_heads=8, head_dim=128, dtype="bfloat16")


def _topology(nodes: int, per_node: int, nics: int, distribution: str = "block") -> Topology:
    return Topology.from_config(
        {"nodes": nodes, "ranks_per_node": per_node, "nics_per_node": nics, "distribution": distribution}
    )


@pytest.mark.parametrize(
    ("nodes", "per_node", "nics"),
    [(2, 8, 8), (4, 4, 1), (4, 8, 1), (16, 8, 8), (1, 8, 8), (4, 2, 1)],
)
def test_auto_is_the_cheapest_feasible_algorithm(nodes: int, per_node: int, nics: int) -> None:
    topo = _topology(nodes, per_node, nics)
    chosen = make_plan(topo, algorithm="auto", direction="auto", workload=H100_LAYER, direction_min_gain=0.0)
    totals = {name: estimate(p, H100_LAYER).total_s for name, p in alternatives(chosen, H100_LAYER).items() if name != "rank-order"}
    assert chosen.requested == "auto"
    assert estimate(chosen, H100_LAYER).total_s == min(totals.values())
    assert chosen.algorithm in totals


def test_auto_picks_flat_where_one_nic_per_node_makes_the_double_ring_slower() -> None:
    """The issue's case: 4 nodes x 4 ranks, one NIC per node. The double ring sends L flows
    through one NIC at once; the flat ring sends one."""
    topo = _topology(4, 4, 1)
    flat = estimate(make_plan(topo, algorithm="flat"), H100_LAYER).total_s
    hier = estimate(make_plan(topo, algorithm="hierarchical"), H100_LAYER).total_s
    assert flat < hier
    assert make_plan(topo, algorithm="auto", workload=H100_LAYER).algorithm == "flat"


def test_auto_picks_the_double_ring_on_an_h100_pair() -> None:
    topo = Topology(
        (8, 8), intra=LinkClass("intra", 450.0, 2.0), inter=LinkClass("inter", 50.0, 5.0), nics_per_node=8
    )
    short = Workload(batch=1, seq_len=16384, heads=32, kv_heads=8, head_dim=128, dtype="bfloat16")
    assert make_plan(topo, algorithm="auto", workload=short).algorithm == "hierarchical"


def test_auto_on_uneven_nodes_is_flat_and_hierarchical_is_refused() -> None:
    topo = Topology((3, 1))
    assert make_plan(topo, algorithm="auto").algorithm == "flat"
    with pytest.raises(ConfigError, match=r"topology\.ring"):
        make_plan(topo, algorithm="hierarchical")


def test_unknown_ring_names_the_key_and_choices() -> None:
    with pytest.raises(ConfigError, match=r"topology.ring='nope'.*auto \| flat \| hierarchical"):
        make_plan(Topology((2,)), algorithm="nope")


def test_overlap_seq_len_is_where_the_verdict_flips() -> None:
    topo = _topology(4, 8, 1)
    plan = make_plan(topo, algorithm="flat")
    edge = overlap_seq_len(plan, H100_LAYER)
    assert edge % plan.seq_len_divisor == 0
    at = Workload(**{**H100_LAYER.__dict__, "seq_len": edge})
    below = Workload(**{**H100_LAYER.__dict__, "seq_len": edge - plan.seq_len_divisor})
    assert estimate(plan, at).overlap_ok
    assert not estimate(plan, below).overlap_ok


def test_plan_json_has_the_alternatives() -> None:
    plan = make_plan(_topology(2, 8, 8), algorithm="auto", workload=H100_LAYER)
    data = plan.to_dict(H100_LAYER)
    assert data["ring_requested"] == "auto"
    assert set(data["alternatives"]) == {
        "flat", "hierarchical", "flat bidirectional", "hierarchical bidirectional", "flat tokenring",
        "hierarchical tokenring", "rank-order",
    }
    for figures in data["alternatives"].values():
        assert figures["predicted_total_time_s"] > 0
        assert figures["overlap_from_seq_len"] % plan.seq_len_divisor == 0
