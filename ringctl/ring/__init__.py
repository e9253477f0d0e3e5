"""The ring attention runtime: pass-KV ring over a torch.distributed group, following a RingPlan.

- ``attention``: ``ring_attention`` (autograd.Function, one loop for every layout/schedule)
- ``schedule``: a RingPlan as nested ring levels (flat, hierarchical)
- ``comm``: P2P hops and byte counters (``comm_stats``, ``reset_comm_stats``)
- ``layouts``: ``shard_sequence`` / ``unshard_sequence`` and token positions
- ``block`` / ``merge``: one block's attention with log-sum-exp, and the lse merge
"""

from __future__ import annotations

from .attention import ring_attention
from .comm import comm_stats, reset_comm_stats
from .layouts import LAYOUTS, shard_sequence, unshard_sequence

__all__ = [
    "LAYOUTS",
    "comm_stats",
    "reset_comm_stats",
    "ring_attention",
    "shard_sequence",
    "unshard_sequence",
]
