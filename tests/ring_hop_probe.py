"""Times ringctl's own ring hop (RingComm.hop: gloo isend/irecv) across the emulated fabric.

    srun -N2 --ntasks-per-node=L python tests/ring_hop_probe.py --dir SHARED_DIR --mb 2

Every task exchanges a tensor with the task of the same local rank on the other node (the
2-node outer ring of a hierarchical plan: one peer, both directions at once, each rank on
its own NIC via the fabric's GLOO_SOCKET_IFNAME). Prints one JSON line per task: MB/s per
direction, from the least of the timed hops (the least disturbed on shared cores).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ringctl.ring.comm import RingComm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="shared folder for the FileStore")
    parser.add_argument("--mb", type=float, default=2.0, help="MB sent each way per hop")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    node, local = int(os.environ["SLURM_NODEID"]), int(os.environ["SLURM_LOCALID"])
    per_node = world // 2
    peer = (1 - node) * per_node + local  # srun's default block placement: node 0 holds 0..L-1
    torch.set_num_threads(1)
    store = dist.FileStore(str(args.dir / "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        comm = RingComm(None, rank, "forward", lambda src, dst: "inter")
        tensor = torch.full((int(args.mb * 1e6) // 4,), float(rank))
        seconds = []
        for i in range(args.repeats + 1):  # the first hop warms the connection up
            dist.barrier()
            start = time.perf_counter()
            received = comm.hop(tensor, peer, peer, tag=0).wait()
            if i:
                seconds.append(time.perf_counter() - start)
            if not isinstance(received, torch.Tensor) or not torch.equal(received, torch.full_like(tensor, float(peer))):
                raise RuntimeError(f"rank {rank}: received data is not rank {peer}'s")
        print(json.dumps({
            "rank": rank, "peer": peer, "ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
            "MBps": tensor.numel() * 4 / min(seconds) / 1e6,
        }), flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
