"""Dead ranks fail fast, and job control tells the truth (real processes, real SLURM).

- One rank SIGKILLed (dies without a word) or SIGSTOPped (silent, never exits), locally and
  under SLURM: every process of the job is gone and `ringctl launch` has returned within
  the configured timeout + 30 s of the fault (launcher.heartbeat_timeout_s, set to a few
  seconds, for the silent rank; launcher.init_timeout_s for the dead one), exit 1, naming
  the rank and its node as the first cause, not its peers' "connection closed";
  results.json and `ringctl status` say the same, and the losses of the steps done are kept.
- `ringctl cancel` of a local launch started in the background (`&`: SIGINT ignored) stops
  every process and says CANCELLED only then; of a SLURM job, the waiting launch reports a
  cancel, not a failure.
- slurmctld restarted under a running job: the job completes, the waiting launch follows it
  to the end, `ringctl status` is right afterwards.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from jobctl import (
    ONE_PER_NODE,
    TIMEOUT_S,
    TORCH_BLOCKS,
    TRAIN,
    Cli,
    job_processes,
    kill_rank,
    record,
    restart_slurmctld,
    wait_checkpoint,
    wait_for,
)

from ringctl.local_controller import GRACE_ENV

#: long enough never to finish during a test: the faults end them
LONG = [*TRAIN, "wandb=disabled", "workload.steps=100000", "workload.checkpoint_every=3", f"launcher.init_timeout_s={TIMEOUT_S}"]
BOUND_S = TIMEOUT_S + 30
#: launcher.heartbeat_timeout_s of the silent-rank cases: the peers' watchdog finds the
#: stopped rank this long after its last heartbeat (the default, init_timeout_s, only makes
#: the test wait; below it, the watchdog and not a collective's timeout finds the rank; above
#: the few seconds apart in which a loaded machine starts the ranks, so none is taken for
#: one that never started). The dead-rank cases keep the default: the peers name a dead
#: rank from the broken connection within seconds (ringctl.health.DEAD_AFTER_S), before
#: any watchdog could call it silent.
SILENT_S = 8
#: the local controller's grace for the tasks left once the first exited (the stopped rank,
#: once its peers' watchdog ended them), instead of 15 s (srun --wait under SLURM)
SILENT_GRACE_S = 5


def _timeouts(signum: int) -> tuple[list[str], float]:
    """The fault's extra overrides, and its bound: the configured timeout + 30 s."""
    if signum == signal.SIGSTOP:
        return [f"launcher.heartbeat_timeout_s={SILENT_S}"], SILENT_S + 30
    return [], BOUND_S


@pytest.fixture(scope="module")
def slurm(slurm_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Cli, Any]:
    return Cli(tmp_path_factory.mktemp("faults"), {**slurm_cluster.env, **TORCH_BLOCKS}), slurm_cluster


def _fault(cli: Cli, tmp_path: Path, launcher: str, rank: int, signum: int) -> tuple[str, Path, str, float]:
    """Launch (following), hit `rank` with `signum` after the first checkpoint; returns the
    job id, folder, launch's output and the seconds from the fault to launch's return and
    every process of the job gone."""
    out = tmp_path / "launch.out"
    extra, bound = _timeouts(signum)
    launch = cli.start("launch", *LONG, *extra, f"launcher={launcher}", out=out)
    job_id, folder = cli.job()
    wait_checkpoint(folder, 3)
    hit = kill_rank(folder, rank, signum)
    try:
        code = launch.wait(timeout=bound + 60)
    finally:
        launch.kill()
    wait_for(lambda: not job_processes(folder), 60, "every process of the job gone")
    took = time.monotonic() - hit
    assert code == 1, out.read_text()
    return job_id, folder, out.read_text(), took


def _check_named(cli: Cli, job_id: str, folder: Path, output: str, rank: int, kind: str) -> None:
    node = record(folder, rank)["node"]
    assert f"rank{rank} failed first (node {node}, attempt 0): {kind}" in output, output
    assert "Connection closed" not in output.split("failed first", 1)[1].splitlines()[0]
    results = json.loads((folder / "results.json").read_text())
    assert results["failure"]["rank"] == rank and results["failure"]["node"] == node, results["failure"]
    assert len(results["losses"]) >= 3  # the steps done before the fault are kept
    status = cli("status", job_id)
    assert f"first cause: rank {rank} on node {node}: {kind}" in status.stdout, status.stdout


@pytest.mark.parametrize(("rank", "signum", "kind"), [(1, signal.SIGKILL, "died"), (2, signal.SIGSTOP, "silent")])
def test_dead_rank_local(tmp_path: Path, rank: int, signum: int, kind: str) -> None:
    cli = Cli(tmp_path)
    cli.env.update(TORCH_BLOCKS)
    if signum == signal.SIGSTOP:
        cli.env[GRACE_ENV] = str(SILENT_GRACE_S)
    job_id, folder, output, took = _fault(cli, tmp_path, "local", rank, signum)
    assert took < _timeouts(signum)[1], f"{took:.0f} s from the fault to a clean failure"
    _check_named(cli, job_id, folder, output, rank, kind)
    how = json.loads((folder / f"{job_id}_exits.json").read_text())["exits"][str(rank)]
    if signum == signal.SIGKILL:
        assert how == "SIGKILL", how
    else:  # the stopped rank never exits: the controller kills it once its peers have ended
        assert how.startswith("still running") and "killed by the controller" in how, how
    print(f"local {signal.Signals(signum).name} of rank {rank}: clean failure {took:.1f} s after the fault")


@pytest.mark.parametrize(("rank", "signum", "kind"), [(3, signal.SIGKILL, "died"), (1, signal.SIGSTOP, "silent")])
def test_dead_rank_slurm(slurm: tuple[Cli, Any], tmp_path: Path, rank: int, signum: int, kind: str) -> None:
    cli, cluster = slurm
    before = len(cli.index())  # one runs root for the module: the job is the newest entry
    out = tmp_path / "launch.out"
    extra, bound = _timeouts(signum)
    launch = cli.start("launch", *LONG, *extra, "launcher=slurm", out=out)
    wait_for(lambda: len(cli.index()) > before, 120, "the job in the index")
    job_id, folder = cli.index()[-1]["job_id"], Path(cli.index()[-1]["folder"])
    wait_checkpoint(folder, 3)
    hit = kill_rank(folder, rank, signum)
    try:
        code = launch.wait(timeout=bound + 60)
    finally:
        launch.kill()
    wait_for(lambda: cli.sacct(job_id) not in ("", "RUNNING", "COMPLETING", "PENDING"), 60, "the job's end in sacct")
    wait_for(lambda: not job_processes(folder), 60, "every process of the job gone")
    took = time.monotonic() - hit
    assert code == 1, out.read_text()
    assert took < bound, f"{took:.0f} s from the fault to a clean failure"
    assert cli.sacct(job_id) == "FAILED"
    assert record(folder, rank)["node"] in cluster.node_names
    _check_named(cli, job_id, folder, out.read_text(), rank, kind)
    print(f"slurm {signal.Signals(signum).name} of rank {rank}: clean failure {took:.1f} s after the fault")


def test_cancel_background_local_launch(tmp_path: Path) -> None:
    """`ringctl launch ... &` from a script (SIGINT ignored there): cancel stops it all."""
    cli = Cli(tmp_path)
    cli.env.update(TORCH_BLOCKS)
    args = shlex.join(["ringctl", "launch", *LONG, "launcher=local", ONE_PER_NODE["local"]])
    shell = subprocess.Popen(  # a non-interactive shell's background job, as scripts and CI do
        ["bash", "-c", f"{shlex.quote(sys.executable)} -m {args} > {tmp_path}/bg.out 2>&1 & wait"],
        env=cli.env,
    )
    job_id, folder = cli.job()
    wait_checkpoint(folder, 3)
    t0 = time.monotonic()
    cancelled = cli("cancel", job_id)
    took = time.monotonic() - t0
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    assert f"cancelled job {job_id} (local): CANCELLED" in cancelled.stdout
    assert job_processes(folder) == []  # cancelled means stopped: nothing of it runs
    assert shell.wait(timeout=60) == 0
    background = (tmp_path / "bg.out").read_text()
    assert f"job {job_id} was cancelled" in background and "Traceback" not in background, background
    status = cli("status", job_id)
    assert f"job {job_id} (local): cancelled (CANCELLED)" in status.stdout, status.stdout
    results = json.loads((folder / "results.json").read_text())
    assert "SIGTERM on every rank" in results["stopped"] and len(results["losses"]) >= 3
    again = cli("cancel", job_id)
    assert again.returncode == 1 and "nothing to cancel" in again.stderr
    print(f"local cancel of a background launch: {took:.1f} s")


def test_slurm_cancel_is_reported_as_cancel(slurm: tuple[Cli, Any], tmp_path: Path) -> None:
    cli, _ = slurm
    before = len(cli.index())
    out = tmp_path / "launch.out"
    launch = cli.start("launch", *LONG, "launcher=slurm", ONE_PER_NODE["slurm"], out=out)
    wait_for(lambda: len(cli.index()) > before, 120, "the job in the index")
    job_id, folder = cli.index()[-1]["job_id"], Path(cli.index()[-1]["folder"])
    wait_checkpoint(folder, 3)
    cancelled = cli("cancel", job_id)
    assert cancelled.returncode == 0 and f"cancelled job {job_id} (slurm): CANCELLED" in cancelled.stdout, cancelled.stderr
    assert launch.wait(timeout=120) == 1
    output = out.read_text()
    assert f"job {job_id} was cancelled" in output and "failed" not in output and "Traceback" not in output, output
    wait_for(lambda: not job_processes(folder), 60, "every process of the job gone")
    assert "cancelled (CANCELLED" in cli("status", job_id).stdout


def test_slurmctld_restart_with_a_job_running(slurm: tuple[Cli, Any], tmp_path: Path) -> None:
    cli, cluster = slurm
    before = len(cli.index())
    out = tmp_path / "launch.out"
    steps = 80  # ~0.1 s each: the job runs on through the controller's downtime
    launch = cli.start(
        "launch", *TRAIN, "launcher=slurm", ONE_PER_NODE["slurm"], "wandb=disabled", f"workload.steps={steps}",
        "workload.checkpoint_every=3", out=out,
    )
    wait_for(lambda: len(cli.index()) > before, 120, "the job in the index")
    job_id, folder = cli.index()[-1]["job_id"], Path(cli.index()[-1]["folder"])
    wait_checkpoint(folder, 3)
    stopped_at = time.time()
    down = restart_slurmctld(cluster.state_dir, cluster.slurm_conf, cluster.env, down_s=2.0)
    assert launch.wait(timeout=300) == 0, out.read_text()
    assert "COMPLETED" in out.read_text()
    assert (folder / "results.json").stat().st_mtime > stopped_at  # it was running when slurmctld went down
    results = json.loads((folder / "results.json").read_text())
    assert len(results["losses"]) == steps and results["attempt"] == 0  # it ran on, not requeued
    status = cli("status", job_id)
    assert f"job {job_id} (slurm): done (COMPLETED)" in status.stdout, status.stdout
    print(f"slurmctld restart: down 2 s, answering {down:.1f} s after start; the job completed")


def test_status_asks_sacct_once_for_many_jobs(slurm: tuple[Cli, Any], tmp_path: Path) -> None:
    """The jobs this module ran, listed: one sacct call for all (a wrapper in front of the
    real sacct counts the calls; the answers are SLURM's own)."""
    cli, _ = slurm
    slurm_jobs = [e for e in cli.index() if e["kind"] == "slurm"]
    assert len(slurm_jobs) >= 3
    real = subprocess.run(["which", "sacct"], capture_output=True, text=True, env=cli.env, check=True).stdout.strip()
    (tmp_path / "bin").mkdir()
    wrapper = tmp_path / "bin" / "sacct"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    env = {**cli.env, "PATH": f"{tmp_path / 'bin'}:{cli.env['PATH']}"}
    done = subprocess.run([sys.executable, "-m", "ringctl", "status"], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 1, calls
    for entry in slurm_jobs:
        assert entry["job_id"] in calls[0] and entry["job_id"] in done.stdout
    assert "failed" in done.stdout and "cancelled" in done.stdout and "done" in done.stdout
