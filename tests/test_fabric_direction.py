"""Both directions of every link of the emulated fabric, on three- and four-node clusters.

A bidirectional ring (issue 13) can only gain where a link's reverse direction is idle
under a one-way ring. On a switch (links=switch, the default: each node's NIC to one
bridge, as with InfiniBand) a node's egress is shared by all its peers, so a one-way ring
already keeps every NIC busy both ways; with a link per node pair (links=mesh, as with
point-to-point NVLink or xGMI) each pair has its own capacity per direction. These tests run
tests/direction_probe.py under srun on a real dev cluster of each kind and check, by the
tbf qdiscs' byte counters (exact), which qdisc carried each direction of each node pair, and
each direction's rate to an order of magnitude (the 2 cores are shared). The one-way vs
two-way ring times are a ratio: bench/fabric_direction.py prints them side by side.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from slurm_cluster import DevCluster, running_cluster

MBIT = 100  # 12.5 MB/s per direction
MB = 2  # per measurement: ~0.16 s at the rate
PROBE = Path(__file__).with_name("direction_probe.py")


@pytest.fixture(scope="module", params=[("switch", 3), ("mesh", 4)], ids=["switch-3-nodes", "mesh-4-nodes"])
def cluster(request: pytest.FixtureRequest) -> Iterator[DevCluster]:
    links, nodes = request.param
    with running_cluster(
        f"dir-{links}", nodes=nodes, cpus=2, prefix=f"d{links[0]}{os.getpid() % 100000}n",
        fabric=f"inter={MBIT}mbit,links={links}",
    ) as running:
        yield running


def _links(cluster: DevCluster) -> str:
    assert cluster.fabric is not None
    return re.search(r"links=(\w+)", cluster.fabric).group(1)  # type: ignore[union-attr]


def qdisc_sent(cluster: DevCluster) -> dict[tuple[int, str], int]:
    """Bytes each tbf qdisc inside a node's namespace has sent: (node index from 0, device)."""
    sent = {}
    for i, node in enumerate(cluster.node_names):
        out = subprocess.run(
            ["tc", "-n", f"rc{cluster.net_index}-{node}", "-s", "qdisc", "show"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout
        for dev, nbytes in re.findall(r"qdisc tbf \S+: dev (\S+) .*?\n\s*Sent (\d+) bytes", out):
            sent[(i, dev)] = int(nbytes)
    return sent


def run_probe(cluster: DevCluster, tmp_path: Path) -> list[dict[str, object]]:
    n = len(cluster.node_names)
    out = cluster.run(
        "srun", f"-N{n}", "--ntasks-per-node=1", sys.executable, str(PROBE), "--dir", str(tmp_path), "--mb", str(MB),
        timeout=180,
    ).stdout
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert sorted(r["node"] for r in records) == list(range(n)), out
    return records


def test_every_node_pair_carries_both_directions_at_the_link_rate(cluster: DevCluster, tmp_path: Path) -> None:
    n = len(cluster.node_names)
    before = qdisc_sent(cluster)
    records = run_probe(cluster, tmp_path)
    after = qdisc_sent(cluster)
    sent = {key: after[key] - before.get(key, 0) for key in after}
    rate = MBIT / 8
    pairs = {k: v for r in records for k, v in r["pairs"].items()}  # type: ignore[attr-defined]
    print(f"\n{_links(cluster)}, {n} nodes, {rate} MB/s per direction: MB/s per ordered pair "
          + ", ".join(f"{k} {v:.1f}" for k, v in sorted(pairs.items())))
    assert sorted(pairs) == sorted(f"{a}->{b}" for a in range(n) for b in range(n) if a != b)
    for key, mbps in pairs.items():
        assert rate / 10 <= mbps <= 10 * rate, f"{key}: {mbps:.1f} MB/s, tbf rate {rate} MB/s"
    payload = MB * 10**6
    if _links(cluster) == "mesh":
        # a -> b crossed a's own qdisc of the a-b link (p<b+1>) only: the pair test, the
        # ring's one-way step where b follows a, the two-way step's half where b is a's
        # neighbour; the switch NICs carried control traffic only
        for a in range(n):
            for b in range(n):
                if a == b:
                    continue
                want = payload
                if b == (a + 1) % n:
                    want += payload + payload // 2
                if b == (a - 1) % n:
                    want += payload - payload // 2
                got = sent[(a, f"p{b + 1}")]
                assert want <= got <= want * 1.1, f"node {a} -> {b}: {got} bytes on p{b + 1}, payload {want}"
            assert sent[(a, "eth0")] < payload // 4, f"node {a} sent {sent[(a, 'eth0')]} bytes through the switch"
    else:
        # every byte a node sends leaves through its one NIC: the pairs, one_way and two_way
        want = (n - 1) * payload + 2 * payload
        for a in range(n):
            assert want <= sent[(a, "eth0")] <= want * 1.1, f"node {a}: {sent[(a, 'eth0')]} bytes, payload {want}"
    assert all(r["one_way_s"] > 0 and r["two_way_s"] > 0 for r in records)  # type: ignore[operator]
