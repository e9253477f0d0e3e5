"""The real SLURM dev cluster (slurm/dev-cluster): jobs on two nodes, accounting states, and
the emulated fabric (one network namespace per node, tbf-throttled NICs).

Teardown of both fixtures checks that `down` removed everything `up` made (daemons,
state folder, /etc/hosts lines, namespaces, veths, bridge).

Rates on the fabric are checked to an order of magnitude only (the 2 cores are shared);
the bytes are checked exactly: they crossed the tbf qdiscs. `bench/fabric_links.py`
measures and prints the rates.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from slurm_cluster import (
    DEV_CLUSTER,
    DevCluster,
    require_dev_cluster,
    running_cluster,
    start,
    stop,
)

FABRIC_MBIT = 100  # inter-node rate of the fabric fixture: 12.5 MB/s, so 4 MB take ~0.3 s
FABRIC_NICS = 2
PROBE = Path(__file__).with_name("fabric_probe.py")
HOP_PROBE = Path(__file__).with_name("ring_hop_probe.py")
MARKER = ".ringctl-dev-cluster"  # slurm/dev-cluster's mark on the state dirs it creates


@pytest.fixture(scope="module")
def slurm_fabric_cluster() -> Iterator[DevCluster]:
    """2 nodes, each in its own network namespace with FABRIC_NICS NICs (one per rank) at
    FABRIC_MBIT Mbit/s each way."""
    with running_cluster(
        "fabric", nodes=2, cpus=4, prefix=f"f{os.getpid() % 100000}n",
        fabric=f"inter={FABRIC_MBIT}mbit,nics={FABRIC_NICS}",
    ) as cluster:
        yield cluster


def test_srun_runs_one_task_on_each_node(slurm_cluster: DevCluster) -> None:
    out = slurm_cluster.run("srun", "-N2", "--ntasks-per-node=1", "printenv", "SLURMD_NODENAME").stdout
    assert sorted(out.split()) == sorted(slurm_cluster.node_names)


def test_nodes_declare_more_cpus_than_the_host_has(slurm_cluster: DevCluster) -> None:
    cpus = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N %c").stdout.split()
    assert cpus == [x for name in slurm_cluster.node_names for x in (name, str(slurm_cluster.cpus_per_node))]
    ranks = slurm_cluster.run(
        "srun", "-N1", f"-n{slurm_cluster.cpus_per_node}", "printenv", "SLURM_PROCID"
    ).stdout.split()
    assert sorted(map(int, ranks)) == list(range(slurm_cluster.cpus_per_node))


def test_sbatch_job_on_two_nodes_is_completed_in_accounting(slurm_cluster: DevCluster, tmp_path: Path) -> None:
    job_id = slurm_cluster.run(
        "sbatch", "--parsable", "-N2", "--ntasks-per-node=1", f"--output={tmp_path}/%j.out",
        "--wrap", "srun printenv SLURMD_NODENAME",
    ).stdout.strip()
    assert job_id.isdigit(), job_id
    # polled here: `sbatch --wait` backs off to 10 s between polls
    assert slurm_cluster.wait_sacct_state(job_id, {"COMPLETED", "FAILED"}) == "COMPLETED"
    ran_on = (tmp_path / f"{job_id}.out").read_text().split()
    assert sorted(ran_on) == sorted(slurm_cluster.node_names)
    nnodes = slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "NNodes").stdout.split()
    assert nnodes == ["2"]


def test_cancelled_job_is_cancelled_in_accounting(slurm_cluster: DevCluster) -> None:
    job_id = slurm_cluster.run("sbatch", "--parsable", "-N1", "--output=/dev/null", "--wrap", "sleep 600").stdout.strip()
    try:
        end = time.monotonic() + 30
        while slurm_cluster.run("squeue", "-h", "-j", job_id, "-o", "%T").stdout.strip() != "RUNNING":
            assert time.monotonic() < end, f"job {job_id} never started"
            time.sleep(0.2)
    finally:
        slurm_cluster.run("scancel", job_id)
    assert slurm_cluster.wait_sacct_state(job_id, {"CANCELLED", "COMPLETED", "FAILED"}) == "CANCELLED"


def test_up_refuses_a_state_dir_whose_cluster_is_up(slurm_cluster: DevCluster) -> None:
    proc = subprocess.run(
        ["bash", str(DEV_CLUSTER), "up", "--state-dir", str(slurm_cluster.state_dir)],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert "already up" in proc.stderr
    assert slurm_cluster.run("sinfo", "-h", "-o", "%T").stdout.split() == ["idle"]


@pytest.mark.parametrize("command", ["up", "down"])
def test_refuses_a_state_dir_it_did_not_create(command: str, tmp_path: Path) -> None:
    """up and down delete their state dir, as root: never one without dev-cluster's marker."""
    state_dir = tmp_path / "mine"
    state_dir.mkdir()
    (state_dir / "sentinel").write_text("keep me")
    proc = subprocess.run(
        ["bash", str(DEV_CLUSTER), command, "--state-dir", str(state_dir)],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert f"{command} --state-dir {state_dir}: refusing to " in proc.stderr
    assert f"did not create (no {MARKER} file in it)" in proc.stderr
    assert (state_dir / "sentinel").read_text() == "keep me"
    assert sorted(p.name for p in state_dir.iterdir()) == ["sentinel"]


def test_up_takes_an_empty_state_dir_and_down_removes_it(tmp_path: Path) -> None:
    require_dev_cluster()
    state_dir = tmp_path / "empty"
    state_dir.mkdir()
    cluster = start(state_dir, nodes=1, cpus=1, prefix=f"e{os.getpid() % 100000}n")
    try:
        assert (state_dir / MARKER).is_file()
        assert cluster.run("sinfo", "-h", "-o", "%T").stdout.split() == ["idle"]
    finally:
        stop(cluster)  # raises on anything left, the state dir included


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "0"], "--nodes 0: allowed 1..64"),
        (["--fabric", "inter=fast"], "--fabric inter=fast: not a rate"),
        (["--fabric", "inter=1gbit,nics=0"], "--fabric nics=0: allowed 1..16"),
        (["--fabric", "inter=1gbit,links=ring"], "--fabric links=ring: allowed switch, mesh"),
        (["--nodes", "17", "--fabric", "inter=1gbit,links=mesh"], "allowed up to 16 nodes"),
        (["--fabric", "speed=1gbit"], "unknown key 'speed' (allowed: inter, nics, burst, latency, links)"),
        (["--prefix", "Node_"], "--prefix Node_"),
    ],
)
def test_up_rejects_bad_input_and_makes_nothing(args: list[str], message: str, tmp_path: Path) -> None:
    state_dir = tmp_path / "cluster"
    proc = subprocess.run(
        ["bash", str(DEV_CLUSTER), "up", "--state-dir", str(state_dir), *args],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not state_dir.exists()
    assert str(state_dir) not in Path("/etc/hosts").read_text()


def test_clusters_number_their_jobs_apart(slurm_cluster: DevCluster, slurm_fabric_cluster: DevCluster) -> None:
    """submitit derives MASTER_PORT from the job id alone (and refuses a MASTER_PORT already
    set), so clusters sharing this host must not hand out the same job ids."""
    ids = []
    for cluster in (slurm_cluster, slurm_fabric_cluster):
        out = cluster.run(
            "srun", "-N2", "--ntasks-per-node=1", "bash", "-c", 'echo "$SLURM_JOB_ID ${MASTER_PORT:-unset}"'
        ).stdout.split()
        assert out[1::2] == ["unset", "unset"], out
        assert len(set(out[0::2])) == 1, out
        ids.append(int(out[0]))
    assert abs(ids[0] - ids[1]) >= 100000, ids


def test_fabric_places_each_node_in_its_own_namespace(slurm_fabric_cluster: DevCluster) -> None:
    script = (
        'echo "$SLURMD_NODENAME $SLURM_LOCALID $GLOO_SOCKET_IFNAME $RINGCTL_NICS $(readlink /proc/self/ns/net)'
        ' $(getent hosts $SLURMD_NODENAME | cut -d" " -f1)'
        ' $(ip -o -4 addr show dev eth0 | awk \'{split($4, a, "/"); print a[1]}\')"'
    )
    out = slurm_fabric_cluster.run("srun", "-N2", f"--ntasks-per-node={FABRIC_NICS}", "bash", "-c", script).stdout
    rows = [line.split() for line in out.splitlines()]
    assert len(rows) == 2 * FABRIC_NICS
    netns: dict[str, set[str]] = {}
    for node, local, ifname, nics, ns, resolved, eth0_addr in rows:
        assert ifname == f"eth{int(local) % FABRIC_NICS}"  # rank l binds gloo to its own NIC
        assert nics == ",".join(f"eth{j}" for j in range(FABRIC_NICS))
        assert resolved == eth0_addr  # the node's name resolves to its fabric address
        netns.setdefault(node, set()).add(ns)
    assert sorted(netns) == sorted(slurm_fabric_cluster.node_names)
    per_node = [next(iter(s)) for s in netns.values() if len(s) == 1]
    assert len(per_node) == 2 and per_node[0] != per_node[1]
    assert os.readlink("/proc/self/ns/net") not in per_node


def tbf_sent_bytes(cluster: DevCluster) -> dict[str, int]:
    """Bytes each tbf qdisc of the fabric has sent, both ends of every veth: the root side
    (rc<k>n<i>e<j>, into node i) and the namespace side (eth<j> of node i, out of it)."""
    sent = {}
    for i, node in enumerate(cluster.node_names, start=1):
        for j in range(FABRIC_NICS):
            for where, cmd in (
                (f"into {node} eth{j}", ["tc", "-s", "qdisc", "show", "dev", f"rc{cluster.net_index}n{i}e{j}"]),
                (f"out of {node} eth{j}", ["tc", "-n", f"rc{cluster.net_index}-{node}", "-s", "qdisc", "show",
                                           "dev", f"eth{j}"]),
            ):
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout
                found = re.search(r"Sent (\d+) bytes", out)
                assert "qdisc tbf" in out and found, out
                sent[where] = int(found.group(1))
    return sent


def check_crossed_tbf(before: dict[str, int], after: dict[str, int], nbytes: int) -> None:
    """Every tbf qdisc (each NIC, both ends) sent at least nbytes between the two counts."""
    short = {where: after[where] - before[where] for where in after if after[where] - before[where] < nbytes}
    assert not short, f"tbf qdiscs that sent < {nbytes} bytes: {short}"


def check_rate_magnitude(what: str, mbps: float, rate: float) -> None:
    """Within 10x of the tbf rate: shared cores slow a transfer down, but not 10-fold (the
    measured rates: bench/fabric_links.py). That the bytes crossed the tbf is checked
    exactly, by its counters: unthrottled loopback runs only 12-55x faster under load."""
    assert rate / 10 <= mbps <= 10 * rate, f"{what} {mbps:.1f} MB/s, tbf rate {rate} MB/s"


def test_fabric_throttles_traffic_between_nodes_not_inside_them(
    slurm_fabric_cluster: DevCluster, tmp_path: Path
) -> None:
    """Both rails at once, both directions: each cross-node transfer crosses the tbf of its
    NIC on both ends (one NIC per rank), while each rank's transfer to its own address stays
    on the namespace's loopback."""
    mb = 4
    before = tbf_sent_bytes(slurm_fabric_cluster)
    out = slurm_fabric_cluster.run(
        "srun", "-N2", f"--ntasks-per-node={FABRIC_NICS}", sys.executable, str(PROBE),
        "--dir", str(tmp_path), "--mb", str(mb), timeout=120,
    ).stdout
    after = tbf_sent_bytes(slurm_fabric_cluster)
    records = [json.loads(line) for line in out.splitlines()]
    rate = FABRIC_MBIT / 8  # MB/s
    cross = sorted(r[key] for r in records for key in ("cross_MBps", "cross_back_MBps") if key in r)
    loop = sorted(r["loop_MBps"] for r in records)
    print(f"\nfabric {FABRIC_MBIT} Mbit/s = {rate:.1f} MB/s: cross-node MB/s {cross}, loopback MB/s {loop}")
    assert len(cross) == 2 * FABRIC_NICS and len(loop) == 2 * FABRIC_NICS
    # every rail carried the payload each way, through the tbf on both ends of its veth
    check_crossed_tbf(before, after, mb * 10**6)
    assert [r["loop_dev"] for r in records] == ["lo"] * len(records)  # own address: never a NIC
    for mbps in cross:
        check_rate_magnitude("cross-node", mbps, rate)
    # above the rate means unthrottled: the tbf lets through at most its rate (plus one burst)
    assert loop[0] >= 2 * rate, f"loopback {loop[0]:.1f} MB/s, not above the {rate} MB/s fabric"


def test_ring_hop_runs_both_directions_of_a_node_pair_through_the_fabric(
    slurm_fabric_cluster: DevCluster, tmp_path: Path
) -> None:
    """ringctl's own hop between the two nodes (the hierarchical plan's outer ring: one peer,
    both directions at once, every rail busy), each rank on its own NIC, through the tbf
    both ways, at the tbf rate's order of magnitude. (Whether the two directions overlap,
    rather than run one after the other, is a ratio: bench/fabric_links.py prints it.)"""
    mb, hops = 2, 4  # the probe's warm-up hop and its 3 timed ones
    before = tbf_sent_bytes(slurm_fabric_cluster)
    out = slurm_fabric_cluster.run(
        "srun", "-N2", f"--ntasks-per-node={FABRIC_NICS}", sys.executable, str(HOP_PROBE),
        "--dir", str(tmp_path), "--mb", str(mb), timeout=120,
    ).stdout
    after = tbf_sent_bytes(slurm_fabric_cluster)
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    rate = FABRIC_MBIT / 8  # MB/s
    mbps = sorted(r["MBps"] for r in records)
    print(f"\nring hop across nodes, both directions at once: MB/s per rank {mbps} (tbf {rate} MB/s)")
    assert len(mbps) == 2 * FABRIC_NICS
    assert sorted(r["ifname"] for r in records) == sorted([f"eth{j}" for j in range(FABRIC_NICS)] * 2)
    check_crossed_tbf(before, after, hops * mb * 10**6)
    for value in mbps:
        check_rate_magnitude("ring hop, each way", value, rate)
