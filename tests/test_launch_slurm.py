"""`ringctl launch` on a real SLURM cluster (slurm/dev-cluster, started by the `slurm_cluster`
fixture): two SLURM nodes, a sweep as ONE job array, cancel, and a failing workload.

The dev cluster's nodes are CPU-only and declare 8 CPUs each. The first test runs the
2node topology as written (8 ranks per node); the others set RINGCTL_MAX_RANKS_PER_NODE=2
(the slurm launcher's cap, conf/launcher/slurm.yaml; launcher.max_ranks_per_node=1 where the ranks
sharing a node are not what a test is about) to keep them quick on 2 cores. Every command is the real CLI in a subprocess.
The ranks compute blocks with torch (RINGCTL_BLOCK_IMPL=torch), as CPU ranks do anyway,
without first importing the Triton kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

USER_MODULE = '''
import time

def boom(cfg, ctx):
    if ctx.rank == 1:
        raise ValueError("user code exploded on rank 1")
    return {"rank": ctx.rank}

def sleepy(cfg, ctx):
    time.sleep(300)
'''


class Cli:
    """The ringctl CLI against the test cluster, with its own runs root."""

    def __init__(self, cluster_env: dict[str, str], root: Path) -> None:
        (root / "userpkg").mkdir(parents=True)
        (root / "userpkg" / "ringctl_test_user.py").write_text(USER_MODULE)
        self.runs = root / "runs"
        self.env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
        self.env.update(cluster_env)
        self.env.update(
            RINGCTL_RUNS=str(self.runs), RINGCTL_MAX_RANKS_PER_NODE="2", WANDB_SILENT="true", RINGCTL_BLOCK_IMPL="torch",
            PYTHONPATH=os.pathsep.join(filter(None, [str(root / "userpkg"), os.environ.get("PYTHONPATH")])),
        )

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ringctl", *args], capture_output=True, text=True, env=self.env, timeout=timeout)

    def index(self) -> list[dict[str, Any]]:
        path = self.runs / "index.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def sacct(self, job_id: str) -> str:
        out = subprocess.run(["sacct", "-n", "-X", "-j", job_id, "-o", "State%30"], capture_output=True, text=True, env=self.env, timeout=30)
        return out.stdout.strip()

    def final_state(self, job_id: str, timeout: float = 60) -> str:
        """SLURM's state once the job left RUNNING/COMPLETING (ringctl returns as soon as
        the results are in; slurmctld records the end a moment later)."""
        _wait_for(lambda: self.sacct(job_id) not in ("", "PENDING", "RUNNING", "COMPLETING"), timeout)
        return self.sacct(job_id)


#: one rank on each of the 2 nodes, for the tests whose property is not about ranks sharing a node
ONE_PER_NODE = "launcher.max_ranks_per_node=1"


def cluster_env(cluster: Any) -> dict[str, str]:
    """SLURM_CONF (and whatever else) the fixture says clients need."""
    env = getattr(cluster, "env", None)
    if isinstance(env, dict):
        return {k: str(v) for k, v in env.items()}
    return {"SLURM_CONF": str(cluster.slurm_conf)}


@pytest.fixture(scope="module")
def cli(slurm_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Cli:
    return Cli(cluster_env(slurm_cluster), tmp_path_factory.mktemp("slurm-launch"))


def test_two_slurm_nodes(cli: Cli) -> None:
    """The command as an operator types it: no rank cap, so the 2node topology's 8 ranks
    per node really run as 8 SLURM tasks on each of the two nodes (16 gloo ranks). One
    timed fwd+bwd instead of the default warm-up and 3 (the timings are not checked here;
    the bytes and the float64 check have passes of their own)."""
    env = {k: v for k, v in cli.env.items() if k != "RINGCTL_MAX_RANKS_PER_NODE"}
    overrides = ["+topology=2node", "launcher=slurm", "workload.warmup=0", "workload.iters=1"]
    done = subprocess.run(
        [sys.executable, "-m", "ringctl", "launch", *overrides], capture_output=True, text=True, env=env, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [entry] = [e for e in cli.index() if e["overrides"] == overrides]
    assert entry["kind"] == "slurm"
    results = json.loads((Path(entry["folder"]) / "results.json").read_text())
    names = results["node_names"]
    assert len(names) == 16 and len(set(names)) == 2, names  # SLURMD_NODENAME, not the shared hostname
    assert names[:8] == [names[0]] * 8 and names[8:] == [names[8]] * 8  # block: 8 ranks per node
    assert results["nodes"] == 2 and results["virtual_nodes"] is False
    assert results["plan"]["nodes"] == 2 and results["plan"]["node_names"] == sorted(set(names), key=names.index)
    assert results["check"]["passed"] and results["check"]["max_error"] <= 1e-9
    for phase in ("forward", "backward"):
        for link in ("intra", "inter"):
            assert results["bytes"][phase][link]["measured"] == results["bytes"][phase][link]["predicted"]
    assert results["bytes"]["forward"]["inter"]["measured_total"] > 0
    assert Path(results["wandb"]["run_dir"]).is_dir()
    assert cli.final_state(entry["job_id"]) == "COMPLETED"
    # the 16 ranks met on the port rank 0 found free and published, not submitit's pick
    [published] = Path(entry["folder"]).glob(f"{entry['job_id']}_rendezvous_0_*.port")
    assert 1024 <= int(published.read_text()) <= 65535


def test_sweep_is_one_job_array(cli: Cli) -> None:
    """Four points, ONE sbatch --array; each point a 2-node job of its own (one rank per
    node: the ranks per node are not what a sweep changes, and 4 x 4 ranks start slowly)."""
    before = len(cli.index())
    done = cli(
        "launch", "+topology=2node", "launcher=slurm", ONE_PER_NODE, "wandb=disabled", "workload.warmup=0",
        "workload.iters=1", "-m", "workload.seq_len=512,1024", "topology.ring=flat,hierarchical", "wait=true",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    entries = cli.index()[before:]
    assert len(entries) == 4
    arrays = {e["job_id"].split("_")[0] for e in entries}
    assert len(arrays) == 1, entries  # one sbatch --array
    assert sorted(e["job_id"].split("_")[1] for e in entries) == ["0", "1", "2", "3"]
    assert "array" in done.stdout and entries[0]["job_id"] in done.stdout
    seen = set()
    for entry in entries:
        results = json.loads((Path(entry["folder"]) / "results.json").read_text())
        point = (results["config"]["workload"]["seq_len"], results["plan"]["ring"])
        assert f"workload.seq_len={point[0]}" in entry["overrides"] and f"topology.ring={point[1]}" in entry["overrides"]
        assert results["check"]["passed"] and results["nodes"] == 2 and len(set(results["node_names"])) == 2
        seen.add(point)
        assert cli.final_state(entry["job_id"]) == "COMPLETED"
    assert seen == {(512, "flat"), (512, "hierarchical"), (1024, "flat"), (1024, "hierarchical")}


def _wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.25)
    return False


def test_cancel(cli: Cli) -> None:
    done = cli("launch", "+topology=2node", "launcher=slurm", ONE_PER_NODE, "wandb=disabled", "workload=custom",
               "workload.entry=ringctl_test_user:sleepy", "wait=false")
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = cli.index()[-1]["job_id"]
    assert f"submitted job {job_id}" in done.stdout
    assert _wait_for(lambda: "running" in cli("status", job_id).stdout, 120), cli("status", job_id).stdout
    cancelled = cli("cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert _wait_for(lambda: cli.sacct(job_id).startswith("CANCELLED"), 60), cli.sacct(job_id)
    status = cli("status", job_id)
    assert f"job {job_id} (slurm): cancelled (CANCELLED" in status.stdout, status.stdout


def test_failing_workload_surfaces_traceback(cli: Cli) -> None:
    done = cli("launch", "+topology=2node", "launcher=slurm", ONE_PER_NODE, "wandb=disabled", "workload=custom",
               "workload.entry=ringctl_test_user:boom")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "rank1 failed first" in done.stderr
    assert "Traceback (most recent call last)" in done.stderr
    assert 'raise ValueError("user code exploded on rank 1")' in done.stderr
    assert "ValueError: user code exploded on rank 1" in done.stderr
    job_id = cli.index()[-1]["job_id"]
    assert cli.final_state(job_id) == "FAILED"
    folder = Path(cli.index()[-1]["folder"])
    # the root cause: rank 1's own traceback ends in the exception the workload raised
    root_cause = (folder / "rank1.error").read_text().rstrip().splitlines()
    assert root_cause[0] == "Traceback (most recent call last):"
    assert root_cause[-1] == "ValueError: user code exploded on rank 1"
    # results.json is rank 0's: its own error, gloo's "Connection closed (or reset) by peer"
    error = json.loads((folder / "results.json").read_text())["error"].rstrip().splitlines()
    assert error[0] == "Traceback (most recent call last):"
    assert error[-1].startswith("RuntimeError: ") and " by peer " in error[-1], error[-1]
