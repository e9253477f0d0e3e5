"""A ring context: the plan and layout of a live process group, owned in one place.

Every rank must hold the shard of its ring *position* (`plan.position(rank)`), not of its
rank; with a topology-aware plan the two differ, and sharding by rank gives no error, only
wrong attention. The context asks for neither: it discovers the nodes, plans the ring, and
shards, positions, attends and gathers with that one plan.

    import torch.distributed as dist
    from ringctl import RingContext

    dist.init_process_group("nccl")            # or gloo; torchrun, SLURM, submitit ...
    ctx = RingContext()                        # default group, zigzag, nodes discovered
    q, k, v = (ctx.shard(t) for t in (q, k, v))     # (B, S, H, D) -> this rank's tokens
    position_ids = ctx.positions(S)            # their global indices, for RoPE
    out = ctx.attention(q, k, v, causal=True)  # (B, S_local, Hq, D)
    full = ctx.gather(out)                     # (B, S, Hq, D), sequence order, every rank
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from ringctl.job import discover, node_name
from ringctl.plan import ALGORITHMS, DIRECTION_CHOICES, ORDERS, RingPlan, make_plan
from ringctl.ring import ring_attention, shard_sequence, unshard_sequence
from ringctl.ring.layouts import check_layout, document_positions, token_positions
from ringctl.topology import Topology, setting

# ring_attention arguments the context fills in itself
_OWNED = ("layout", "group", "plan")


class RingContext:
    """The ring of a live process group: its plan and layout, and the only ways to shard,
    position, attend and gather by them.

    group: the process group (default: the default group). layout: contiguous | zigzag |
    striped (default zigzag, or the plan's). Then at most one source of the plan:

    - nothing: the nodes are discovered (SLURMD_NODENAME, else the hostname, all_gathered
      over the group), optionally cut into virtual nodes of `virtual_node_size` ranks, and
      the ring planned with `algorithm` (flat | hierarchical), `order` (node | rank) and
      `direction` (one_way | bidirectional | tokenring | auto; default one_way: `auto` prices
      the planner's default long-context layer, so name one when your shapes differ);
    - `topology`: a `Topology` (its placement is taken as given: its world size must be the
      group's) or a topology config (mapping or TopologyConfig: its link classes and, unless
      given here, its `ring`, `order` and `virtual_node_size`; the placement is discovered);
    - `plan`: a `RingPlan` for this group's ranks, used as is.

    Ranks are the group's ranks (`dist.get_rank(group)`); every rank must build its context
    with the same arguments (construction is collective unless `topology` is a Topology or
    `plan` is given).
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        layout: str | None = None,
        topology: Topology | Mapping[str, Any] | Any = None,
        algorithm: str | None = None,
        order: str | None = None,
        virtual_node_size: int | None = None,
        plan: RingPlan | None = None,
        direction: str | None = None,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("RingContext needs torch.distributed: call dist.init_process_group first")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError("group: this process is not a member of the group it passed")
        if plan is not None:
            given = {
                "topology": topology, "algorithm": algorithm, "order": order,
                "virtual_node_size": virtual_node_size, "direction": direction,
            }  # fmt: skip
            clash = [name for name, value in given.items() if value is not None]
            if clash:
                raise ValueError(f"plan= is given, so {', '.join(clash)} cannot be: the plan already fixes them")
            self.plan = self._checked_plan(plan, layout)
        else:
            self.plan = self._make_plan(layout, topology, algorithm, order, virtual_node_size, direction)
        self.layout: str = self.plan.layout
        self.topology: Topology | None = self.plan.topology
        # rank -> position is a property of the plan; the context caches this rank's once
        self.position: int = self.plan.position(self.rank)

    # ---- construction -----------------------------------------------------------------
    def _checked_plan(self, plan: RingPlan, layout: str | None) -> RingPlan:
        if not isinstance(plan, RingPlan):
            raise ValueError(f"plan must be a ringctl.RingPlan, got {type(plan).__name__}")
        if plan.world_size != self.world_size:
            raise ValueError(
                f"plan.world_size={plan.world_size} does not match the group's {self.world_size} ranks"
            )
        if layout is not None and check_layout(layout) != plan.layout:
            raise ValueError(f"layout={layout!r} contradicts plan.layout={plan.layout!r}; give one of them")
        return plan

    def _make_plan(
        self,
        layout: str | None,
        topology: Any,
        algorithm: str | None,
        order: str | None,
        virtual_node_size: int | None,
        direction: str | None = None,
    ) -> RingPlan:
        layout = check_layout("zigzag" if layout is None else layout)
        algorithm = algorithm if algorithm is not None else setting(topology, "ring", "flat")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm={algorithm!r} is not a ring algorithm; allowed: {', '.join(ALGORITHMS)}")
        order = order if order is not None else setting(topology, "order", "node")
        if order not in ORDERS:
            raise ValueError(f"order={order!r} is not a ring order; allowed: {', '.join(ORDERS)}")
        direction = "one_way" if direction is None else direction  # not the config's: auto prices another layer
        if direction not in DIRECTION_CHOICES:
            raise ValueError(f"direction={direction!r} is invalid; allowed: {' | '.join(DIRECTION_CHOICES)}")
        if isinstance(topology, Topology):
            if virtual_node_size is not None:
                raise ValueError("virtual_node_size cuts discovered nodes; a Topology's placement is given as is")
            if topology.world_size != self.world_size:
                raise ValueError(
                    f"topology has {topology.world_size} ranks; the group has {self.world_size}"
                )
            placed = topology
        else:
            if virtual_node_size is None:
                virtual_node_size = setting(topology, "virtual_node_size", None)
            names: list[Any] = [None] * self.world_size
            dist.all_gather_object(names, node_name(), group=self.group)
            placed = discover(topology, [str(n) for n in names], virtual_node_size)
        return make_plan(placed, layout=layout, algorithm=algorithm, order=order, direction=direction)

    # ---- the four operations ------------------------------------------------------------
    def shard(self, x: torch.Tensor, dim: int = 1, *, cu_seqlens: Any = None) -> torch.Tensor:
        """This rank's part of the full sequence `x` (the same on every rank) along `dim`.
        `cu_seqlens` (packed documents, as `attention` takes them) places the `docs`
        layout's documents; the other layouts only check it."""
        return shard_sequence(x, self.position, self.world_size, layout=self.layout, dim=dim, cu_seqlens=cu_seqlens)

    def positions(
        self,
        seq_len: int,
        *,
        cu_seqlens: Any = None,
        per_document: bool = False,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Global indices (int64, ascending) of the tokens `shard` gives this rank out of a
        sequence of `seq_len`: the position ids for RoPE (`.unsqueeze(0)` for a batch).
        With `per_document`, positions restart at 0 in every document of `cu_seqlens` (as
        packed models number them; padding rows get 0)."""
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len={seq_len!r} must be an int >= 1 (the global sequence length)")
        if per_document:
            return document_positions(
                seq_len, self.position, self.world_size, self.layout, cu_seqlens=cu_seqlens, device=device
            )
        return token_positions(seq_len, self.position, self.world_size, self.layout, cu_seqlens=cu_seqlens, device=device)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = False,
        softmax_scale: float | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """`ringctl.ring_attention` on this rank's shards (B, S_local, H, D), with the
        context's group, plan and layout; `options` go to ring_attention as they are."""
        owned = sorted(set(options) & set(_OWNED))
        if owned:
            raise ValueError(f"{', '.join(owned)}: the context sets these itself; build another RingContext to change them")
        return ring_attention(
            q, k, v, causal=causal, softmax_scale=softmax_scale,
            layout=self.layout, group=self.group, plan=self.plan, **options,
        )

    def gather(
        self, x: torch.Tensor, dim: int = 1, *, cu_seqlens: Any = None, seq_len: int | None = None
    ) -> torch.Tensor:
        """Every rank's shard of `x` along `dim`, reassembled in sequence order, on every rank
        (`docs` layout: pass the `cu_seqlens` it was sharded with, and `seq_len` when the
        sequence ran past the last boundary; its pad rows are dropped).

        Differentiable with the adjoint of an all-gather: a shard's gradient is the sum over
        ranks of what each rank's use of the result sends back (a loss computed identically
        on every rank counts world_size times)."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
            raise ValueError(f"dim={dim!r} is out of range for x with shape {tuple(x.shape)}")
        return _Gather.apply(x, self, dim % x.dim(), cu_seqlens, seq_len)

    def __repr__(self) -> str:
        return (
            f"RingContext(rank={self.rank}, position={self.position}, world_size={self.world_size}, "
            f"layout={self.layout!r}, algorithm={self.plan.algorithm!r}, ring_order={list(self.plan.ring_order)})"
        )


class _Gather(torch.autograd.Function):
    """all_gather in position order; backward sums the incoming gradients over the ranks
    and keeps this rank's tokens (gloo has no reduce_scatter; the shard is not contiguous)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, ring: RingContext, dim: int, cu_seqlens: Any, seq_len: int | None
    ) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(ring.world_size)]
        dist.all_gather(parts, x, group=ring.group)
        by_position = [parts[rank] for rank in ring.plan.ring_order]
        ctx.ring, ctx.dim, ctx.cu_seqlens = ring, dim, cu_seqlens
        return unshard_sequence(by_position, layout=ring.layout, dim=dim, cu_seqlens=cu_seqlens, seq_len=seq_len)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.ring.group)
        return ctx.ring.shard(total, ctx.dim, cu_seqlens=ctx.cu_seqlens), None, None, None, None
