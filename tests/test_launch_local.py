"""The embedded default end to end: `ringctl launch +topology=2node` on a machine without a
SLURM cluster runs local processes (CPU, gloo) in 2 virtual nodes x 2 ranks; results.json
holds a real 2-node plan, bytes per link class equal to the plan's prediction, and a
passing float64 exactness check; the W&B offline run sits in the job folder and its run
file, read back, holds the step metrics; the API key in the environment is written nowhere.
Then job control from another process: status, logs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_readme import SECRET, default_launch

import wandb_records


def ringctl(args: list[str], runs: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    # no cluster, no key, no cap from the caller's shell: the embedded default as a new user gets it
    dropped = ("SLURM_CONF", "WANDB_API_KEY", "RINGCTL_MAX_RANKS_PER_NODE")
    environ = {k: v for k, v in os.environ.items() if k not in dropped}
    environ.update(RINGCTL_RUNS=str(runs), WANDB_SILENT="true", **env)
    return subprocess.run([sys.executable, "-m", "ringctl", *args], capture_output=True, text=True, env=environ, timeout=timeout)


@pytest.fixture(scope="module")
def local_job(tmp_path_factory: pytest.TempPathFactory) -> dict:
    # exactly the README's command, as its user runs it in a shell of their own (HOME and the
    # working directory a fresh folder, with a fake key in the environment, to prove it is
    # not written): the same job tests/test_readme.py checks, run once per session
    job = default_launch(tmp_path_factory)
    folder = Path(job["entry"]["folder"])
    return {"home": job["home"], "runs": job["home"] / "runs", "entry": job["entry"], "folder": folder,
            "stdout": job["stdout"], "results": job["results"]}


def test_runs_as_local_processes_in_two_virtual_nodes(local_job: dict) -> None:
    results = local_job["results"]
    assert local_job["entry"]["kind"] == "local"
    res = results["config"]["resources"]
    assert (res["kind"], res["nodes"], res["ranks_per_node"], res["virtual_node_size"]) == ("local", 2, 2, 2)
    plan = results["plan"]
    assert plan["nodes"] == 2 and plan["world_size"] == 4 and plan["ranks_per_node"] == [2, 2]
    assert results["nodes"] == 2 and results["virtual_nodes"] is True
    assert len(results["node_names"]) == 4


def test_exactness_and_bytes(local_job: dict) -> None:
    results = local_job["results"]
    check = results["check"]
    assert check["passed"] and check["max_error"] <= 1e-9, check
    assert set(check["errors"]) == {"out", "dq", "dk", "dv"}
    for phase in ("forward", "backward"):
        for link in ("intra", "inter"):
            figures = results["bytes"][phase][link]
            assert figures["measured"] == figures["predicted"], (phase, link, figures)
    # a 2-node hierarchical plan really sends bytes over both link classes
    assert results["bytes"]["forward"]["inter"]["measured_total"] > 0
    assert results["bytes"]["forward"]["intra"]["measured_total"] > 0
    assert len(results["times"]["fwd_s"]) == results["config"]["workload"]["iters"]


def test_summary_printed(local_job: dict) -> None:
    out = local_job["stdout"]
    assert "done" in out and "passed" in out
    assert f"results: {local_job['folder'] / 'results.json'}" in out
    assert "wandb sync " in out


def test_wandb_offline_run_holds_step_metrics(local_job: dict) -> None:
    folder, results = local_job["folder"], local_job["results"]
    run_dir = Path(results["wandb"]["run_dir"])
    assert run_dir.parent == folder / "wandb" and run_dir.name.startswith("offline-run-")
    [run_file] = run_dir.glob("run-*.wandb")
    steps = [h for h in wandb_records.history(run_file) if "attention/fwd_ms" in h]
    iters = results["config"]["workload"]["iters"]
    assert [h["_step"] for h in steps] == list(range(1, iters + 1))
    logged = [h["attention/fwd_ms"] / 1e3 for h in steps]
    assert logged == pytest.approx(results["times"]["fwd_s"], rel=1e-9)
    summary = wandb_records.summary(run_file)
    assert summary["check/passed"] is True and summary["max_error"] == pytest.approx(results["max_error"])
    images = [h for h in wandb_records.history(run_file) if "plan/_type" in h]
    assert len(images) == 1 and images[0]["plan/_type"] == "image-file"  # the plan picture
    assert (run_dir / "files" / images[0]["plan/path"]).is_file()
    assert (folder / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = wandb_records.config(run_file)
    assert config["workload"]["seq_len"] == results["config"]["workload"]["seq_len"]


def test_api_key_written_nowhere(local_job: dict) -> None:
    assert local_job["folder"].is_relative_to(local_job["runs"])  # the job's files, W&B's included
    leaked = [p for p in local_job["home"].rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []


def test_status_and_logs_from_another_process(local_job: dict) -> None:
    job_id = local_job["entry"]["job_id"]
    status = ringctl(["status", job_id], local_job["runs"], timeout=60)
    assert status.returncode == 0 and f"job {job_id} (local): done (COMPLETED)" in status.stdout
    listing = ringctl(["status"], local_job["runs"], timeout=60)
    assert job_id in listing.stdout and "done" in listing.stdout
    logs = ringctl(["logs", job_id, "--rank", "1"], local_job["runs"], timeout=60)
    assert logs.returncode == 0 and "Job completed successfully" in logs.stdout + logs.stderr
    missing = ringctl(["status", "424242424"], local_job["runs"], timeout=60)
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_local_sweep_validates_then_submits_all_with_one_wandb_group(tmp_path: Path) -> None:
    """Hydra multirun through ringctl's launcher plugin without SLURM: 2 points, both
    submitted (local processes), followed to the end (wait=true), one W&B group."""
    runs = tmp_path / "runs"
    done = ringctl(
        ["launch", "+topology=2node", "launcher=local", "launcher.local_ranks_per_node=1",
         "workload.seq_len=256", "workload.warmup=0", "workload.iters=1", "workload.check_seq_len=64",
         "-m", "workload.layout=zigzag,striped", "wait=true"],
        runs,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    entries = [json.loads(line) for line in (runs / "index.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in entries] == ["local", "local"]
    assert "workload.layout=zigzag" in done.stdout and "workload.layout=striped" in done.stdout
    groups = set()
    for entry in entries:
        folder = Path(entry["folder"])
        results = json.loads((folder / "results.json").read_text())
        assert results["check"]["passed"] and f"workload.layout={results['plan']['layout']}" in entry["overrides"]
        [run_file] = folder.glob("wandb/offline-run-*/run-*.wandb")
        groups.add(wandb_records.run_group(run_file))
    assert len(groups) == 1 and groups.pop().startswith("sweep-ringctl-")


def test_wait_false_then_cancel_from_another_process(tmp_path: Path) -> None:
    """wait=false returns at once with job id and folder; `ringctl cancel` stops the local
    processes and `ringctl status` says CANCELLED."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "ringctl_test_sleepy.py").write_text("import time\n\ndef main(cfg, ctx):\n    time.sleep(300)\n")
    runs = tmp_path / "runs"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(pkg), os.environ.get("PYTHONPATH")]))}
    done = ringctl(["launch", "+topology=2node", "launcher=local", "wandb=disabled", "workload=custom",
                    "workload.entry=ringctl_test_sleepy:main", "wait=false"], runs, timeout=60, **env)
    assert done.returncode == 0, done.stderr
    [entry] = [json.loads(line) for line in (runs / "index.jsonl").read_text().splitlines()]
    assert f"submitted job {entry['job_id']} (local); folder: {entry['folder']}" in done.stdout
    assert "running" in ringctl(["status", entry["job_id"]], runs, timeout=60).stdout
    assert ringctl(["cancel", entry["job_id"]], runs, timeout=60).returncode == 0
    pid = int(entry["job_id"])
    for _ in range(60):  # the controller stops its tasks, then exits
        if not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            break
        time.sleep(0.5)
    status = ringctl(["status", entry["job_id"]], runs, timeout=60)
    assert f"job {entry['job_id']} (local): cancelled (CANCELLED)" in status.stdout
    tasks = [p for p in Path("/proc").glob("[0-9]*") if _cmdline_has(p, str(Path(entry["folder"]).parent))]
    assert tasks == []


def _cmdline_has(proc: Path, text: str) -> bool:
    try:
        return text.encode() in (proc / "cmdline").read_bytes()
    except OSError:
        return False
