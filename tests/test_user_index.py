"""Job control from any shell: a job launched in one directory is found by `ringctl status`,
`logs` and `cancel` run from another, through the per-user index (RINGCTL_STATE_DIR here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

RINGCTL = [sys.executable, "-m", "ringctl"]


def _env(state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_CONF", "RINGCTL_RUNS", "RINGCTL_MAX_RANKS_PER_NODE")}
    env["RINGCTL_STATE_DIR"] = str(state)
    return env


def test_a_job_is_found_from_another_directory(tmp_path: Path) -> None:
    here, elsewhere, state = tmp_path / "here", tmp_path / "elsewhere", tmp_path / "state"
    here.mkdir()
    elsewhere.mkdir()
    launched = subprocess.run(
        [*RINGCTL, "launch", "launcher=local", "wandb=disabled", "workload.seq_len=256", "workload.check_seq_len=256",
         "workload.iters=1", "workload.warmup=0"],
        cwd=here, env=_env(state), capture_output=True, text=True, timeout=300,
    )
    assert launched.returncode == 0, launched.stderr
    [entry] = [json.loads(line) for line in (state / "index.jsonl").read_text().splitlines()]
    assert Path(entry["folder"]).is_relative_to(here / "runs")
    status = subprocess.run([*RINGCTL, "status"], cwd=elsewhere, env=_env(state), capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert entry["job_id"] in status.stdout and "done" in status.stdout
    one = subprocess.run([*RINGCTL, "status", entry["job_id"]], cwd=elsewhere, env=_env(state), capture_output=True, text=True, timeout=120)
    assert one.returncode == 0 and "done" in one.stdout, one.stderr
    logs = subprocess.run([*RINGCTL, "logs", entry["job_id"]], cwd=elsewhere, env=_env(state), capture_output=True, text=True, timeout=120)
    assert logs.returncode == 0, logs.stderr
    cancel = subprocess.run([*RINGCTL, "cancel", entry["job_id"]], cwd=elsewhere, env=_env(state), capture_output=True, text=True, timeout=120)
    assert cancel.returncode == 1 and "nothing to cancel" in cancel.stderr
