"""Human views of a RingPlan: a rich table (plan vs the rank-order baseline) and a PNG of
the ring drawn on the nodes, cross-node hops in another colour (no torch import).

matplotlib is used through its object API on the Agg canvas, so drawing never touches the
global backend of a job that imports this module.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ringctl.plan import RingPlan, Workload, baseline_plan, estimate
from ringctl.topology import Topology

#: colours of the link classes in the picture and the table
COLORS = {"intra": "#1f77b4", "inter": "#d62728"}
#: the picture draws at most this many nodes and ranks per node (the rest is summarised)
MAX_NODES = 16
MAX_RANKS = 16
#: the table lists the ring order of at most this many nodes
TABLE_NODES = 4


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def human_time(seconds: float) -> str:
    if seconds == 0:
        return "0"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def ring_order_by_node(plan: RingPlan, max_runs: int = TABLE_NODES, max_ranks: int = 8) -> str:
    """"node0: 0 2 4 | node1: 1 3 5" — the ring order cut into runs of ranks on one node
    (a node-contiguous ring has one run per node), truncated for big plans."""
    runs: list[list[int]] = []
    last = -1
    for rank in plan.ring_order:
        node = plan.rank_to_node[rank]
        if node != last:
            if len(runs) == max_runs:
                listed = sum(len(r) for r in runs)
                return _runs_text(plan, runs, max_ranks) + f" | ... ({plan.world_size - listed} more ranks)"
            runs.append([])
            last = node
        runs[-1].append(rank)
    return _runs_text(plan, runs, max_ranks)


def _runs_text(plan: RingPlan, runs: list[list[int]], max_ranks: int) -> str:
    parts = []
    for run in runs:
        shown = " ".join(map(str, run[:max_ranks])) + (" ..." if len(run) > max_ranks else "")
        parts.append(f"{plan.node_names[plan.rank_to_node[run[0]]]}: {shown}")
    return " | ".join(parts)


def plan_table(plan: RingPlan, workload: Workload) -> Any:
    """A rich Table: the plan's figures beside the rank-order ring's (the baseline)."""
    from rich.table import Table

    base = baseline_plan(plan)
    cost, base_cost = estimate(plan, workload), estimate(base, workload)
    table = Table(title=f"RingPlan: {plan.algorithm} ring, {plan.layout} layout", title_justify="left")
    table.add_column("")
    table.add_column(f"plan ({plan.algorithm})")
    table.add_column("rank-order ring (baseline)")
    table.add_row("ring order by node", ring_order_by_node(plan), ring_order_by_node(base))
    table.add_row("cross-node hops / revolution", str(plan.cross_node_hops), str(plan.baseline_cross_node_hops))
    for link in ("intra", "inter"):
        color = COLORS[link]
        table.add_row(
            f"[{color}]bytes / step, {link}[/]",
            human_bytes(cost.bytes_per_step[link]), human_bytes(base_cost.bytes_per_step[link]),
        )
        table.add_row(
            f"[{color}]transfer / hop, {link}[/]",
            human_time(cost.transfer_s[link]), human_time(base_cost.transfer_s[link]),
        )
    table.add_row("inter flows per NIC", f"{cost.inter_flows_per_nic:g}", f"{base_cost.inter_flows_per_nic:g}")
    table.add_row("compute / block (fwd)", human_time(cost.compute_s["forward"]), human_time(base_cost.compute_s["forward"]))
    table.add_row("step time (fwd, steady)", human_time(cost.step_time_s), human_time(base_cost.step_time_s))
    table.add_row("forward + backward", human_time(cost.total_s), human_time(base_cost.total_s))
    table.add_row("overlap: block tokens / needed", _needed(cost), _needed(base_cost))
    table.add_row("overlap verdict", _verdict(cost.overlap_ok), _verdict(base_cost.overlap_ok))
    return table


def _needed(cost: Any) -> str:
    worst = max(need for phase in cost.min_block_tokens.values() for need in phase.values())
    return f"{cost.block_tokens} / {worst}"


def _verdict(ok: bool) -> str:
    return "[green]transfer hidden[/]" if ok else "[red]transfer-bound[/]"


def print_report(plan: RingPlan, workload: Workload, topology: Topology, console: Any = None) -> None:
    """The header (topology and workload) and the plan table, on a rich console."""
    from rich.console import Console

    console = console or Console()
    counts = sorted(set(topology.ranks_per_node))
    per_node = str(counts[0]) if len(counts) == 1 else ",".join(map(str, topology.ranks_per_node[:8]))
    console.print(
        f"topology [bold]{topology.name}[/]: {topology.nodes} nodes x {per_node} ranks = {topology.world_size}; "
        f"[{COLORS['intra']}]intra {topology.intra.bandwidth_GBps:g} GB/s {topology.intra.latency_us:g} us[/], "
        f"[{COLORS['inter']}]inter {topology.inter.bandwidth_GBps:g} GB/s x {topology.nics_per_node} NICs "
        f"{topology.inter.latency_us:g} us[/], {topology.compute_tflops:g} TFLOP/s per rank"
    )
    w = workload
    console.print(
        f"workload: batch {w.batch}, seq_len {w.seq_len}, heads {w.heads}/{w.kv_heads} kv, head_dim {w.head_dim}, "
        f"{w.dtype}, {'causal' if w.causal else 'full'}"
    )
    console.print(plan_table(plan, workload))


# ---- picture --------------------------------------------------------------------------
def _layout(plan: RingPlan, nodes: int) -> tuple[dict[int, tuple[float, float]], list[tuple[float, float, float]]]:
    """Rank -> (x, y) for the drawn ranks, and (x, y, radius) per drawn node. Nodes sit on a
    big circle, each node's ranks on a small circle in ring order (the inner ring)."""
    big = 0.0 if nodes == 1 else 1.0
    node_r = 0.8 if nodes == 1 else min(0.42, 0.85 * math.sin(math.pi / nodes)) if nodes > 2 else 0.42
    centres = []
    for n in range(nodes):
        angle = math.pi / 2 - 2 * math.pi * n / nodes
        centres.append((big * math.cos(angle), big * math.sin(angle), node_r))
    members: list[list[int]] = [[] for _ in range(nodes)]
    for rank in plan.ring_order:
        node = plan.rank_to_node[rank]
        if node < nodes and len(members[node]) < MAX_RANKS:
            members[node].append(rank)
    where: dict[int, tuple[float, float]] = {}
    for n, ranks in enumerate(members):
        cx, cy, r = centres[n]
        inner = 0.62 * r if len(ranks) > 1 else 0.0
        for i, rank in enumerate(ranks):
            angle = math.pi / 2 - 2 * math.pi * i / len(ranks)
            where[rank] = (cx + inner * math.cos(angle), cy + inner * math.sin(angle))
    return where, centres


def plan_png(
    plan: RingPlan, path: str | Path, topology: Topology | None = None, workload: Workload | None = None
) -> Path:
    """Draw the ring on the nodes and save a PNG at `path`: ranks as dots inside node
    circles, each send of the schedule as an arrow, cross-node (inter) hops in red.
    `topology` is accepted for callers that hold one; the plan carries its own. With a
    `workload` the title adds the predicted step time and the overlap verdict."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Circle

    path = Path(path)
    shown_nodes = min(plan.nodes, MAX_NODES)
    where, centres = _layout(plan, shown_nodes)
    fig = Figure(figsize=(8, 8.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.03, 0.03, 0.94, 0.84))
    ax.set_aspect("equal")
    ax.axis("off")
    for n, (cx, cy, r) in enumerate(centres):
        ax.add_patch(Circle((cx, cy), r, facecolor="#f2f2f2", edgecolor="#555555", lw=1.2))
        norm = math.hypot(cx, cy) or 1.0
        ux, uy = (cx / norm, cy / norm) if (cx, cy) != (0.0, 0.0) else (0.0, 1.0)
        ax.text(cx + ux * (r + 0.09), cy + uy * (r + 0.09), plan.node_names[n], ha="center", va="center",
                fontsize=9, weight="bold")
    small = len(where) > 48
    rad = 0.22
    for src, dst, link, ring in plan.edges():
        if src not in where or dst not in where:
            continue
        if ring == "outer" and small and plan.position(src) % plan.inner_size:
            continue  # big plans: only lane 0 of the outer ring (every lane moves at once)
        style = "-" if ring != "outer" else (0, (4, 2))
        ax.annotate(
            "", xy=where[dst], xytext=where[src],
            arrowprops=dict(
                arrowstyle="-|>", color=COLORS[link], lw=0.8 if small else 1.4, linestyle=style,
                shrinkA=6, shrinkB=6, connectionstyle=f"arc3,rad={rad if link == 'inter' else 0.15}",
                alpha=0.55 if ring == "outer" else 0.9,
            ),
        )
    size = 60 if small else 240
    xs, ys = zip(*where.values()) if where else ((), ())
    ax.scatter(xs, ys, s=size, c="white", edgecolors="black", zorder=3)
    if not small:
        for rank, (x, y) in where.items():
            ax.text(x, y, str(rank), ha="center", va="center", fontsize=8, zorder=4)
    lim = 0.2 + max((abs(c) + r for cx, cy, r in centres for c in (cx, cy)), default=1.0)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.legend(
        handles=[
            Line2D([], [], color=COLORS["intra"], lw=2, label="intra-node hop"),
            Line2D([], [], color=COLORS["inter"], lw=2, label="cross-node hop"),
        ],
        loc="lower right", fontsize=8, frameon=False,
    )
    title = (
        f"{plan.algorithm} ring, {plan.layout} layout: {plan.world_size} ranks on {plan.nodes} nodes\n"
        f"cross-node hops per revolution: {plan.cross_node_hops} (rank-order ring: {plan.baseline_cross_node_hops})"
    )
    if workload is not None:
        cost = estimate(plan, workload)
        title += f"\npredicted step {human_time(cost.step_time_s)}, fwd+bwd {human_time(cost.total_s)}, " + (
            "transfer hidden" if cost.overlap_ok else "transfer-bound"
        )
    fig.suptitle(title, fontsize=10)
    notes = []
    if plan.nodes > shown_nodes:
        notes.append(f"first {shown_nodes} of {plan.nodes} nodes drawn")
    per_node = [0] * plan.nodes
    for node in plan.rank_to_node:
        per_node[node] += 1
    if max(per_node) > MAX_RANKS:
        notes.append(f"at most {MAX_RANKS} ranks per node drawn")
    if plan.algorithm == "hierarchical":
        notes.append("dashed: outer ring" + (" (lane 0 drawn; all lanes send at once)" if small else ""))
    if notes:
        ax.text(-lim, -lim, "; ".join(notes), fontsize=8, va="bottom", color="#444444")
    fig.savefig(path, format="png")
    return path
