"""Jobs that survive: a train job stopped mid-run resumes from its last complete checkpoint
and goes on exactly as if it had never stopped.

- A torn checkpoint (cut short, garbage) is never loaded: the one before it is.
- `scontrol requeue` of a running job (real SLURM, 2 nodes x 1 rank): every rank stops at
  a step end with a checkpoint; the job requeues, resumes, completes; the waiting
  `ringctl launch` follows it through PENDING again and ends with exit 0.
- The time limit's warning signal (`--signal`; the test cuts the running job's limit to 3
  minutes): the job requeues itself, lands on the other node (the test excludes the first
  one while it waits), re-plans its ring there and completes.
- Locally, the warning signal restarts the tasks, which resume; past launcher.max_requeues
  the job stops with its checkpoint and says why.

Each time the losses equal, to 1e-12 in float64, those of the same model trained without
interruption in one process (SDPA on the whole sequence; an independent reference), and
W&B holds ONE run (one id) continued by every attempt, every step logged.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from jobctl import ONE_PER_NODE, TORCH_BLOCKS, TRAIN, Cli, record, wait_checkpoint, wait_for
from omegaconf import OmegaConf

import wandb_records
from ringctl.workloads.train import load_latest_checkpoint, reference_losses, save_checkpoint


def test_torn_checkpoint_is_never_loaded(tmp_path: Path) -> None:
    weights = torch.arange(3.0, dtype=torch.float64)
    state: dict[str, Any] = {"model": {"w": weights}, "optimizer": {}, "rng": torch.get_rng_state(),
                             "losses": [1.0, 0.5], "checkpoints": [], "wandb_run_id": "abc"}
    good = save_checkpoint(tmp_path, 2, state)
    (tmp_path / "checkpoints" / "step_000004.pt").write_bytes(good.read_bytes()[:100])  # cut short
    (tmp_path / "checkpoints" / "step_000006.pt").write_bytes(b"not a checkpoint")
    torch.save({"step": 8}, tmp_path / "checkpoints" / "step_000008.pt")  # whole file, not ours
    (tmp_path / "checkpoints" / ".step_000010.pt.123.tmp").write_bytes(good.read_bytes())  # never renamed
    found = load_latest_checkpoint(tmp_path)
    assert found is not None
    path, loaded = found
    assert path == good and loaded["step"] == 2 and loaded["losses"] == [1.0, 0.5]
    torch.testing.assert_close(loaded["model"]["w"], weights, rtol=0, atol=0)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == [".step_000010.pt.123.tmp"]


def _reference(results: dict[str, Any]) -> list[float]:
    workload = OmegaConf.create(results["config"]["workload"])
    return reference_losses(workload, len(results["losses"]))


def _check_resumed(folder: Path, steps: int) -> dict[str, Any]:
    """What every resumed run must show: all steps' losses equal the uninterrupted
    reference, resumed from a checkpoint, one W&B run continued across the attempts."""
    results = json.loads((folder / "results.json").read_text())
    assert len(results["losses"]) == steps and "error" not in results
    assert results["attempt"] >= 1 and 0 < results["resumed_from_step"] < steps
    torch.testing.assert_close(
        torch.tensor(results["losses"], dtype=torch.float64),
        torch.tensor(_reference(results), dtype=torch.float64), rtol=0, atol=1e-12,
    )
    starts = [a for a in results["attempts"] if a["event"] == "start"]
    assert [a["attempt"] for a in starts] == list(range(results["attempt"] + 1))
    # one W&B run: every attempt's offline folder carries the same run id; each step once
    run_dirs = sorted((folder / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == len(starts) and len({d.name.rsplit("-", 1)[1] for d in run_dirs}) == 1
    assert {d.name.rsplit("-", 1)[1] for d in run_dirs} == {(folder / "wandb_run_id").read_text().strip()}
    # (SLURM's SIGTERM kills W&B's service with the job: the steps it had not written are
    # logged again by the resumed attempt, from the checkpoint; a step twice has one value)
    logged: dict[int, float] = {}
    for run_dir in run_dirs:
        [run_file] = run_dir.glob("run-*.wandb")
        for row in wandb_records.history(run_file):
            if "train/loss" in row:
                assert logged.setdefault(row["_step"], row["train/loss"]) == row["train/loss"], row
    assert sorted(logged) == list(range(1, steps + 1))
    assert [logged[s] for s in sorted(logged)] == results["losses"]
    assert list(folder.glob("rank*.error")) == []  # nothing failed, nothing stale
    return results


@pytest.fixture(scope="module")
def cli(slurm_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Cli:
    return Cli(tmp_path_factory.mktemp("resume"), {**slurm_cluster.env, **TORCH_BLOCKS})


def _back_in_queue(cli: Cli, job_id: str) -> bool:
    return cli.slurm("squeue", "-h", "-j", job_id, "-o", "%T", check=False) == "PENDING"


def test_scontrol_requeue_resumes(cli: Cli, tmp_path: Path) -> None:
    steps = 16
    launch = cli.start(
        "launch", *TRAIN, "launcher=slurm", ONE_PER_NODE["slurm"], "wandb=offline", f"workload.steps={steps}",
        "workload.checkpoint_every=4", out=tmp_path / "launch.out",
    )
    job_id, folder = cli.job()
    wait_checkpoint(folder, 4)
    cli.slurm("scontrol", "requeue", job_id)
    wait_for(lambda: _back_in_queue(cli, job_id), 60, "the job back in the queue")
    status = cli("status", job_id)
    assert f"job {job_id} (slurm): queued" in status.stdout, status.stdout  # pending again, not failed
    cli.slurm("scontrol", "update", f"JobId={job_id}", "StartTime=now")  # no wait for the credential expiry
    assert launch.wait(timeout=300) == 0, (tmp_path / "launch.out").read_text()
    out = (tmp_path / "launch.out").read_text()
    assert "COMPLETED" in out and "failed" not in out and "Traceback" not in out, out
    assert "requeued 1x" in out, out
    results = _check_resumed(folder, steps)
    # every rank stopped at the same step end and saved it before SLURM's KillWait ran out
    stopped = [a for a in results["attempts"] if a["event"] == "stopped"]
    assert stopped and "SIGTERM on every rank" in stopped[0]["reason"]
    assert results["resumed_from_step"] >= 4
    assert record(folder, 0, attempt=0)["state"] == "stopped"
    # `ringctl launch` reports the end from rank 0's result file; sacct records it a little later
    wait_for(lambda: cli.sacct(job_id) not in ("", "PENDING", "RUNNING", "REQUEUED", "COMPLETING"), 60, "the job's end in sacct")
    assert cli.sacct(job_id) == "COMPLETED"
    # job control on the ended job tells the truth: nothing to cancel, exit 1
    cancelled = cli("cancel", job_id)
    assert cancelled.returncode == 1 and "already ended (COMPLETED)" in cancelled.stderr, cancelled.stderr


def test_time_limit_warning_requeues_onto_another_node(cli: Cli, slurm_cluster: Any) -> None:
    """The warning signal of a time limit (sbatch --signal): rank 0 requeues the job itself
    (up to launcher.max_requeues times). The job starts with a 10-minute limit and the
    warning `warn_s` before its end, so no warning can come before the ranks' handlers are
    in place; once it has checkpointed, the test cuts its limit to 3 minutes, which makes
    the warning due at once: slurmctld sends it at its next time-limit check (every 30 s; it
    sends a warning up to 30 s before it is due), minutes before the cut limit would end it.
    Until then the ranks are stopped (SIGSTOP): SLURM sends SIGCONT before the warning, so
    the job has the steps it had left whenever the check comes.
    While it waits in the queue the test keeps it off its first node and gives it 10
    minutes, so it resumes once, on the other node, with a ring planned for that node."""
    warn_s = 170  # > 3 minutes - 30 s: due as soon as the limit is cut to 3 minutes
    steps = 150
    done = cli(
        "launch", "+topology=1node", *TRAIN[1:], "launcher=slurm", "wandb=offline", f"workload.steps={steps}",
        "workload.checkpoint_every=25", "launcher.time_min=10", f"+launcher.additional.signal_delay_s={warn_s}",
        "wait=false",
    )
    assert done.returncode == 0, done.stderr
    job_id = next(e["job_id"] for e in reversed(cli.index()))
    folder = next(Path(e["folder"]) for e in cli.index() if e["job_id"] == job_id)
    wait_checkpoint(folder, 25)  # every rank is in the workload: ringctl's signal handlers are set
    pids = [int(record(folder, rank)["pid"]) for rank in range(2)]
    for pid in pids:  # stopped first: no warning can come before the cut
        os.kill(pid, signal.SIGSTOP)
    try:
        cli.slurm("scontrol", "update", f"JobId={job_id}", "TimeLimit=3")
        wait_for(lambda: _back_in_queue(cli, job_id) and (folder / "attempts.jsonl").exists(), 120, "the requeue")
    finally:
        for pid in pids:  # should no warning have come (a failure), nothing is left stopped
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    first = json.loads((folder / "attempts.jsonl").read_text().splitlines()[0])
    cli.slurm("scontrol", "update", f"JobId={job_id}", f"ExcNodeList={first['node_names'][0]}", "TimeLimit=10")
    cli.slurm("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    wait_for(lambda: cli.sacct(job_id) not in ("", "PENDING", "RUNNING", "REQUEUED", "COMPLETING"), 600, "the job's end")
    assert cli.sacct(job_id) == "COMPLETED", cli("status", job_id).stdout
    results = _check_resumed(folder, steps)
    requeues = [a for a in results["attempts"] if a["event"] == "requeue"]
    assert len(requeues) == 1 and "time limit or preemption warning" in requeues[0]["reason"]
    assert requeues[0]["step"] == results["resumed_from_step"] and requeues[0]["wandb_finished"]
    starts = [a for a in results["attempts"] if a["event"] == "start"]
    moved = set(starts[-1]["node_names"])
    assert moved.isdisjoint(first["node_names"]) and moved <= set(slurm_cluster.node_names)
    assert results["plan"]["node_names"] == sorted(moved) and results["node_names"] == starts[-1]["node_names"]


def test_local_warning_signal_requeues_up_to_the_limit(tmp_path: Path) -> None:
    """Locally (no SLURM), with launcher.max_requeues=1: the warning signal to every rank
    mid-run makes the local controller restart the tasks, which resume from the checkpoint
    of that step; the second warning finds the limit reached, and the job fails saying so,
    its checkpoint and its losses (equal to the uninterrupted run's) kept."""
    local = Cli(tmp_path)
    local.env.update(TORCH_BLOCKS)
    launch = local.start(
        "launch", *TRAIN, "launcher=local", ONE_PER_NODE["local"], "wandb=offline", "workload.steps=100000",
        "workload.checkpoint_every=3",
        "launcher.max_requeues=1", out=tmp_path / "launch.out",
    )
    _, folder = local.job()
    wait_checkpoint(folder, 3)
    for rank in range(2):
        os.kill(int(record(folder, rank)["pid"]), signal.SIGUSR2)
    wait_for((folder / "health" / "attempt-1" / "rank1.json").exists, 120, "the restarted tasks")
    resumed = json.loads((folder / "attempts.jsonl").read_text().splitlines()[1])["step"]
    wait_checkpoint(folder, (resumed // 3 + 2) * 3)  # the resumed run got on
    for rank in range(2):
        os.kill(int(record(folder, rank, attempt=1)["pid"]), signal.SIGUSR2)
    assert launch.wait(timeout=300) == 1, (tmp_path / "launch.out").read_text()
    out = (tmp_path / "launch.out").read_text()
    assert "launcher.max_requeues=1 reached" in out, out
    results = json.loads((folder / "results.json").read_text())
    assert "launcher.max_requeues=1 reached" in results["error"] and results["attempt"] == 1
    assert results["resumed_from_step"] == resumed > 0
    assert [a["event"] for a in results["attempts"]] == ["start", "requeue", "start", "stopped"]
    stopped_at = results["attempts"][-1]["step"]
    assert len(results["losses"]) == stopped_at and (folder / "checkpoints" / f"step_{stopped_at:06d}.pt").exists()
    torch.testing.assert_close(
        torch.tensor(results["losses"], dtype=torch.float64),
        torch.tensor(_reference(results), dtype=torch.float64), rtol=0, atol=1e-12,
    )
    assert len({d.name.rsplit("-", 1)[1] for d in (folder / "wandb").glob("offline-run-*")}) == 1
    assert not subprocess.run(["pgrep", "-f", str(folder.parent)], capture_output=True, check=False).stdout
