"""What a bidirectional ring can gain on each kind of emulated fabric, side by side in one run.

    sudo .venv/bin/python bench/fabric_direction.py                  # 3 and 4 nodes, 100mbit
    sudo .venv/bin/python bench/fabric_direction.py --nodes 4 --mb 16 --rounds 5

For each node count and each link kind (`slurm/dev-cluster up --fabric links=switch|mesh`,
one rank per node), the clusters are brought up together and, round after round, in turn,
tests/direction_probe.py times a ring step in which every node sends MB to the next node
(one-way) and one in which it sends half to the next and half to the previous node
(two-way: a bidirectional ring's step, the same bytes per node). A ring step lasts as long
as its slowest node, so each figure is the slowest node's seconds. The ratio two-way /
one-way is what the bidirectional ring can reach on that fabric: ~1.0 on a switch (a
one-way ring already keeps every NIC busy in both directions), ~0.5 with a link per node
pair (the reverse direction of every ring link idles under a one-way ring).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from slurm_cluster import DevCluster, start, stop

PROBE = Path(__file__).resolve().parent.parent / "tests" / "direction_probe.py"
LINKS = ("switch", "mesh")


def ring_step(cluster: DevCluster, nodes: int, mb: float) -> tuple[float, float]:
    """Seconds of the slowest node: one-way step, two-way step."""
    with tempfile.TemporaryDirectory(prefix="ringctl-direction-") as folder:
        out = cluster.run(
            "srun", f"-N{nodes}", "--ntasks-per-node=1", sys.executable, str(PROBE), "--dir", folder, "--mb", str(mb),
            timeout=600,
        ).stdout
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if len(records) != nodes:
        raise RuntimeError(f"direction_probe: {len(records)} of {nodes} nodes answered:\n{out}")
    return max(float(r["one_way_s"]) for r in records), max(float(r["two_way_s"]) for r in records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[3, 4], help="node counts (default 3 4)")
    parser.add_argument("--inter", default="100mbit", help="tbf rate of every link, each way (default 100mbit)")
    parser.add_argument("--mb", type=float, default=8.0, help="MB each node sends per ring step (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, links kinds interleaved (default 3)")
    args = parser.parse_args(argv)
    if any(not 2 <= n <= 16 for n in args.nodes):
        raise SystemExit(f"fabric_direction: --nodes {args.nodes}: allowed 2..16 each")
    if args.rounds < 1 or args.mb <= 0:
        raise SystemExit(f"fabric_direction: --rounds {args.rounds} / --mb {args.mb}: rounds >= 1, mb > 0")
    if os.geteuid() != 0:
        raise SystemExit("fabric_direction: the dev cluster needs root")
    print(f"tbf {args.inter} each way per link; {args.mb:g} MB per node per step; seconds of the slowest node")
    print(f"{'nodes':>5s} {'links':>7s} {'one-way s':>10s} {'two-way s':>10s} {'two/one':>8s}")
    for nodes in args.nodes:
        clusters: dict[str, DevCluster] = {}
        try:
            for links in LINKS:
                clusters[links] = start(
                    Path(f"/tmp/ringctl-direction-{links}-{os.getpid()}"), nodes=nodes, cpus=1,
                    prefix=f"b{links[0]}{os.getpid() % 10000}n", fabric=f"inter={args.inter},links={links}",
                )
            times: dict[str, list[tuple[float, float]]] = {links: [] for links in LINKS}
            for _ in range(args.rounds):
                for links in LINKS:  # interleaved: a burst of load hits both kinds alike
                    times[links].append(ring_step(clusters[links], nodes, args.mb))
        finally:
            for cluster in clusters.values():
                stop(cluster)
        for links in LINKS:
            one = statistics.median(t[0] for t in times[links])
            two = statistics.median(t[1] for t in times[links])
            ratio = statistics.median(t[1] / t[0] for t in times[links])
            print(f"{nodes:5d} {links:>7s} {one:10.3f} {two:10.3f} {ratio:8.2f}")
    print(f"load average {os.getloadavg()[0]:.2f} (medians over {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
