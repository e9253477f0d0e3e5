"""The ring attention runtime: pass-KV ring over a torch.distributed group, following a RingPlan.

- ``attention``: ``ring_attention`` (autograd.Function, one loop for every layout/schedule)
- ``schedule``: a RingPlan as nested ring levels (flat, hierarchical)
- ``comm``: P2P hops and byte counters (``comm_stats``, ``reset_comm_stats``)
- ``layouts``: ``shard_sequence`` / ``unshard_sequence`` and token positions
- ``block`` / ``merge``: one block's attention with log-sum-exp, and the lse merge
- ``kv_cache`` / ``inference``: a KV cache sharded over the ring, and ``cached_attention``
  (pass-KV or pass-Q over it: prefill against a cache, decode)
"""

from __future__ import annotations

from .attention import ring_attention
from .comm import comm_stats, reset_comm_stats
from .inference import cached_attention
from .kv_cache import RingKVCache
from .layouts import LAYOUTS, shard_sequence, unshard_sequence

__all__ = [
    "LAYOUTS",
    "RingKVCache",
    "cached_attention",
    "comm_stats",
    "reset_comm_stats",
    "ring_attention",
    "shard_sequence",
    "unshard_sequence",
]
