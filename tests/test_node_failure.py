"""Node failure: a running train job loses one of its two nodes; SLURM requeues it (ringctl
submits with --requeue) and it resumes from its last complete checkpoint and completes, its
losses equal to an uninterrupted run's.

How a node is lost here. The dev cluster's nodes are slurmd processes on this one machine
(`slurm_cluster`: 2 nodes), so none can be powered off. The closest real equivalent is
what a power loss leaves: everything the node runs dies at once, with no chance to react.
The test SIGKILLs, in one go, the node's slurmd, the slurmstepd of the job's step there and
the job's ranks there, then marks the node DOWN (`scontrol update NodeName=... State=DOWN
Reason=...`), as slurmctld itself does once a node misses SlurmdTimeout (300 s by default:
too long for a test) or a site's health check does. A plain `scontrol ... State=DOWN` with
the node's slurmd alive is gentler: slurmd then stops the tasks with SIGTERM, every rank
checkpoints the step it is at, and the job resumes from there; that path is the one
tests/test_resume.py's `scontrol requeue` takes. Here the ranks on the lost node die at once,
their peers on the other node fail on the broken connections, no checkpoint is taken at the
end, and the job must resume from the last periodic one.

The second node never comes back by itself: like an operator after a repair, the test
restarts its slurmd and RESUMEs it (also in a `finally`, so the session's cluster is left
whole), and lets the requeued job start at once (StartTime=now; SLURM otherwise holds a
requeued job back for about two minutes), once SLURM has ended the lost allocation, every
node is idle and the restored node has handled the lost run's termination (slurmctld sends it
when the node registers; a retry started before would have its tasks on that node killed by
it, as they share the job id). The cluster has no third node, so the job resumes
on the same two; re-planning onto other nodes is test_resume's time-limit test.

Checked: the waiting `ringctl launch` follows the job through NODE_FAIL and PENDING to
COMPLETED (exit 0, nothing reported failed: the failed attempt's result file and error files
are stale once the job runs again); every loss equals, to 1e-12 in float64, the same model
trained without interruption in one process (SDPA on the whole sequence); W&B holds one run
continued by both attempts; sacct shows NODE_FAIL then COMPLETED; `ringctl status` shows the
requeue (2 attempts, their nodes, "requeued 1x"). About a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from jobctl import TORCH_BLOCKS, TRAIN, Cli, record, wait_checkpoint, wait_for
from omegaconf import OmegaConf

import wandb_records
from ringctl.workloads.train import reference_losses

STEPS = 48
CHECKPOINT_EVERY = 4


def _node_processes(cluster: Any, node: str, job_id: str) -> dict[str, list[int]]:
    """What node `node` of the dev cluster runs for job `job_id`: its slurmd, the step's
    slurmstepd (it clears its environment but keeps its slurmd's log open) and the job's
    tasks there (SLURMD_NODENAME and this cluster's SLURM_CONF in their environment)."""
    slurmd = int((cluster.state_dir / "pids" / f"slurmd-{node}.pid").read_text())
    assert f"-N\0{node}\0".encode() in Path(f"/proc/{slurmd}/cmdline").read_bytes()
    log = str(cluster.state_dir / "log" / f"slurmd-{node}.log")
    stepds, tasks = [], []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "comm").read_text().strip() == "slurmstepd":
                if any(os.readlink(fd) == log for fd in (proc / "fd").iterdir()):
                    stepds.append(int(proc.name))
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        wanted = (f"SLURMD_NODENAME={node}", f"SLURM_JOB_ID={job_id}", f"SLURM_CONF={cluster.slurm_conf}")
        if all(w.encode() in environ for w in wanted):
            tasks.append(int(proc.name))
    return {"slurmd": [slurmd], "slurmstepd": stepds, "tasks": tasks}


def _slurmd_alive(cluster: Any, node: str) -> bool:
    try:
        pid = int((cluster.state_dir / "pids" / f"slurmd-{node}.pid").read_text())
        return f"-N\0{node}\0".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


def _restore_node(cluster: Any, node: str) -> None:
    """Start the node's slurmd again the way slurm/dev-cluster does (a session of its own,
    not our child; its pid where `down` looks) and return the node to service. It logs at
    debug level (-vv), so that the lost run's termination, which slurmctld delivers once the
    node registers, shows in its output (`_terminated`)."""
    if not _slurmd_alive(cluster, node):
        pidfile = cluster.state_dir / "pids" / f"slurmd-{node}.pid"
        with open(cluster.state_dir / "log" / f"slurmd-{node}.out", "ab") as log:
            subprocess.run(
                ["setsid", "-f", "sh", "-c", 'echo $$ > "$0"; exec "$@"', str(pidfile),
                 "/usr/sbin/slurmd", "-D", "-vv", "-N", node, "-f", str(cluster.slurm_conf)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, check=True, timeout=30,
                env={**cluster.env, "RINGCTL_DEV_CLUSTER": str(cluster.state_dir)},
            )
        wait_for(lambda: _slurmd_alive(cluster, node), 30, f"slurmd of {node}")

    def in_service() -> bool:
        state = cluster.run("sinfo", "-h", "-n", node, "-o", "%T", check=False).stdout.strip()
        if state.startswith(("down", "drain")):
            # ReturnToService=2 usually brings it back on registration; else as an operator would
            cluster.run("scontrol", "update", f"NodeName={node}", "State=RESUME", check=False)
            return False
        return bool(state)

    wait_for(in_service, 60, f"{node} back in service")


def _terminated(cluster: Any, node: str, job_id: str, since: int) -> bool:
    """Whether the node's slurmd, since byte ``since`` of its output, handled slurmctld's
    termination of job ``job_id`` (the lost run's: it revokes the job's credential there)."""
    with open(cluster.state_dir / "log" / f"slurmd-{node}.out", "rb") as out:
        out.seek(since)
        text = out.read().decode(errors="replace")
    return any("_rpc_terminate_job" in line and job_id in line for line in text.splitlines())


def _sacct_history(cli: Cli, job_id: str) -> list[str]:
    """Every record of the job (-D: the attempts before its requeues too), oldest first."""
    out = cli.slurm("sacct", "-D", "-X", "-n", "-P", "-j", job_id, "-o", "State", check=False)
    return [line.split(" ")[0] for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cli(slurm_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Cli:
    return Cli(tmp_path_factory.mktemp("node-failure"), {**slurm_cluster.env, **TORCH_BLOCKS})


def test_lost_node_requeues_and_resumes_from_checkpoint(cli: Cli, slurm_cluster: Any, tmp_path: Path) -> None:
    launch = cli.start(
        "launch", *TRAIN, "launcher=slurm", "wandb=offline", f"workload.steps={STEPS}",
        f"workload.checkpoint_every={CHECKPOINT_EVERY}", out=tmp_path / "launch.out",
    )
    node = ""
    try:
        job_id, folder = cli.job()
        wait_checkpoint(folder, 2 * CHECKPOINT_EVERY)
        node = str(record(folder, 3)["node"])  # rank 3's node: not the batch script's (rank 0's)
        assert node in slurm_cluster.node_names and node != record(folder, 0)["node"]
        victims = _node_processes(slurm_cluster, node, job_id)
        assert len(victims["tasks"]) == 2 and victims["slurmstepd"], victims
        for pid in [p for group in victims.values() for p in group]:
            os.kill(pid, signal.SIGKILL)  # the node is gone: nothing on it gets to react
        lost_at = time.monotonic()
        cli.slurm("scontrol", "update", f"NodeName={node}", "State=DOWN", "Reason=ringctl-node-failure-test")
        # SLURM ends the allocation as NODE_FAIL and requeues the job; `ringctl launch` keeps following
        wait_for(lambda: cli.slurm("squeue", "-h", "-j", job_id, "-o", "%T", check=False) == "PENDING", 120,
                 "the job back in the queue")
        requeued_s = time.monotonic() - lost_at
        saved = sorted(int(c.stem.split("_")[1]) for c in (folder / "checkpoints").glob("step_*.pt"))
        assert launch.poll() is None, (tmp_path / "launch.out").read_text()
        status = cli("status", job_id)
        assert f"job {job_id} (slurm): queued" in status.stdout, status.stdout  # pending again, not failed
        # like an operator, bring the node back once SLURM has ended the lost allocation.
        # Once the node registers, slurmctld sends it the lost run's termination; a retry
        # started on it before that arrives has its tasks killed by it (same job id: seen as
        # "tasks 2-3: Terminated" at the retry's start). So the retry starts only after the
        # node's slurmd has handled it (it does within a second of registering, when slurmd
        # reports the lost step it finds in its spool; should none come, 10 s later).
        ctld_log = slurm_cluster.state_dir / "log" / "slurmctld.log"
        wait_for(lambda: f"Requeuing JobId={job_id}" in ctld_log.read_text(errors="replace"), 120,
                 "SLURM done ending the lost allocation")
        since = (slurm_cluster.state_dir / "log" / f"slurmd-{node}.out").stat().st_size
        _restore_node(slurm_cluster, node)
        wait_for(lambda: set(cli.slurm("sinfo", "-h", "-o", "%T", check=False).split()) == {"idle"}, 60,
                 "every node idle")
        deadline = time.monotonic() + 10
        while not _terminated(slurm_cluster, node, job_id, since) and time.monotonic() < deadline:
            time.sleep(0.25)
        cli.slurm("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        assert launch.wait(timeout=300) == 0, (tmp_path / "launch.out").read_text()
    finally:
        if launch.poll() is None:
            launch.kill()
        if node:
            _restore_node(slurm_cluster, node)
    out = (tmp_path / "launch.out").read_text()
    assert "COMPLETED" in out and "failed" not in out and "Traceback" not in out, out
    results = json.loads((folder / "results.json").read_text())
    assert "error" not in results and results["attempt"] == 1
    # the lost node's ranks took no checkpoint at their end: the last periodic one it is
    assert saved[-1] >= 2 * CHECKPOINT_EVERY and saved[-1] % CHECKPOINT_EVERY == 0, saved
    assert results["resumed_from_step"] == saved[-1] < STEPS
    assert f"requeued 1x; resumed from step {saved[-1]}" in out, out
    reference = reference_losses(OmegaConf.create(results["config"]["workload"]), STEPS)
    torch.testing.assert_close(
        torch.tensor(results["losses"], dtype=torch.float64), torch.tensor(reference, dtype=torch.float64),
        rtol=0, atol=1e-12,
    )
    starts = [a for a in results["attempts"] if a["event"] == "start"]
    assert [a["attempt"] for a in starts] == [0, 1]
    assert sorted(set(starts[1]["node_names"])) == sorted(slurm_cluster.node_names)
    assert not [a for a in results["attempts"] if a["event"] == "stopped"]  # it died, it did not stop
    assert list(folder.glob("rank*.error")) == []  # the failed attempt's are not left to mislead

    # one W&B run, continued: every attempt's offline folder has the job's run id; each step
    # logged has one value (the resumed attempt logs again what the lost one had not saved)
    run_dirs = sorted((folder / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2
    assert {d.name.rsplit("-", 1)[1] for d in run_dirs} == {(folder / "wandb_run_id").read_text().strip()}
    logged: dict[int, float] = {}
    for run_dir in run_dirs:
        [run_file] = run_dir.glob("run-*.wandb")
        for row in wandb_records.history(run_file):
            if "train/loss" in row:
                assert logged.setdefault(row["_step"], row["train/loss"]) == row["train/loss"], row
    assert sorted(logged) == list(range(1, STEPS + 1))
    assert [logged[s] for s in sorted(logged)] == results["losses"]

    # SLURM's record of it, and what `ringctl status` says
    wait_for(lambda: _sacct_history(cli, job_id)[-1:] == ["COMPLETED"], 60, "the job's end in sacct")
    assert _sacct_history(cli, job_id) == ["NODE_FAIL", "COMPLETED"]
    status = cli("status", job_id)
    assert status.returncode == 0, status.stderr
    assert f"job {job_id} (slurm): done (COMPLETED)" in status.stdout, status.stdout
    assert "attempts: 2 (attempt 0: " in status.stdout and f"{node}" in status.stdout, status.stdout
    assert "requeued 1x" in status.stdout, status.stdout
    print(f"node {node} lost at step >= {2 * CHECKPOINT_EVERY}; job back in the queue after {requeued_s:.1f} s; "
          f"resumed from step {results['resumed_from_step']}")


def test_a_retry_is_not_blamed_for_the_lost_allocation_s_killed_tasks() -> None:
    """After a node failure SLURM writes its notice, then the ended allocation's srun lines
    ("Killed"), then the retry's own: only the retry's count for its failure."""
    from ringctl.health import srun_exits
    from ringctl.jobs import _latest_attempt_lines

    log = (
        "submitit INFO (2026-11-30 14:00:00,000) - Starting with JobEnvironment(job_id=7, rank=0)\n"
        "slurmstepd: error: *** JOB 7 ON node1 CANCELLED AT 2026-11-30T14:00:05 DUE TO NODE FAILURE ***\n"
        "srun: error: node2: tasks 2-3: Killed\n"
        "submitit INFO (2026-11-30 14:00:20,000) - Starting with JobEnvironment(job_id=7, rank=0)\n"
        "srun: error: node1: task 1: Exited with exit code 1\n"
    )
    latest = _latest_attempt_lines(log)
    assert "Killed" not in latest and latest.startswith("submitit INFO (2026-11-30 14:00:20")
    assert srun_exits(latest) == srun_exits("srun: error: node1: task 1: Exited with exit code 1\n")
    assert srun_exits(latest) != srun_exits(log)
