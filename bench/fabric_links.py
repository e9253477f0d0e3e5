"""Link rates of the dev cluster's emulated fabric, measured side by side in one run.

    sudo .venv/bin/python bench/fabric_links.py                       # inter=100mbit, nics=2
    sudo .venv/bin/python bench/fabric_links.py --inter 1gbit --mb 16 --rounds 5

Brings up a 2-node fabric cluster (`slurm/dev-cluster up --fabric inter=RATE,nics=K`, one
NIC per rank), then, each round, under srun with K ranks per node:
- tests/fabric_probe.py: raw TCP on every rail at once, node 2 -> node 1 then back (one
  direction at a time), and each rank to its own address (the namespace's loopback);
- tests/ring_hop_probe.py: ringctl's own hop (RingComm.hop over gloo), both directions of a
  node pair at once.
It tears the cluster down (always) and prints MB/s (slowest rank) and the ratios to the tbf
rate. tests/test_dev_cluster.py checks these only to an order of magnitude; this script is
where the figures come from. The ratio to watch is hop / TCP one-way: ~1.0 when the two
directions of a hop overlap, ~0.5 when they run one after the other (as when RingComm
posted isend before irecv: gloo's "receive ready" notice queued behind the peer's data).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

# the dev cluster's driver and the probes live with the tests
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from slurm_cluster import DevCluster, start, stop

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"

UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


def rate_mbytes(rate: str) -> float:
    """A tc rate (100mbit, 1gbit, ...) in MB/s, as slurm/dev-cluster parses it."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]+)", rate.lower())
    if match is None or match.group(2) not in UNITS:
        raise ValueError(f"--inter {rate!r}: a tc rate, a number and one of {', '.join(UNITS)} (e.g. 100mbit)")
    return float(match.group(1)) * UNITS[match.group(2)] / 8 / 1e6


def probe(cluster: DevCluster, script: str, nics: int, mb: float, rendezvous: Path) -> list[dict[str, Any]]:
    """One srun of a probe over both nodes, K tasks per node; its JSON lines."""
    out = cluster.run(
        "srun", "-N2", f"--ntasks-per-node={nics}", sys.executable, str(TESTS / script),
        "--dir", str(rendezvous), "--mb", str(mb), timeout=600,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def one_round(cluster: DevCluster, nics: int, mb: float) -> dict[str, float]:
    """MB/s of the slowest rank for each transfer kind, TCP and ring hop back to back."""
    with tempfile.TemporaryDirectory(prefix="ringctl-links-") as tcp_dir, \
            tempfile.TemporaryDirectory(prefix="ringctl-links-") as hop_dir:
        tcp = probe(cluster, "fabric_probe.py", nics, mb, Path(tcp_dir))
        hop = probe(cluster, "ring_hop_probe.py", nics, mb, Path(hop_dir))
    return {
        "tcp_one_way": min(float(r["cross_MBps"]) for r in tcp if "cross_MBps" in r),
        "tcp_back": min(float(r["cross_back_MBps"]) for r in tcp if "cross_back_MBps" in r),
        "loopback": min(float(r["loop_MBps"]) for r in tcp),
        "hop_each_way": min(float(r["MBps"]) for r in hop),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inter", default="100mbit", help="tbf rate of every NIC, each way (default 100mbit)")
    parser.add_argument("--nics", type=int, default=2, help="NICs per node = ranks per node (default 2)")
    parser.add_argument("--mb", type=float, default=4.0, help="MB per transfer (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both probes (default 3)")
    args = parser.parse_args(argv)
    rate = rate_mbytes(args.inter)
    if not 1 <= args.nics <= 16:
        raise SystemExit(f"fabric_links: --nics {args.nics}: allowed 1..16")
    if args.rounds < 1 or args.mb <= 0:
        raise SystemExit(f"fabric_links: --rounds {args.rounds} / --mb {args.mb}: rounds >= 1, mb > 0")
    if os.geteuid() != 0:
        raise SystemExit("fabric_links: the dev cluster needs root")
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # srun passes them to the ranks
    state_dir = Path(f"/tmp/ringctl-fabric-links-{os.getpid()}")
    fabric = f"inter={args.inter},nics={args.nics}"
    cluster = start(state_dir, nodes=2, cpus=args.nics, prefix=f"fl{os.getpid() % 10000}n", fabric=fabric)
    try:
        rounds = [one_round(cluster, args.nics, args.mb) for _ in range(args.rounds)]
    finally:
        stop(cluster)
    print(f"fabric {fabric}: tbf {rate:.2f} MB/s per NIC each way; {args.mb:g} MB per transfer; "
          f"MB/s of the slowest rank; load average {os.getloadavg()[0]:.2f}")
    keys = list(rounds[0])
    print(f"{'round':>5s} " + " ".join(f"{k:>13s}" for k in keys) + f" {'hop/tcp':>8s}")
    for i, r in enumerate(rounds, start=1):
        print(f"{i:5d} " + " ".join(f"{r[k]:13.2f}" for k in keys) + f" {r['hop_each_way'] / r['tcp_one_way']:8.2f}")
    median = {k: statistics.median(r[k] for r in rounds) for k in keys}
    print("median over rounds, / tbf rate: " + ", ".join(f"{k} {median[k] / rate:.2f}" for k in keys))
    hop_over_tcp = statistics.median(r["hop_each_way"] / r["tcp_one_way"] for r in rounds)
    print(f"ring hop (both ways at once) / TCP one way, median: {hop_over_tcp:.2f} (~1.0 overlapped, ~0.5 serialised)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
