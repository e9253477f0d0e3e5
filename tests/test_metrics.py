"""`ringctl metrics JOB`: a job's per-step history and summary, read back from its offline W&B
run file (ringctl.runlog), compared with what the job wrote into results.json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ringctl.runlog import RunLog


def ringctl(args: list[str], runs: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    dropped = ("SLURM_CONF", "WANDB_API_KEY", "RINGCTL_MAX_RANKS_PER_NODE")
    environ = {k: v for k, v in os.environ.items() if k not in dropped}
    environ.update(RINGCTL_RUNS=str(runs), WANDB_SILENT="true")
    return subprocess.run([sys.executable, "-m", "ringctl", *args], check=False, capture_output=True, text=True, env=environ, timeout=timeout)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    runs = tmp_path_factory.mktemp("runs")
    done = ringctl(
        ["launch", "+topology=2node", "launcher=local", "launcher.local_ranks_per_node=1", "workload.seq_len=512",
         "workload.iters=3", "workload.check=false", "wandb=offline"], runs,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [entry] = [json.loads(line) for line in (runs / "index.jsonl").read_text().splitlines()]
    folder = Path(entry["folder"])
    return {"runs": runs, "id": entry["job_id"], "folder": folder, "results": json.loads((folder / "results.json").read_text())}


def test_json_history_and_summary_are_the_jobs_figures(job: dict[str, Any]) -> None:
    done = ringctl(["metrics", job["id"], "--json"], job["runs"])
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    times = job["results"]["times"]
    assert out["job_id"] == job["id"] and Path(out["run_file"]).parent.parent == job["folder"] / "wandb"
    # one row per timed iteration, as the attention workload logged them (the plan picture is not a row)
    assert [row["_step"] for row in out["history"]] == [1, 2, 3]
    assert [row["attention/fwd_ms"] for row in out["history"]] == pytest.approx([1e3 * t for t in times["fwd_s"]])
    assert [row["attention/bwd_ms"] for row in out["history"]] == pytest.approx([1e3 * t for t in times["bwd_s"]])
    assert not any(key.startswith("plan/") for row in out["history"] for key in row)
    summary = out["summary"]
    assert summary["times/fwd_median_s"] == pytest.approx(times["fwd_median_s"])
    assert summary["bytes/match"] is True and summary["nodes"] == 2


def test_table_by_job_folder(job: dict[str, Any]) -> None:
    done = ringctl(["metrics", str(job["folder"])], job["runs"])
    assert done.returncode == 0, done.stderr
    assert f"job {job['id']}: history (3 steps)" in done.stdout
    assert "attention/fwd_ms" in done.stdout and "times/fwd_median_s" in done.stdout
    first = job["results"]["times"]["fwd_s"][0] * 1e3
    assert f"{first:.6g}" in done.stdout
    assert "run file: " in done.stdout


def test_a_job_without_a_run_says_so(job: dict[str, Any], tmp_path: Path) -> None:
    copy = tmp_path / "job"
    shutil.copytree(job["folder"], copy, ignore=shutil.ignore_patterns("wandb"))
    results = json.loads((copy / "results.json").read_text())
    results["wandb"] = {"mode": "disabled"}
    results["config"]["wandb"]["mode"] = "disabled"
    (copy / "results.json").write_text(json.dumps(results))
    done = ringctl(["metrics", str(copy)], job["runs"])
    assert done.returncode == 2
    assert f"no W&B run file in {copy / 'wandb'} (wandb.mode=disabled)" in done.stderr
    unknown = ringctl(["metrics", "no-such-job"], job["runs"])
    assert unknown.returncode == 2 and "not found" in unknown.stderr


def test_a_file_that_is_not_a_run_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run-x.wandb"
    path.write_bytes(b"not a run file at all")
    with pytest.raises(ValueError, match="not a W&B run file"):
        RunLog.read(path)
