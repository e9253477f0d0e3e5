"""Before submitting: `ringctl launch --dry-run` prints the composed config and the exact
sbatch script(s) (or the local plan) and submits nothing; `--preflight` asks SLURM
(`sbatch --test-only`) whether it would take the job and when it would start. Extra sbatch
options are checked against what this machine's sbatch knows; containers (pyxis) run
the image's python, not this machine's virtual environment; a failed sbatch is one line.

The first part needs no cluster (validation and rendering happen before any sbatch). The
second runs against the real dev cluster (`slurm_cluster` fixture): what --dry-run prints
is byte for byte what submitit then writes and sbatch receives.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

STAMP = re.compile(r"/\d{8}-\d{6}-(sweep-)?([A-Za-z0-9_.+-]+?)(-\d+)?/")


def ringctl(args: list[str], runs: Path, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "RINGCTL_MAX_RANKS_PER_NODE", "SLURM_CONF")}
    environ.update(RINGCTL_RUNS=str(runs), WANDB_SILENT="true")
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "ringctl", *args], capture_output=True, text=True,
                          env=environ, cwd=cwd, timeout=timeout, check=False)


def sections(stdout: str) -> dict[str, str]:
    """The dry run's output split at its `# config` and `# ... sbatch script` headers."""
    parts: dict[str, str] = {}
    key = "head"
    for line in stdout.splitlines(keepends=True):
        if line.startswith("# config: ") or (" sbatch script (" in line and line.startswith("# ")):
            key = line.strip()
            parts[key] = ""
        elif line.startswith("# ") and key == "head":
            parts.setdefault(key, "")
            parts[key] += line
        else:
            parts[key] = parts.get(key, "") + line
    return parts


def script_of(stdout: str) -> str:
    [text] = [v for k, v in sections(stdout).items() if "sbatch script" in k]
    return text


def sbatch_lines(script: str) -> dict[str, str]:
    """#SBATCH --key=value lines, values unquoted as sbatch reads them."""
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            out[key] = shlex.split(value)[0] if value else ""
    return out


def srun_words(script: str) -> list[str]:
    [line] = [line for line in script.splitlines() if line.startswith("srun ")]
    return shlex.split(line)


BASE = ["+topology=2node", "launcher=slurm", "launcher.gpus_per_node=0", "launcher.max_ranks_per_node=2", "wandb=disabled"]


def test_dry_run_prints_config_and_script_and_makes_nothing(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    done = ringctl(["launch", *BASE, "name=probe", "--dry-run"], runs, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "nothing submitted" in done.stdout
    parts = sections(done.stdout)
    [config_key] = [k for k in parts if k.startswith("# config:")]
    config = yaml.safe_load(parts[config_key])  # the config the job would get, as YAML
    assert config["name"] == "probe" and config["launcher"]["kind"] == "slurm"
    assert config["resources"] == {"kind": "slurm", "nodes": 2, "ranks_per_node": 2, "gpus_per_node": 0, "virtual_node_size": None}
    script = script_of(done.stdout)
    assert script.startswith("#!/bin/bash\n")
    flags = sbatch_lines(script)
    assert (flags["nodes"], flags["ntasks-per-node"], flags["job-name"], flags["time"]) == ("2", "2", "probe", "10")
    assert "gpus-per-node" not in flags and "array" not in flags
    words = srun_words(script)
    assert words[-5:-1] == [sys.executable, "-u", "-m", "submitit.core._submit"]
    assert re.fullmatch(rf"{re.escape(str(runs))}/\d{{8}}-\d{{6}}-probe/%j", words[-1]), words[-1]
    assert subprocess.run(["bash", "-n"], input=script, text=True, check=False).returncode == 0  # valid shell
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no runs root, nothing in the cwd


def test_container_runs_the_images_python(tmp_path: Path) -> None:
    """pyxis: srun gets --container-image and --container-mounts (plus the runs root, so the
    job folder is at the same path inside); the job starts the image's python3, and no path
    of this machine's virtual environment is in the script."""
    runs = tmp_path / "runs"
    done = ringctl(
        ["launch", *BASE, "launcher.container_image='nvcr.io#nvidia/pytorch:24.05-py3'",
         "launcher.container_mounts=[/data:/data:ro]", "--dry-run"], runs,
    )
    assert done.returncode == 0, done.stderr
    script = script_of(done.stdout)
    words = srun_words(script)
    assert "--container-image=nvcr.io#nvidia/pytorch:24.05-py3" in words
    assert f"--container-mounts=/data:/data:ro,{runs}:{runs}" in words
    assert words[-5:-1] == ["python3", "-u", "-m", "submitit.core._submit"]
    assert sys.executable not in script and str(Path(sys.executable).parent) not in script
    chosen = ringctl(["launch", *BASE, "launcher.python=/opt/conda/bin/python", "--dry-run"], runs)
    assert chosen.returncode == 0, chosen.stderr
    assert srun_words(script_of(chosen.stdout))[-5] == "/opt/conda/bin/python"
    assert not runs.exists()


def test_quoted_values_stay_one_word(tmp_path: Path) -> None:
    """A comment with ';' and '$' is allowed: submitit quotes it, so sbatch reads it as text
    and bash never sees it as code (on the cluster: test_dry_run_is_what_sbatch_gets)."""
    done = ringctl(["launch", *BASE, "+launcher.additional.comment='a; b $HOME'", "--dry-run"], tmp_path / "runs")
    assert done.returncode == 0, done.stderr
    script = script_of(done.stdout)
    assert "#SBATCH --comment='a; b $HOME'\n" in script
    assert sbatch_lines(script)["comment"] == "a; b $HOME"


def test_sweep_dry_run_caps_the_array(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    done = ringctl(
        ["launch", *BASE, "launcher.array_parallelism=2", "--dry-run", "-m", "workload.seq_len=512,1024,2048"], runs,
    )
    assert done.returncode == 0, done.stderr
    points = [k for k in sections(done.stdout) if k.startswith("# config: point")]
    assert [p.split(":")[1].strip() for p in points] == ["point 1 of 3", "point 2 of 3", "point 3 of 3"]
    assert [yaml.safe_load(sections(done.stdout)[p])["workload"]["seq_len"] for p in points] == [512, 1024, 2048]
    script = script_of(done.stdout)
    flags = sbatch_lines(script)
    assert flags["array"] == "0-2%2" and flags["job-name"] == "sweep-ringctl"
    assert flags["output"].endswith("/%A_%a/%A_%a_0_log.out")
    assert not runs.exists()


def test_local_dry_run_shows_the_local_plan(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    done = ringctl(["launch", "+topology=2node", "launcher=local", "topology.ring=flat", "--dry-run"], runs)
    assert done.returncode == 0, done.stderr
    assert "local processes: 4 ranks on this machine (CPU, gloo), 2 virtual node(s) x 2 ranks" in done.stdout
    assert "# ring flat: ring order [0, 1, 2, 3]; node of each rank [0, 0, 1, 1]" in done.stdout
    assert "#!/bin/bash" not in done.stdout
    assert not runs.exists()


def test_sbatch_options_come_from_sbatch_help(tmp_path: Path) -> None:
    """With a slurm.conf it can read, `sbatch --help` is parsed; the list kept in the code
    for machines without one is that of SLURM 22.05 and must match it there."""
    from ringctl import launch

    if not shutil.which("sbatch"):
        pytest.skip("no sbatch here")
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=probe\nSlurmctldHost=localhost\n")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    version = subprocess.run(["sbatch", "--version"], capture_output=True, text=True, env=env, check=False).stdout.split()
    help_text = subprocess.run(["sbatch", "--help"], capture_output=True, text=True, env=env, check=False).stdout
    listed = set(re.findall(r"^ {1,8}(?:-[A-Za-z],?\s+)?--([a-z][a-z0-9-]*)", help_text, flags=re.MULTILINE))
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    launch.sbatch_options.cache_clear()
    try:
        parsed = launch.sbatch_options()
    finally:
        launch.sbatch_options.cache_clear()
        if old is None:
            os.environ.pop("SLURM_CONF")
        else:
            os.environ["SLURM_CONF"] = old
    assert {"mem", "comment", "gres", "reservation", "exclude", "mail-type"} <= parsed
    assert parsed == listed | launch.SBATCH_OPTIONS_MAN_ONLY
    if version[-1:] == ["22.05.8"]:
        assert listed == launch.SBATCH_OPTIONS_22_05


def test_controller_down_is_one_line_exit_1(tmp_path: Path) -> None:
    """sbatch cannot reach slurmctld (a slurm.conf naming a port nobody listens on): not the
    user's input, so exit 1, with SLURM's cause once, and no folder left."""
    if not shutil.which("sbatch"):
        pytest.skip("no sbatch here")
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=down\nSlurmctldHost=localhost\nSlurmctldPort=9\nMessageTimeout=2\n")
    runs = tmp_path / "runs"
    done = ringctl(["launch", *BASE, "wait=false"], runs, env={"SLURM_CONF": str(conf)})
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["ringctl launch: sbatch failed: Unable to contact slurm controller (connect failure)"], done.stderr
    assert not runs.exists()


# ---- on the dev cluster ------------------------------------------------------------------


SLEEPY = '''
import time


def sleepy(cfg, ctx):
    time.sleep(300)
'''


@pytest.fixture(scope="module")
def cluster_env(slurm_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The cluster's client settings, a rank cap for 2 cores, and a module whose function
    sleeps (jobs that stay queued or running while a test looks at them)."""
    user = tmp_path_factory.mktemp("userpkg")
    (user / "ringctl_sleepy.py").write_text(SLEEPY)
    path = os.pathsep.join(filter(None, [str(user), os.environ.get("PYTHONPATH")]))
    return {**{k: str(v) for k, v in slurm_cluster.env.items()}, "RINGCTL_MAX_RANKS_PER_NODE": "2", "PYTHONPATH": path}


def _scontrol(env: dict[str, str], job_id: str) -> str:
    environ = {**os.environ, **env}
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=environ, timeout=30, check=False).stdout


def _scancel(env: dict[str, str], job_id: str) -> None:
    subprocess.run(["scancel", job_id.split("_")[0]], env={**os.environ, **env}, timeout=30, check=False)


def _submitted_since(env: dict[str, str], since: float) -> list[str]:
    """Jobs submitted at or after `since` (epoch s), by their submit time, from slurmctld
    (squeue) and accounting (sacct) both. Comparing job lists taken before and after races
    with sacct recording, seconds late under load, jobs that ended before the test began."""
    rows = ""
    for cmd in (["sacct", "-a", "-n", "-X", "-P", "-o", "JobID,Submit", "-S", "now-1hour"], ["squeue", "-h", "-o", "%i|%V"]):
        rows += subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=30, check=False).stdout
    found = set()
    for line in rows.splitlines():
        job, _, submit = line.partition("|")
        try:
            when = datetime.fromisoformat(submit.strip()).timestamp()
        except ValueError:
            continue
        if when >= since:
            found.add(job.strip())
    return sorted(found)


def _index(runs: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (runs / "index.jsonl").read_text().splitlines()]


def _normalise(text: str) -> str:
    return STAMP.sub(r"/STAMP-\2/", text)


def test_dry_run_is_what_sbatch_gets(cluster_env: dict[str, str], tmp_path: Path) -> None:
    """The dry run's script equals (up to the folder's time stamp) the file submitit writes
    and sbatch runs; a comment with ';' and '$HOME' reaches SLURM as that literal text."""
    runs = tmp_path / "runs"
    args = [*BASE, "workload.warmup=0", "workload.iters=1", "+launcher.additional.comment='a; b $HOME'"]
    dry = ringctl(["launch", *args, "--dry-run"], runs, env=cluster_env)
    assert dry.returncode == 0, dry.stderr
    assert not runs.exists()
    done = ringctl(["launch", *args, "wait=false"], runs, env=cluster_env)
    assert done.returncode == 0, done.stdout + done.stderr
    [entry] = _index(runs)
    try:
        [written] = Path(entry["folder"]).glob("*_submission.sh")
        assert _normalise(written.read_text()) == _normalise(script_of(dry.stdout))
        assert "Comment=a; b $HOME" in _scontrol(cluster_env, entry["job_id"])
    finally:
        _scancel(cluster_env, entry["job_id"])


def test_sweep_array_is_capped(cluster_env: dict[str, str], tmp_path: Path) -> None:
    """launcher.array_parallelism=1: the array's dry-run script is the one sent, and SLURM
    throttles the array to one running task."""
    runs = tmp_path / "runs"
    args = [*BASE, "workload=custom", "workload.entry=ringctl_sleepy:sleepy", "launcher.array_parallelism=1",
            "-m", "workload.seq_len=512,1024"]
    dry = ringctl(["launch", *args, "--dry-run"], runs, env=cluster_env)
    assert dry.returncode == 0, dry.stderr
    done = ringctl(["launch", *args], runs, env=cluster_env)
    assert done.returncode == 0, done.stdout + done.stderr
    entries = _index(runs)
    array = entries[0]["job_id"].split("_")[0]
    try:
        [written] = runs.rglob("*_submission.sh")
        assert _normalise(written.read_text()) == _normalise(script_of(dry.stdout))
        assert "ArrayTaskThrottle=1" in _scontrol(cluster_env, array)
    finally:
        _scancel(cluster_env, array)


def test_preflight_asks_slurm_and_submits_nothing(cluster_env: dict[str, str], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    began = float(int(time.time()))  # SLURM's submit times have whole seconds
    ok = ringctl(["launch", *BASE, "--preflight"], runs, env=cluster_env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert re.search(r"# preflight: accepted: would start at \S+ on nodes \S+ \(partition debug, 4 CPUs\)", ok.stdout), ok.stdout
    refused = ringctl(["launch", *BASE, "launcher.partition=nope", "--preflight"], runs, env=cluster_env)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "launcher.partition" in lines[0] and "nope" in lines[0], refused.stderr
    too_big = ringctl(["launch", "+topology=16node", *BASE[1:], "--preflight"], runs, env=cluster_env)
    assert too_big.returncode == 2 and "node configuration is not available" in too_big.stderr, too_big.stderr
    assert _submitted_since(cluster_env, began) == []  # --test-only queues nothing
    assert not runs.exists()


def test_refused_submission_is_one_line_exit_2(cluster_env: dict[str, str], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    done = ringctl(["launch", *BASE, "launcher.partition=nope", "wait=false"], runs, env=cluster_env)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["ringctl launch: sbatch refused the job: Invalid partition name specified (check launcher.partition)"], done.stderr
    assert not runs.exists()


def test_job_that_reached_slurm_is_never_lost(cluster_env: dict[str, str], tmp_path: Path) -> None:
    """The index cannot be written after sbatch succeeded (here: a folder where the file
    should be): the launch still succeeds, prints the job id and folder and how to follow
    it, and following by folder works."""
    runs = tmp_path / "runs"
    (runs / "index.jsonl").mkdir(parents=True)
    done = ringctl(["launch", *BASE, "workload=custom", "workload.entry=ringctl_sleepy:sleepy", "wait=false"], runs, env=cluster_env)
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = re.search(r"submitted job (\d+)", done.stdout).group(1)  # type: ignore[union-attr]
    try:
        [folder] = [p for p in runs.glob("*/*") if p.name == job_id]
        assert f"could not add 1 submitted job(s) to the index {runs / 'index.jsonl'}" in done.stderr, done.stderr
        assert f"job {job_id}: {folder}   (ringctl status {folder})" in done.stderr, done.stderr
        status = ringctl(["status", str(folder)], runs, env=cluster_env)
        assert status.returncode == 0 and f"job {job_id} (slurm)" in status.stdout, status.stdout + status.stderr
    finally:
        _scancel(cluster_env, job_id)
