"""Start and stop `slurm/dev-cluster` from tests: a real SLURM cluster on this machine.

The fixtures in conftest.py use it (`slurm_cluster`: 2 plain nodes for the whole session;
`slurm_fabric_cluster` in test_dev_cluster.py). Each cluster gets its own state folder and
node-name prefix, so several pytest runs on one machine do not collide.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEV_CLUSTER = REPO / "slurm" / "dev-cluster"
NEEDED = ("slurmctld", "slurmd", "slurmdbd", "sbatch", "munged", "mariadbd")


class DevClusterError(RuntimeError):
    """`slurm/dev-cluster` failed; carries its output."""


def unavailable_reason() -> str | None:
    """Why a dev cluster cannot start here (None when it can)."""
    if os.geteuid() != 0:
        return "the SLURM dev cluster needs root (it starts daemons and edits /etc/hosts)"
    missing = [b for b in NEEDED if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        return f"SLURM packages missing ({', '.join(missing)}): run `bash slurm/dev-cluster install`"
    return None


def require_dev_cluster() -> None:
    """Skip when this machine cannot run the dev cluster (not root, packages missing);
    in CI (CI=true) fail instead: .ci/run must run the SLURM tests."""
    import pytest

    reason = unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def cluster_state_dir(kind: str) -> Path:
    """One folder per pytest process and kind, so concurrent runs never share a cluster.
    Clusters left by pytest processes that died (killed before teardown) are stopped first."""
    for stale in Path("/tmp").glob("ringctl-slurm-pytest-*-*"):
        owner = stale.name.split("-")[3]  # ringctl-slurm-pytest-<pid>-<kind>
        if owner.isdigit() and int(owner) != os.getpid() and not Path("/proc", owner).exists():
            subprocess.run(
                ["bash", str(DEV_CLUSTER), "down", "--state-dir", str(stale)], capture_output=True, timeout=120
            )
    return Path(f"/tmp/ringctl-slurm-pytest-{os.getpid()}-{kind}")


def _dev_cluster(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["bash", str(DEV_CLUSTER), *args], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise DevClusterError(
            f"slurm/dev-cluster {shlex.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    return proc


def _read_state(state_dir: Path) -> dict[str, str]:
    """cluster.env: KEY=value lines written with bash's %q (plus `CLAIMS+=` lines)."""
    values: dict[str, str] = {}
    for line in (state_dir / "cluster.env").read_text().splitlines():
        key, sep, raw = line.partition("=")
        if sep and key.isidentifier():
            words = shlex.split(raw)
            values[key] = words[0] if words else ""
    return values


@dataclass(frozen=True)
class DevCluster:
    """A running dev cluster: what a test needs to submit jobs to it."""

    state_dir: Path
    slurm_conf: Path
    node_names: tuple[str, ...]
    cpus_per_node: int
    partition: str
    fabric: str | None
    net_index: int | None  # fabric: bridge rcbr<k>, namespaces rc<k>-<node>, veths rc<k>n<i>e<j>
    up_seconds: float
    env: dict[str, str] = field(repr=False)

    def run(self, *cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A SLURM command (sbatch, srun, sacct, ...) against this cluster."""
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise DevClusterError(f"{shlex.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc

    def sacct_state(self, job_id: str) -> str | None:
        """The job's state in accounting ("COMPLETED", "CANCELLED", ...), None before it shows."""
        out = self.run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State").stdout.split()
        return out[0] if out else None

    def wait_sacct_state(self, job_id: str, wanted: set[str], timeout: float = 60) -> str:
        """Poll sacct until the job reaches one of `wanted`; returns the state seen."""
        end = time.monotonic() + timeout
        state = None
        while time.monotonic() < end:
            state = self.sacct_state(job_id)
            if state in wanted:
                return state
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id}: sacct state {state!r} after {timeout}s, wanted {sorted(wanted)}")


def start(
    state_dir: Path, *, nodes: int = 2, cpus: int = 8, prefix: str = "node", fabric: str | None = None
) -> DevCluster:
    """`slurm/dev-cluster up` and wait until every node is idle (the script waits)."""
    args = ["up", "--state-dir", str(state_dir), "--nodes", str(nodes), "--cpus", str(cpus), "--prefix", prefix]
    if fabric:
        args += ["--fabric", fabric]
    t0 = time.monotonic()
    proc = _dev_cluster(*args)
    up_seconds = time.monotonic() - t0
    export = [line for line in proc.stdout.splitlines() if line.startswith("export SLURM_CONF=")]
    if not export:
        raise DevClusterError(f"slurm/dev-cluster up printed no `export SLURM_CONF=` line:\n{proc.stdout}")
    slurm_conf = Path(export[-1].split("=", 1)[1])
    state = _read_state(state_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env["SLURM_CONF"] = str(slurm_conf)
    return DevCluster(
        state_dir=state_dir, slurm_conf=slurm_conf, node_names=tuple(state["NODE_NAMES"].split()),
        cpus_per_node=int(state["CPUS"]), partition=state["PARTITION"], fabric=fabric,
        net_index=int(state["NET_INDEX"]) if state.get("NET_INDEX") else None,
        up_seconds=up_seconds, env=env,
    )


def leftovers(cluster: DevCluster) -> list[str]:
    """What a stopped cluster left behind: state folder, /etc/hosts lines, namespaces, links."""
    left = [str(cluster.state_dir)] if cluster.state_dir.exists() else []
    tag = f"# ringctl-dev-cluster {cluster.state_dir}"
    left += [f"/etc/hosts: {line}" for line in Path("/etc/hosts").read_text().splitlines() if tag in line]
    names = set(cluster.node_names)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    left += [f"netns {ns}" for ns in netns if ns.split("-", 1)[-1] in names]
    if cluster.net_index is not None:
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        bridge, veths = f"rcbr{cluster.net_index}", (f"rc{cluster.net_index}n", f"rc{cluster.net_index}m")
        left += [
            f"link {name}" for name in (line.split(":")[1].strip().split("@")[0] for line in links.splitlines())
            if name == bridge or name.startswith(veths)
        ]
    for pid_dir in Path("/proc").glob("[0-9]*"):
        try:
            environ = (pid_dir / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RINGCTL_DEV_CLUSTER={cluster.state_dir}".encode() in environ or _holds_file_in(pid_dir, cluster.state_dir):
            left.append(f"process {pid_dir.name}: {(pid_dir / 'cmdline').read_bytes()[:80]!r}")
    return left


def _holds_file_in(pid_dir: Path, folder: Path) -> bool:
    """slurmstepd clears its environment but keeps its slurmd's log file open."""
    try:
        if (pid_dir / "comm").read_text().strip() != "slurmstepd":
            return False
        return any(os.readlink(fd).startswith(f"{folder}/") for fd in (pid_dir / "fd").iterdir())
    except OSError:
        return False


def stop(cluster: DevCluster) -> float:
    """`slurm/dev-cluster down`; raises if anything `up` made is still there. Returns seconds."""
    t0 = time.monotonic()
    _dev_cluster("down", "--state-dir", str(cluster.state_dir))
    seconds = time.monotonic() - t0
    left = leftovers(cluster)
    if left:
        raise DevClusterError("slurm/dev-cluster down left: " + "; ".join(left))
    return seconds


@contextmanager
def running_cluster(kind: str, **start_kwargs: object) -> Iterator[DevCluster]:
    """A started dev cluster for a pytest fixture: skip/fail as `require_dev_cluster` says,
    fail (not error) when `up` fails, and always stop it (teardown raises on leftovers)."""
    import pytest

    require_dev_cluster()
    try:
        cluster = start(cluster_state_dir(kind), **start_kwargs)  # type: ignore[arg-type]
    except DevClusterError as err:
        pytest.fail(str(err), pytrace=False)
    try:
        yield cluster
    finally:
        stop(cluster)
