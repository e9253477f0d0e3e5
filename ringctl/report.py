"""Human views of a RingPlan: a rich table (flat, hierarchical and the rank-order baseline
side by side), a second one (the plan's ring one-way, bidirectional and TokenRing) and a PNG of the ring drawn on the nodes, cross-node hops in another colour,
the outer ring as one labelled lane per node pair (no torch import).

matplotlib is used through its object API on the Agg canvas, so drawing never touches the
global backend of a job that imports this module.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from ringctl.infer_plan import INFER_MODES, InferWorkload, estimate_infer, infer_summary, sweep
from ringctl.memory import MemoryCheck, check_plan_memory
from ringctl.plan import DIRECTIONS, HOP_DIRECTIONS, RingPlan, Workload, alternatives, bytes_by_direction, estimate, overlap_seq_len
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


def decimal_bytes(n: float) -> str:
    """Bytes in the decimal units of topology.memory_per_rank_GB (1 GB = 1e9 bytes)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


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


def plan_table(plan: RingPlan, workload: Workload, memory: MemoryCheck | None = None) -> Any:
    """A rich Table: flat, hierarchical (where the topology allows it) and the rank-order
    ring (the topology-blind baseline) side by side; the plan's own column is marked. With
    `memory` (the plan's MemoryCheck), rows for each ring's predicted peak per rank against
    the same limit and the longest seq_len that fits it."""
    from rich.table import Table

    plans = {n: p for n, p in alternatives(plan, workload).items() if p.direction == "one_way"}
    mine = next((name for name, alt in plans.items() if replace(alt, direction=plan.direction) == plan), None)
    if mine is None:  # the plan is the rank-order ring itself (topology.order=rank)
        mine = "rank-order"
    costs = {name: estimate(alt, workload) for name, alt in plans.items()}
    how = " (chosen by topology.ring=auto)" if plan.requested == "auto" else ""
    table = Table(title=f"RingPlan: {plan.algorithm} ring{how}, {plan.layout} layout", title_justify="left")
    table.add_column("")
    for name in plans:
        label = f"{name} ring" if name != "rank-order" else "rank-order ring (baseline)"
        table.add_column(f"[bold]{label} <- plan[/]" if name == mine else label)

    def row(label: str, cell: Any) -> None:
        table.add_row(label, *(cell(name, plans[name], costs[name]) for name in plans))

    row("ring order by node", lambda n, p, c: ring_order_by_node(p))
    row("cross-node hops / revolution", lambda n, p, c: str(p.cross_node_hops))
    for link in ("intra", "inter"):
        color = COLORS[link]
        row(f"[{color}]bytes / step, {link}[/]", lambda n, p, c, link=link: human_bytes(c.bytes_per_step[link]))
        row(f"[{color}]transfer / hop, {link}[/]", lambda n, p, c, link=link: human_time(c.transfer_s[link]))
    row("inter flows per NIC", lambda n, p, c: f"{c.inter_flows_per_nic:g}")
    row("compute / block (fwd)", lambda n, p, c: human_time(c.compute_s["forward"]))
    row("step time (fwd, steady)", lambda n, p, c: human_time(c.step_time_s))
    fastest = min(c.total_s for c in costs.values())
    row("forward + backward", lambda n, p, c: human_time(c.total_s) + (" [green](fastest)[/]" if c.total_s == fastest else ""))
    row("overlap: block tokens / needed", lambda n, p, c: _needed(c))
    row("transfer hidden from seq_len", lambda n, p, c: f"{overlap_seq_len(p, workload):,}")
    row("overlap verdict", lambda n, p, c: _verdict(c.overlap_ok))
    if memory is not None:
        checks = {
            name: check_plan_memory(alt, workload, memory.limit_bytes, block_impl=memory.block_impl, cpu_threads=memory.cpu_threads)
            for name, alt in plans.items()
        }  # fmt: skip
        row("peak memory / rank (fwd+bwd + inputs)", lambda n, p, c: _peak(checks[n]))
        if memory.limit_bytes is not None:
            row("longest seq_len that fits memory", lambda n, p, c: f"{checks[n].max_seq_len:,}")
    return table


def direction_table(plan: RingPlan, workload: Workload) -> Any:
    """A rich Table: the plan's algorithm one-way, bidirectional (two K/V heads or more) and
    TokenRing side by side (bytes per phase, link class and direction summed over ranks;
    TokenRing's "next" is its queries, "prev" its partials going home), transfer per hop,
    predicted forward, backward and total; None for one rank."""
    from rich.table import Table

    if plan.world_size == 1:
        return None
    w = workload
    plans = {d: replace(plan, direction=d) for d in DIRECTIONS if d != "bidirectional" or w.kv_heads >= 2}
    costs = {d: estimate(p, w) for d, p in plans.items()}
    how = ""
    if plan.direction_requested == "auto":
        how = f" (chosen by topology.direction=auto: one_way unless another is predicted >= {plan.direction_min_gain:.0%} faster)"
    links = ", ".join(f"{link} {plan.topology.link(link).links}" for link in ("intra", "inter")) if plan.topology else ""
    table = Table(title=f"Direction: {plan.algorithm} ring, {' vs '.join(plans)}{how}; links: {links}", title_justify="left")
    table.add_column("")
    for d in plans:
        table.add_column(f"[bold]{d} <- plan[/]" if d == plan.direction else d)
    sent = {d: bytes_by_direction(p, w) for d, p in plans.items()}
    for phase, short in (("forward", "fwd"), ("backward", "bwd")):
        for link in ("intra", "inter"):
            color = COLORS[link]
            for hop in HOP_DIRECTIONS:
                table.add_row(f"[{color}]bytes {short}, {link} -> {hop}[/]", *(human_bytes(sent[d][phase][link][hop]) for d in plans))
    for link in ("intra", "inter"):
        table.add_row(f"[{COLORS[link]}]transfer / hop, {link}[/]", *(human_time(costs[d].transfer_s[link]) for d in plans))
    table.add_row("forward", *(human_time(c.forward_s) for c in costs.values()))
    table.add_row("backward", *(human_time(c.backward_s) for c in costs.values()))
    fastest = min(c.total_s for c in costs.values())
    table.add_row("forward + backward", *(human_time(c.total_s) + (" [green](fastest)[/]" if c.total_s == fastest else "") for c in costs.values()))
    return table


def _peak(check: MemoryCheck) -> str:
    est = check.estimate
    text = f"{decimal_bytes(est.with_inputs)} ({decimal_bytes(est.total)} + {decimal_bytes(est.inputs)})"
    if check.limit_bytes is None:
        return text
    return text + (" [green]fits[/]" if check.fits else " [red]does not fit[/]")


def memory_line(check: MemoryCheck) -> str:
    """One line: the predicted peak per rank, what it assumed, the limit and the verdict."""
    est = check.estimate
    text = (
        f"memory per rank: predicted peak {decimal_bytes(est.with_inputs)} = {decimal_bytes(est.total)} for one "
        f"ring_attention fwd+bwd ({est.peak_phase} peak, {est.passes} head pass(es), {check.block_impl} blocks) "
        f"+ {decimal_bytes(est.inputs)} of input shards"
    )
    if check.limit_bytes is None:
        return text + "; topology.memory_per_rank_GB is null (not checked)"
    verdict = "[green]fits[/]" if check.fits else "[red]does not fit: ringctl launch refuses it[/]"
    return (
        text + f"; topology.memory_per_rank_GB {check.limit_bytes / 1e9:g} GB: {verdict}; "
        f"longest seq_len that fits: {check.max_seq_len:,}"
    )


def _needed(cost: Any) -> str:
    worst = max(need for phase in cost.min_block_tokens.values() for need in phase.values())
    return f"{cost.block_tokens} / {worst}"


def _verdict(ok: bool) -> str:
    return "[green]transfer hidden[/]" if ok else "[red]transfer-bound[/]"


def inference_table(plan: RingPlan, inference: InferWorkload) -> Any:
    """A rich Table: one inference call (T new tokens over P cached) by pass-KV and by
    pass-Q side by side (the block that travels, bytes per link class per step and in all,
    compute, predicted time), the one `auto` picks marked."""
    from rich.table import Table

    w = inference
    costs = estimate_infer(plan, w)
    pick = min(INFER_MODES, key=lambda m: costs[m].predicted_s)
    table = Table(
        title=f"Inference: T={w.new_tokens:,} new tokens over P={w.cached_tokens:,} cached (T/(T+P)={w.fraction:.3g}), "
        f"batch {w.batch}, {w.layout} cache, one lane",
        title_justify="left",
    )
    table.add_column("")
    for mode in INFER_MODES:
        table.add_column(f"[bold]{mode} <- auto[/]" if mode == pick else mode)

    def row(label: str, cell: Any) -> None:
        table.add_row(label, *(cell(costs[m]) for m in INFER_MODES))

    row("block that travels (rows)", lambda c: f"{human_bytes(c.moving_bytes - c.home_bytes)} ({c.block_rows} rows)"
        + (f" + {human_bytes(c.home_bytes)} out/lse" if c.home_bytes else ""))
    for link in ("intra", "inter"):
        color = COLORS[link]
        row(f"[{color}]bytes / step, {link}[/]", lambda c, link=link: human_bytes(c.bytes_per_step[link]))
        row(f"[{color}]bytes in all, {link}[/]", lambda c, link=link: human_bytes(c.bytes_total[link]))
        row(f"[{color}]transfer / hop, {link}[/]", lambda c, link=link: human_time(c.transfer_s[link]))
    row("compute (busiest rank per step)", lambda c: human_time(c.compute_s))
    fastest = min(c.predicted_s for c in costs.values())
    row("predicted time", lambda c: human_time(c.predicted_s) + (" [green](fastest)[/]" if c.predicted_s == fastest else ""))
    return table


def crossover_line(plan: RingPlan, inference: InferWorkload) -> str:
    """Where pass-Q and pass-KV cost the same at this T + P, which wins below it, and what
    `auto` picks at the workload's point."""
    info = infer_summary(plan, inference)
    total, cross, below = inference.context, info["crossover"], info["faster_below_crossover"]
    here = f"auto picks {info['choice']} at T/(T+P)={inference.fraction:.3g}"
    if cross is None:
        return f"inference crossover: none at T+P={total:,} ({info['crossover_note']}); {here}"
    above = next(m for m in INFER_MODES if m != below)
    return (
        f"inference crossover: T/(T+P) = {cross:.3g} at T+P={total:,} (T ~ {cross * total:,.0f}): "
        f"{below} faster below, {above} above; {here}"
    )


def print_report(
    plan: RingPlan,
    workload: Workload,
    topology: Topology,
    console: Any = None,
    memory: MemoryCheck | None = None,
    inference: InferWorkload | None = None,
) -> None:
    """The header (topology and workload), the plan table and, with `memory`, the predicted
    peak memory per rank against the topology's, on a rich console; with `inference`, one
    inference call priced by pass-KV and pass-Q and the crossover T/(T+P)."""
    from rich.console import Console

    console = console or Console()
    counts = sorted(set(topology.ranks_per_node))
    per_node = str(counts[0]) if len(counts) == 1 else ",".join(map(str, topology.ranks_per_node[:8]))
    console.print(
        f"topology [bold]{topology.name}[/]: {topology.nodes} nodes x {per_node} ranks = {topology.world_size}; "
        f"[{COLORS['intra']}]intra {topology.intra.bandwidth_GBps:g} GB/s {topology.intra.latency_us:g} us[/], "
        f"[{COLORS['inter']}]inter {topology.inter.bandwidth_GBps:g} GB/s x {topology.nics_per_node} NICs "
        f"{topology.inter.latency_us:g} us"
        + (f", {topology.inter.shared_port_efficiency:g} of a port's rate to 2+ peers" if topology.inter.shared_port_efficiency < 1 else "")
        + f"[/], {topology.compute_tflops:g} TFLOP/s per rank"
        + (f" + {topology.step_overhead_us:g} us per ring step" if topology.step_overhead_us else "")
        + (f", K/V streamed at {topology.memory_bandwidth_GBps:g} GB/s" if topology.memory_bandwidth_GBps else "")
        + ("" if topology.memory_per_rank_GB is None else f", {topology.memory_per_rank_GB:g} GB memory per rank")
    )
    w = workload
    console.print(
        f"workload: batch {w.batch}, seq_len {w.seq_len}, heads {w.heads}/{w.kv_heads} kv, head_dim {w.head_dim}, "
        f"{w.dtype}, {'causal' if w.causal else 'full'}"
    )
    console.print(plan_table(plan, workload, memory))
    direction = direction_table(plan, workload)
    if direction is not None:
        console.print(direction)
    if workload.documents is not None:
        console.print(documents_line(plan, workload))
    if memory is not None:
        console.print(memory_line(memory))
    if inference is not None:
        console.print(inference_table(plan, inference))
        console.print(crossover_line(plan, inference))


def documents_line(plan: RingPlan, workload: Workload) -> str:
    """Packed documents: how many, the per-rank work imbalance (max / mean visible query-key
    pairs) under this plan's layout and the others, and the `docs` layout's padding."""
    from ringctl.plan import document_work

    work = document_work(plan, workload)
    others = ", ".join(f"{name} {value:.3f}" for name, value in work["imbalance_by_layout"].items() if name != plan.layout)
    visible = sum(work["visible_pairs_per_rank"])
    line = (
        f"documents {work['spec']} (seed {work['seed']}): {work['count']} documents, {work['tokens']:,} tokens; "
        f"{visible:,} visible query-key pairs; per-rank work max/mean {work['imbalance']:.3f} under {plan.layout}"
        + (f" ({others})" if others else "")
    )
    if plan.layout == "docs":
        line += f"; docs padding {work['layout_padding_tokens']} tokens ({work['layout_padding_fraction']:.2%})"
    return line


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


def _draw_lanes(ax: Any, lanes: dict[tuple[int, int], int], centres: list[tuple[float, float, float]], plan: RingPlan) -> None:
    """Cross-node traffic as one thick arrow per (src node, dst node) lane between the node
    circles, labelled with how many flows it carries at once (a hierarchical ring's outer
    step: every rank of the node; a flat ring: the edges that cross there)."""
    for (a, b), flows in sorted(lanes.items()):
        if a >= len(centres) or b >= len(centres):
            continue
        (ax_, ay, ar), (bx, by, br) = centres[a], centres[b]
        dx, dy = bx - ax_, by - ay
        dist = math.hypot(dx, dy) or 1.0
        ux, uy = dx / dist, dy / dist
        # two nodes exchanging both ways: offset each direction to its own side
        nx, ny = -uy * 0.06, ux * 0.06
        start = (ax_ + ux * ar + nx, ay + uy * ar + ny)
        end = (bx - ux * br + nx, by - uy * br + ny)
        ax.annotate(
            "", xy=end, xytext=start,
            arrowprops=dict(arrowstyle="-|>,head_width=0.5,head_length=0.8", color=COLORS["inter"],
                            lw=min(6.0, 1.5 + flows ** 0.5), shrinkA=2, shrinkB=2, alpha=0.85),
        )
        mx, my = (start[0] + end[0]) / 2 + nx * 1.5, (start[1] + end[1]) / 2 + ny * 1.5
        label = f"{flows} flow{'s' if flows > 1 else ''}"
        if plan.algorithm == "hierarchical":
            label = f"outer ring: {label}"
        side = "center" if abs(nx) < 1e-9 else ("left" if nx > 0 else "right")  # beside its own arrow
        ax.text(mx, my, label, fontsize=8, color=COLORS["inter"], ha=side, va="center",
                bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))


def plan_png(
    plan: RingPlan,
    path: str | Path,
    workload: Workload | None = None,
    memory: MemoryCheck | None = None,
    inference: InferWorkload | None = None,
) -> Path:
    """Draw the ring on the nodes and save a PNG at `path`: ranks as dots inside node
    circles, each intra-node send as an arrow, cross-node traffic as labelled lanes. With a
    `workload` the title adds the predicted step time and the overlap verdict; with `memory`,
    the predicted peak memory per rank against the topology's; with `inference`, a panel
    below: both modes' predicted time against T/(T+P) at its T+P (`inference_panel`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Circle

    path = Path(path)
    shown_nodes = min(plan.nodes, MAX_NODES)
    where, centres = _layout(plan, shown_nodes)
    panel = 3.4 if inference is not None else 0.0  # inches added below the ring for the panel
    height = 8.6 + panel
    fig = Figure(figsize=(8, height), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.03, (0.26 + panel) / height, 0.94, 7.22 / height))
    ax.set_aspect("equal")
    ax.axis("off")
    for n, (cx, cy, r) in enumerate(centres):
        ax.add_patch(Circle((cx, cy), r, facecolor="#f2f2f2", edgecolor="#555555", lw=1.2))
        norm = math.hypot(cx, cy) or 1.0
        ux, uy = (cx / norm, cy / norm) if (cx, cy) != (0.0, 0.0) else (0.0, 1.0)
        ax.text(cx + ux * (r + 0.09), cy + uy * (r + 0.09), plan.node_names[n], ha="center", va="center",
                fontsize=9, weight="bold")
    small = len(where) > 48
    lanes: dict[tuple[int, int], int] = {}  # (src node, dst node) -> parallel cross-node flows
    for src, dst, link, _ring in plan.edges():
        if link == "inter":
            pair = (plan.rank_to_node[src], plan.rank_to_node[dst])
            lanes[pair] = lanes.get(pair, 0) + 1
            continue
        if src not in where or dst not in where:
            continue
        ax.annotate(
            "", xy=where[dst], xytext=where[src],
            arrowprops=dict(
                arrowstyle="-|>", color=COLORS[link], lw=0.8 if small else 1.4,
                shrinkA=6, shrinkB=6, connectionstyle="arc3,rad=0.15", alpha=0.9,
            ),
        )
    _draw_lanes(ax, lanes, centres, plan)
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
            Line2D([], [], color=COLORS["inter"], lw=3, label="cross-node lane (flows at once)"),
        ],
        loc="lower right", fontsize=8, frameon=False,
    )
    title = (
        f"{plan.algorithm} ring, {plan.layout} layout: {plan.world_size} ranks on {plan.nodes} nodes\n"
        f"cross-node hops per revolution: {plan.cross_node_hops} (rank-order ring: {plan.baseline_cross_node_hops})"
    )
    if plan.direction == "tokenring" and plan.world_size > 1:
        title += "\nTokenRing: queries travel along the arrows, each partial result straight back to its owner"
    if workload is not None:
        cost = estimate(plan, workload)
        title += f"\npredicted step {human_time(cost.step_time_s)}, fwd+bwd {human_time(cost.total_s)}, " + (
            "transfer hidden" if cost.overlap_ok else "transfer-bound"
        )
    if memory is not None:
        title += f"\npeak memory per rank {decimal_bytes(memory.estimate.with_inputs)}"
        if memory.limit_bytes is not None:
            title += f" of {decimal_bytes(memory.limit_bytes)}: " + (
                f"fits (up to seq_len {memory.max_seq_len:,})" if memory.fits else f"DOES NOT FIT (seq_len <= {memory.max_seq_len:,} would)"
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
    if lanes:
        notes.append("red lanes: cross-node traffic, one arrow per node pair, labelled with its parallel flows")
    if notes:
        ax.text(-lim, -lim, "; ".join(notes), fontsize=8, va="bottom", color="#444444")
    if inference is not None:
        inference_panel(fig.add_axes((0.11, 0.55 / height, 0.84, 2.45 / height)), plan, inference)
    fig.savefig(path, format="png")
    return path


def inference_panel(ax: Any, plan: RingPlan, inference: InferWorkload) -> None:
    """Both modes' predicted time of one call against T/(T+P) at the workload's T + P (log
    x), the crossover as a dashed line and the workload's own point marked."""
    curve = sweep(plan, inference)
    info = infer_summary(plan, inference)
    here = info["modes"]
    top = max(max(kv, q) for _, kv, q in curve)
    unit, scale = next(((u, f) for u, f in (("s", 1.0), ("ms", 1e-3)) if top >= f), ("us", 1e-6))
    xs = [x for x, _, _ in curve]
    ax.plot(xs, [kv / scale for _, kv, _ in curve], color="#9467bd", lw=1.8, label="pass_kv")
    ax.plot(xs, [q / scale for _, _, q in curve], color="#2ca02c", lw=1.8, label="pass_q")
    for mode, color in (("pass_kv", "#9467bd"), ("pass_q", "#2ca02c")):
        ax.scatter([inference.fraction], [here[mode]["predicted_s"] / scale], s=40, color=color, edgecolors="black", zorder=3)
    ax.annotate(
        f"this workload: auto -> {info['choice']}", xy=(inference.fraction, here[info["choice"]]["predicted_s"] / scale),
        xytext=(8, 10), textcoords="offset points", fontsize=8,
    )  # fmt: skip
    if info["crossover"] is not None:
        ax.axvline(info["crossover"], color="#555555", ls="--", lw=1)
        ax.text(info["crossover"], 0.95, f" crossover {info['crossover']:.3g}", transform=ax.get_xaxis_transform(),
                fontsize=8, va="top", color="#555555")
    ax.set_xscale("log")
    ax.set_xlabel(f"T / (T + P) at T + P = {inference.context:,} tokens", fontsize=8)
    ax.set_ylabel(f"predicted time / call ({unit})", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(f"inference: pass-KV vs pass-Q, batch {inference.batch}, heads {inference.heads}/{inference.kv_heads} kv", fontsize=9)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
