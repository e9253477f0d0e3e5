"""Where every rank runs and how fast the links between them are (no torch import).

A Topology is what the planner needs from the machine: nodes, ranks per node (uneven
allowed), which global rank sits on which node, and two link classes — `intra` (inside a
node, e.g. NVLink) and `inter` (between nodes, e.g. InfiniBand, `nics_per_node` NICs per
node). Each class says what kind of links it has (`links`): `switch` (every rank's or NIC's
port into one switch: InfiniBand, NVSwitch; a port's egress carries whatever it sends, to
any peer) or `mesh` (a link per pair, each direction with its own bandwidth: point-to-point
NVLink, xGMI, the dev cluster's `--fabric links=mesh`). It is built from config before a run (`from_config`, rank placement from SLURM's
`--distribution`) and from the ranks' real node names at run time (`discover`), so the plan
is right whatever numbering SLURM chose.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ringctl.errors import ConfigError, check_positive_int

DISTRIBUTIONS = ("block", "cyclic")
LINKS = ("intra", "inter")
#: what a link class's `links` may say: one port per rank (intra) or NIC (inter) into a
#: switch, or a link per pair of ranks (intra) or nodes (inter)
LINK_KINDS = ("switch", "mesh")


@dataclass(frozen=True)
class LinkClass:
    """One class of link. Bandwidth is GB/s (1e9 bytes/s) in one direction per link (per NIC
    for `inter` on a switch, per node pair on a mesh); latency is the per-message start-up
    cost in microseconds; `links`: switch | mesh (LINK_KINDS). `shared_port_efficiency`:
    the share of a switch port's rate that flows to (or from) two or more peers at once get
    together: 1.0 on credit-based fabrics (InfiniBand, NVLink), below 1 where TCP flows
    meeting in one rate-limited port lose time to drops and retransmits (the dev cluster's
    tbf fabric; `ringctl calibrate` measures it on three or more nodes)."""

    name: str
    bandwidth_GBps: float
    latency_us: float
    links: str = "switch"
    shared_port_efficiency: float = 1.0

    def __post_init__(self) -> None:
        key = f"topology.{self.name}"
        if not _is_number(self.bandwidth_GBps) or self.bandwidth_GBps <= 0:
            raise ConfigError(f"{key}.bandwidth_GBps", self.bandwidth_GBps, "a number > 0 (GB/s, one direction)")
        if not _is_number(self.latency_us) or self.latency_us < 0:
            raise ConfigError(f"{key}.latency_us", self.latency_us, "a number >= 0 (microseconds)")
        if self.links not in LINK_KINDS:
            raise ConfigError(
                f"{key}.links", self.links,
                "switch (a port per rank/NIC into a switch) | mesh (a link per pair, each direction its own)",
            )  # fmt: skip
        eff = self.shared_port_efficiency
        if not _is_number(eff) or not 0 < eff <= 1:
            raise ConfigError(
                f"{key}.shared_port_efficiency", eff,
                "a number in (0, 1]: the share of a port's rate flows to or from several peers get together",
            )  # fmt: skip


def _is_number(value: Any) -> bool:
    """A finite int or float (NaN and infinities are not usable figures)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def setting(cfg: Any, key: str, default: Any) -> Any:
    """cfg[key] for mappings (DictConfig included) and attributes for dataclasses; `default`
    when the key is missing or null. How the planner reads config nodes, everywhere."""
    if isinstance(cfg, Mapping) or (hasattr(cfg, "get") and not hasattr(cfg, "__dataclass_fields__")):
        value = cfg.get(key, default)
    else:
        value = getattr(cfg, key, default)
    return default if value is None and default is not None else value


@dataclass(frozen=True)
class Topology:
    """Nodes and ranks. `rank_to_node[r]` is rank r's node index; nodes are numbered in
    order of first appearance of their ranks, so rank 0 is always on node 0."""

    ranks_per_node: tuple[int, ...]
    intra: LinkClass = LinkClass("intra", 450.0, 2.0)
    inter: LinkClass = LinkClass("inter", 50.0, 5.0)
    nics_per_node: int = 1
    rank_to_node: tuple[int, ...] = ()  # empty: block placement (node 0's ranks first)
    node_names: tuple[str, ...] = ()  # empty: node0, node1, ...
    compute_tflops: float = 400.0  # attention FLOP rate per rank (TFLOP/s) for the cost model
    # fixed cost of one ring step's block compute besides its FLOPs (kernel launches, the
    # merge, the step's Python), microseconds: what decides small blocks (decode, pass-Q's
    # few queries); `ringctl calibrate` measures it
    step_overhead_us: float = 0.0
    # the rate (GB/s) a rank's attention streams a block's K/V: what bounds blocks with few
    # queries over many keys (decode, pass-Q), which FLOPs alone under-price; None: FLOPs only
    memory_bandwidth_GBps: float | None = None
    name: str = "custom"
    # memory one rank may fill, GB (1e9 bytes): device memory on GPU ranks, the rank's share
    # of host RAM on CPU ranks; None: unknown (nothing is checked against it)
    memory_per_rank_GB: float | None = None

    def __post_init__(self) -> None:
        counts = tuple(self.ranks_per_node)
        if not counts:
            raise ConfigError("topology.nodes", 0, "an integer >= 1")
        for count in counts:
            check_positive_int("topology.ranks_per_node", count)
        object.__setattr__(self, "ranks_per_node", counts)
        if not self.rank_to_node:
            object.__setattr__(self, "rank_to_node", tuple(n for n, c in enumerate(counts) for _ in range(c)))
        self._check_placement()
        if not self.node_names:
            object.__setattr__(self, "node_names", tuple(f"node{n}" for n in range(len(counts))))
        if len(self.node_names) != len(counts):
            raise ConfigError("topology.node_names", list(self.node_names), f"one name per node ({len(counts)})")
        check_positive_int("topology.nics_per_node", self.nics_per_node)
        if not _is_number(self.compute_tflops) or self.compute_tflops <= 0:
            raise ConfigError("topology.compute_tflops", self.compute_tflops, "a number > 0 (TFLOP/s per rank)")
        if not _is_number(self.step_overhead_us) or self.step_overhead_us < 0:
            raise ConfigError("topology.step_overhead_us", self.step_overhead_us, "a number >= 0 (microseconds per ring step)")
        if self.memory_bandwidth_GBps is not None and (not _is_number(self.memory_bandwidth_GBps) or self.memory_bandwidth_GBps <= 0):
            raise ConfigError(
                "topology.memory_bandwidth_GBps", self.memory_bandwidth_GBps,
                "a number > 0 (GB/s a rank's attention streams K/V), or null (blocks priced by FLOPs alone)",
            )  # fmt: skip
        if self.memory_per_rank_GB is not None and (not _is_number(self.memory_per_rank_GB) or self.memory_per_rank_GB <= 0):
            raise ConfigError(
                "topology.memory_per_rank_GB", self.memory_per_rank_GB,
                "a number > 0 (GB = 1e9 bytes one rank may fill), or null (unknown: not checked)",
            )
        if self.intra.name != "intra" or self.inter.name != "inter":
            raise ValueError(f"link classes must be named intra and inter, got {self.intra.name!r}, {self.inter.name!r}")

    def _check_placement(self) -> None:
        """rank_to_node must put exactly ranks_per_node[n] ranks on node n."""
        placement = tuple(self.rank_to_node)
        object.__setattr__(self, "rank_to_node", placement)
        seen = [0] * len(self.ranks_per_node)
        for node in placement:
            if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node < len(seen):
                raise ConfigError("topology.rank_to_node", node, f"node indices 0..{len(seen) - 1}")
            seen[node] += 1
        if tuple(seen) != self.ranks_per_node:
            raise ConfigError(
                "topology.rank_to_node", f"{tuple(seen)} ranks per node",
                f"a placement matching ranks_per_node {self.ranks_per_node}",
            )

    # ---- derived ---------------------------------------------------------------------
    @property
    def nodes(self) -> int:
        return len(self.ranks_per_node)

    @property
    def world_size(self) -> int:
        return len(self.rank_to_node)

    @property
    def is_even(self) -> bool:
        """Every node holds the same number of ranks (the hierarchical ring needs it)."""
        return len(set(self.ranks_per_node)) == 1

    def ranks_of_nodes(self) -> list[list[int]]:
        """Global ranks on each node, ascending. O(W)."""
        out: list[list[int]] = [[] for _ in range(self.nodes)]
        for rank, node in enumerate(self.rank_to_node):
            out[node].append(rank)
        return out

    def link(self, name: str) -> LinkClass:
        if name not in LINKS:
            raise ValueError(f"link class {name!r} is unknown; allowed: {', '.join(LINKS)}")
        return self.intra if name == "intra" else self.inter

    # ---- construction ----------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Any) -> Topology:
        """From a TopologyConfig, a DictConfig or a plain mapping. Missing keys take the
        TopologyConfig defaults; rank placement follows `distribution` (SLURM's block or
        cyclic). `virtual_node_size` is a run-time matter (see `discover`) and is ignored."""
        nodes = setting(cfg, "nodes", 1)
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
            raise ConfigError("topology.nodes", nodes, "an integer >= 1")
        per_node = setting(cfg, "ranks_per_node", 2)
        if isinstance(per_node, int) and not isinstance(per_node, bool):
            counts = (check_positive_int("topology.ranks_per_node", per_node),) * nodes
        elif hasattr(per_node, "__iter__") and not isinstance(per_node, (str, Mapping)):
            counts = tuple(per_node)  # a list, tuple or OmegaConf ListConfig
            if len(counts) != nodes:
                raise ConfigError(
                    "topology.ranks_per_node", list(counts), f"one integer per node ({nodes}) or a single integer"
                )
        else:
            raise ConfigError("topology.ranks_per_node", per_node, "an integer >= 1, or a list with one per node")
        distribution = setting(cfg, "distribution", "block")
        if distribution not in DISTRIBUTIONS:
            raise ConfigError("topology.distribution", distribution, " | ".join(DISTRIBUTIONS))
        for count in counts:
            check_positive_int("topology.ranks_per_node", count)
        placement = place_ranks(counts, distribution)
        return cls(
            ranks_per_node=counts,
            intra=_link(cfg, "intra", 450.0, 2.0),
            inter=_link(cfg, "inter", 50.0, 5.0),
            nics_per_node=setting(cfg, "nics_per_node", 1),
            rank_to_node=placement,
            compute_tflops=setting(cfg, "compute_tflops", 400.0),
            step_overhead_us=setting(cfg, "step_overhead_us", 0.0),
            memory_bandwidth_GBps=setting(cfg, "memory_bandwidth_GBps", None),
            name=str(setting(cfg, "name", "custom")),
            memory_per_rank_GB=setting(cfg, "memory_per_rank_GB", None),
        )

    @property
    def memory_per_rank_bytes(self) -> int | None:
        """memory_per_rank_GB in bytes (None when unknown)."""
        return None if self.memory_per_rank_GB is None else int(self.memory_per_rank_GB * 1e9)

    @classmethod
    def discover(
        cls,
        node_names_by_rank: Sequence[str],
        virtual_node_size: int | None = None,
        *,
        intra: LinkClass | None = None,
        inter: LinkClass | None = None,
        nics_per_node: int = 1,
        compute_tflops: float = 400.0,
        step_overhead_us: float = 0.0,
        memory_bandwidth_GBps: float | None = None,
        name: str = "discovered",
        memory_per_rank_GB: float | None = None,
    ) -> Topology:
        """The topology of a running job from each rank's node name (index = global rank),
        as all_gathered by the job. Nodes are numbered by first appearance. With
        `virtual_node_size` = v, each real node's ranks (in rank order) are cut into virtual
        nodes of v ranks (the last may be smaller), so one machine stands in for several."""
        names = [str(n) for n in node_names_by_rank]
        if not names:
            raise ConfigError("node_names_by_rank", [], "one node name per rank (at least one rank)")
        if virtual_node_size is not None:
            virtual_node_size = check_positive_int("topology.virtual_node_size", virtual_node_size)
            seen_on: dict[str, int] = {}
            keys = []
            for real in names:
                local = seen_on.get(real, 0)
                seen_on[real] = local + 1
                keys.append(f"{real}/v{local // virtual_node_size}")
            names = keys
        index: dict[str, int] = {}
        placement = []
        for node in names:
            placement.append(index.setdefault(node, len(index)))
        counts = [0] * len(index)
        for node_index in placement:
            counts[node_index] += 1
        return cls(
            ranks_per_node=tuple(counts),
            intra=intra or LinkClass("intra", 450.0, 2.0),
            inter=inter or LinkClass("inter", 50.0, 5.0),
            nics_per_node=nics_per_node,
            rank_to_node=tuple(placement),
            node_names=tuple(index),
            compute_tflops=compute_tflops,
            step_overhead_us=step_overhead_us,
            memory_bandwidth_GBps=memory_bandwidth_GBps,
            name=name,
            memory_per_rank_GB=memory_per_rank_GB,
        )


def _link(cfg: Any, key: str, bandwidth: float, latency: float) -> LinkClass:
    sub = setting(cfg, key, None)
    if sub is None:
        return LinkClass(key, bandwidth, latency)
    return LinkClass(
        key, setting(sub, "bandwidth_GBps", bandwidth), setting(sub, "latency_us", latency),
        setting(sub, "links", "switch"), setting(sub, "shared_port_efficiency", 1.0),
    )  # fmt: skip


def place_ranks(counts: Sequence[int], distribution: str) -> tuple[int, ...]:
    """Global rank -> node index as SLURM places tasks: `block` fills node 0 first;
    `cyclic` deals ranks round-robin over the nodes that still have room."""
    if distribution == "block":
        return tuple(n for n, c in enumerate(counts) for _ in range(c))
    if distribution == "cyclic":
        placement: list[int] = []
        open_nodes = list(range(len(counts)))
        round_ = 0
        while open_nodes:
            placement.extend(open_nodes)
            round_ += 1
            open_nodes = [n for n in open_nodes if counts[n] > round_]
        return tuple(placement)
    raise ConfigError("topology.distribution", distribution, " | ".join(DISTRIBUTIONS))
