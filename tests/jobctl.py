"""Helpers for the resilience tests (test_resume.py, test_faults.py): run the real CLI in
subprocesses against a runs root, find a job's folder and its ranks' processes (from the
records ringctl.health writes), and the SLURM dev cluster's controller for a restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: a small float64 train job: 2 virtual or SLURM nodes x 2 ranks, seconds per step
TRAIN = [
    "+topology=2node", "workload=train", "workload.seq_len=32", "workload.dtype=float64",
    "workload.layers=1", "workload.heads=2", "workload.kv_heads=1",
]
#: the configured timeout of the fault tests (launcher.init_timeout_s): a silent peer is
#: declared dead after it, a collective gives up after it
TIMEOUT_S = 20
#: the block implementation of the jobs' CPU ranks, named: torch, which a CPU rank uses
#: anyway. Unset, every rank of every attempt first imports the Triton kernels, only to find
#: them unusable on CPU (for a job under test: `cli.env.update(TORCH_BLOCKS)`)
TORCH_BLOCKS = {"RINGCTL_BLOCK_IMPL": "torch"}
#: one rank on each of TRAIN's 2 nodes instead of 2, by launcher kind, for a test whose
#: property is not about ranks sharing a node: half the ranks to start on 2 cores
ONE_PER_NODE = {"local": "launcher.local_ranks_per_node=1", "slurm": "launcher.max_ranks_per_node=1"}


class Cli:
    """The ringctl CLI with its own runs root (and a SLURM cluster's environment)."""

    def __init__(self, root: Path, cluster_env: dict[str, str] | None = None) -> None:
        self.runs = root / "runs"
        dropped = ("SLURM_CONF", "WANDB_API_KEY", "RINGCTL_MAX_RANKS_PER_NODE")
        self.env = {k: v for k, v in os.environ.items() if k not in dropped}
        self.env.update(cluster_env or {})
        self.env.update(RINGCTL_RUNS=str(self.runs), WANDB_SILENT="true", OMP_NUM_THREADS="1")
        if cluster_env:
            self.env["RINGCTL_MAX_RANKS_PER_NODE"] = "2"

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ringctl", *args], capture_output=True, text=True, env=self.env, timeout=timeout
        )

    def start(self, *args: str, out: Path) -> subprocess.Popen[bytes]:
        """`ringctl launch ...` left running (it follows the job), output to `out`."""
        handle = open(out, "wb")  # noqa: SIM115 - the child owns it
        return subprocess.Popen(
            [sys.executable, "-m", "ringctl", *args], stdout=handle, stderr=subprocess.STDOUT, env=self.env,
        )

    def slurm(self, *cmd: str, check: bool = True) -> str:
        done = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, timeout=60, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"{cmd} exited {done.returncode}: {done.stdout}{done.stderr}")
        return done.stdout.strip()

    def sacct(self, job_id: str) -> str:
        return self.slurm("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State", check=False).split(" ")[0]

    def index(self) -> list[dict[str, Any]]:
        path = self.runs / "index.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def job(self, timeout: float = 120) -> tuple[str, Path]:
        """The one job recorded (waits for `ringctl launch` to record it)."""
        wait_for(lambda: len(self.index()) == 1, timeout, "the job in the index")
        entry = self.index()[0]
        return entry["job_id"], Path(entry["folder"])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, poll_s: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"no {what} after {timeout:.0f} s")


def record(folder: Path, rank: int, attempt: int = 0) -> dict[str, Any]:
    """The record rank `rank` wrote (ringctl.health): pid, node, state, reason."""
    return json.loads((folder / "health" / f"attempt-{attempt}" / f"rank{rank}.json").read_text())


def wait_checkpoint(folder: Path, step: int, timeout: float = 180) -> Path:
    path = folder / "checkpoints" / f"step_{step:06d}.pt"
    wait_for(path.exists, timeout, f"checkpoint {path}")
    return path


def job_processes(folder: Path) -> list[int]:
    """Every live process of the job: its command line names the job's base folder (the
    local controller and the tasks of submitit both carry `<base>/%j`)."""
    base = str(folder.parent).encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if base in (proc / "cmdline").read_bytes():
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(proc.name))
        except OSError:
            continue
    return found


def kill_rank(folder: Path, rank: int, signum: int) -> float:
    """Signal one rank's process (every dev-cluster node is this machine); returns when."""
    pid = int(record(folder, rank)["pid"])
    os.kill(pid, signum)
    return time.monotonic()


def restart_slurmctld(state_dir: Path, slurm_conf: Path, env: dict[str, str], down_s: float = 5.0) -> float:
    """Stop the dev cluster's slurmctld (SIGTERM, as a service restart does), keep it down
    `down_s`, start it again the way slurm/dev-cluster does (same state: jobs survive) and
    record its pid where `down` looks. Returns the seconds until `scontrol ping` answered."""
    pidfile = state_dir / "pids" / "slurmctld.pid"
    pid = int(pidfile.read_text())
    assert b"slurmctld" in Path(f"/proc/{pid}/cmdline").read_bytes()
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), 60, "slurmctld to stop")
    time.sleep(down_s)
    t0 = time.monotonic()
    daemon_env = {**env, "RINGCTL_DEV_CLUSTER": str(state_dir)}
    pidfile.unlink()
    # like slurm/dev-cluster's start_daemon: a session of its own, not our child (setsid -f),
    # its pid (the shell's, which execs slurmctld) where `down` reads it
    with open(state_dir / "log" / "slurmctld.out", "ab") as log:
        subprocess.run(
            ["setsid", "-f", "sh", "-c", 'echo $$ > "$0"; exec "$@"', str(pidfile),
             "/usr/sbin/slurmctld", "-D", "-i", "-f", str(slurm_conf)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=daemon_env, check=True, timeout=30,
        )
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 30, "the new slurmctld's pid")

    def answers() -> bool:
        done = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, env=env, check=False)
        return done.returncode == 0 and "UP" in done.stdout

    wait_for(answers, 60, "slurmctld to answer")
    return time.monotonic() - t0


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
