"""Secrets in the environment (WANDB_API_KEY, *TOKEN*, *SECRET*, *KEY*, *PASSWORD*) are never
written: not into job folders, sbatch scripts, submitit pickles, logs, checkpoints, W&B files
or results.json, nor into what `ringctl launch` prints.

A real job runs with fake secrets in its environment (locally, and on the dev cluster when
it can start), then every file under the runs root (binary pickles and W&B run files too)
is searched for each secret's bytes. The jobs do read the environment: W&B offline gets
WANDB_API_KEY, and a check in the same job proves the ranks saw the other variables.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# fake secrets, fresh per run (so a hit cannot be a leftover of an earlier run)
FAKE = {
    "WANDB_API_KEY": secrets.token_hex(20),
    "HF_TOKEN": "hf_" + secrets.token_urlsafe(24),
    "MY_SERVICE_TOKEN": secrets.token_urlsafe(24),
    "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
    "DB_PASSWORD": "pw-" + secrets.token_hex(12),
    "GITHUB_PAT_KEY": "ghp_" + secrets.token_hex(18),
}

USER_MODULE = '''
import os


def env_seen(cfg, ctx):
    """Proves the ranks got the secrets in their environment, without writing them."""
    names = ("WANDB_API_KEY", "HF_TOKEN", "MY_SERVICE_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "GITHUB_PAT_KEY")
    print("rank", ctx.rank, "sees", sorted(n for n in names if os.environ.get(n)))
    return {"secrets_in_env": sum(bool(os.environ.get(n)) for n in names)}
'''


def leaks(root: Path, texts: dict[str, str]) -> list[str]:
    """Every (file, variable) where the file's bytes hold the secret (UTF-8, as pickles,
    JSON, logs and W&B's protobuf records store strings)."""
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {name}" for name, value in FAKE.items() if value.encode() in data]
    for where, text in texts.items():
        found += [f"{where}: {name}" for name, value in FAKE.items() if value in text]
    return found


def environment(runs: Path, tmp_path: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    (tmp_path / "userpkg").mkdir(exist_ok=True)
    (tmp_path / "userpkg" / "ringctl_secret_probe.py").write_text(USER_MODULE)
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_CONF", "RINGCTL_MAX_RANKS_PER_NODE")}
    env.update(FAKE)
    env.update(extra or {})  # first: a cluster's environment carries this process's PYTHONPATH
    env.update(
        RINGCTL_RUNS=str(runs), WANDB_SILENT="true",
        RINGCTL_BLOCK_IMPL="torch",  # what CPU ranks use anyway, without importing the Triton kernels first
        PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path / "userpkg"), os.environ.get("PYTHONPATH")])),
    )
    return env


def ringctl(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ringctl", *args], capture_output=True, text=True, env=env, timeout=timeout, check=False)


def entries(runs: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (runs / "index.jsonl").read_text().splitlines()]


def test_local_train_job_writes_no_secret(tmp_path: Path) -> None:
    """A train job (checkpoints, W&B offline run, results.json) and a custom job that reads
    the variables, with fake secrets in the environment; then every file is searched."""
    runs = tmp_path / "runs"
    env = environment(runs, tmp_path)
    one_rank = "launcher.local_ranks_per_node=1"  # 2 virtual nodes x 1 rank: every kind of file, fewer ranks
    train = ringctl(
        ["launch", "+topology=2node", "launcher=local", one_rank, "workload=train", "workload.steps=2",
         "workload.checkpoint_every=1", "wandb=offline"], env,
    )
    assert train.returncode == 0, train.stdout + train.stderr
    probe = ringctl(
        ["launch", "+topology=2node", "launcher=local", one_rank, "workload=custom",
         "workload.entry=ringctl_secret_probe:env_seen", "wandb=disabled"], env,
    )
    assert probe.returncode == 0, probe.stdout + probe.stderr
    dry = ringctl(["launch", "+topology=2node", "launcher=slurm", "--dry-run"], env)
    assert dry.returncode == 0, dry.stderr
    train_entry, probe_entry = entries(runs)
    folder = Path(train_entry["folder"])
    results = json.loads((folder / "results.json").read_text())
    assert results["checkpoints"], results.keys()  # the job really wrote checkpoints
    assert Path(results["wandb"]["run_dir"]).is_dir()  # and a W&B offline run
    probe_results = json.loads((Path(probe_entry["folder"]) / "results.json").read_text())
    assert probe_results["custom"]["secrets_in_env"] == len(FAKE)  # the ranks did have the secrets
    written = [p for p in runs.rglob("*") if p.is_file()]
    assert any(p.suffix == ".pkl" for p in written) and any(p.name.endswith(".wandb") for p in written)
    found = leaks(runs, {
        "train output": train.stdout + train.stderr, "probe output": probe.stdout + probe.stderr,
        "dry-run output": dry.stdout + dry.stderr,
    })
    assert not found, found


def test_secret_in_config_is_refused(tmp_path: Path) -> None:
    """A config that would carry a secret (an interpolation of the environment) is refused
    before anything is written; the message names the key and the variable, not the value."""
    runs = tmp_path / "runs"
    env = environment(runs, tmp_path)
    done = ringctl(["launch", "+topology=2node", "launcher=local", "wandb.group=${oc.env:MY_SERVICE_TOKEN}"], env, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "wandb.group" in done.stderr and "$MY_SERVICE_TOKEN" in done.stderr, done.stderr
    assert not leaks(tmp_path, {"output": done.stdout + done.stderr})
    assert not runs.exists()


def test_slurm_job_writes_no_secret(slurm_cluster: Any, tmp_path: Path) -> None:
    """The same on the dev cluster: sbatch script, pickles, srun logs, results.json."""
    runs = tmp_path / "runs"
    env = environment(runs, tmp_path, {**slurm_cluster.env, "RINGCTL_MAX_RANKS_PER_NODE": "1"})  # 2 nodes x 1 rank
    env.update(FAKE)
    done = ringctl(
        ["launch", "+topology=2node", "launcher=slurm", "workload=custom",
         "workload.entry=ringctl_secret_probe:env_seen", "wandb=offline"], env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [entry] = entries(runs)
    folder = Path(entry["folder"])
    assert list(folder.glob("*_submission.sh")) and list(folder.glob("*_log.out"))
    results = json.loads((folder / "results.json").read_text())
    assert results["custom"]["secrets_in_env"] == len(FAKE)
    found = leaks(runs, {"output": done.stdout + done.stderr})
    assert not found, found


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
