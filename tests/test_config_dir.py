"""A user's own configs without editing the package: `--config-dir DIR` (or
RINGCTL_CONFIG_DIR) puts DIR on Hydra's search path, so DIR/topology/mycluster.yaml is
`+topology=mycluster` for `ringctl plan` and `ringctl launch` alike.

Runs the real CLI as a subprocess from a scratch directory; no job is started (the launch
cases stop at --cfg, --help or validation).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# a cluster of 3 nodes x 2 ranks, stated in full (as the README's example)
MYCLUSTER = """\
name: mycluster
nodes: 3
ranks_per_node: 2
gpus_per_node: 0
nics_per_node: 1
intra:
  bandwidth_GBps: 20.0
  latency_us: 3.0
inter:
  bandwidth_GBps: 2.5
  latency_us: 9.0
ring: flat
order: node
distribution: block
virtual_node_size: null
compute_tflops: 5.0
"""


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    path = tmp_path / "my conf"  # a space: the search path entry must survive Hydra's grammar
    (path / "topology").mkdir(parents=True)
    (path / "topology" / "mycluster.yaml").write_text(MYCLUSTER)
    # extending a shipped option from the user's directory
    (path / "topology" / "bigger.yaml").write_text("defaults:\n  - 2node\n  - _self_\nname: bigger\nnodes: 5\n")
    return path


def ringctl(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("RINGCTL_CONFIG_DIR", "RINGCTL_MAX_RANKS_PER_NODE")}
    environ.update(RINGCTL_RUNS=str(cwd / "runs"), **env)
    return subprocess.run(
        [sys.executable, "-m", "ringctl", *args], check=False, cwd=cwd, capture_output=True, text=True, env=environ, timeout=120
    )


def test_plan_uses_the_users_topology(user_dir: Path, tmp_path: Path) -> None:
    done = ringctl("plan", "--config-dir", str(user_dir), "+topology=mycluster", "workload.seq_len=1200", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["world_size"] == 6 and data["nodes"] == 3 and data["ranks_per_node"] == [2, 2, 2]
    assert data["ring"] == "flat"
    extended = ringctl("plan", f"--config-dir={user_dir}", "+topology=bigger", "workload.seq_len=4000", "--json", cwd=tmp_path)
    assert extended.returncode == 0, extended.stderr
    assert json.loads(extended.stdout)["world_size"] == 5 * 8  # 2node's 8 ranks per node, 5 nodes


def test_environment_variable_names_the_dir(user_dir: Path, tmp_path: Path) -> None:
    done = ringctl("plan", "+topology=mycluster", "workload.seq_len=1200", "--json", cwd=tmp_path,
                   RINGCTL_CONFIG_DIR=str(user_dir))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["nodes"] == 3
    without = ringctl("plan", "+topology=mycluster", "--json", cwd=tmp_path)
    assert without.returncode == 2 and "topology='mycluster'" in without.stderr and "2node" in without.stderr


def test_launch_cfg_job_composes_the_users_topology(user_dir: Path, tmp_path: Path) -> None:
    done = ringctl("launch", "--config-dir", str(user_dir), "+topology=mycluster", "--cfg", "job", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    cfg = yaml.safe_load(done.stdout)
    assert cfg["topology"]["name"] == "mycluster" and cfg["topology"]["inter"]["bandwidth_GBps"] == 2.5
    assert not (tmp_path / "runs").exists()


def test_launch_validates_with_the_users_topology(user_dir: Path, tmp_path: Path) -> None:
    """One job's path: 3 nodes x 2 local ranks = 6 ranks, so zigzag needs a multiple of 12
    (2node would need 8); validation stops it before anything is submitted."""
    done = ringctl("launch", "--config-dir", str(user_dir), "+topology=mycluster", "launcher=local",
                   "workload.seq_len=1000", cwd=tmp_path)
    assert done.returncode == 2, done.stderr + done.stdout
    assert "workload.seq_len=1000" in done.stderr and "multiple of 12" in done.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_sweep_composes_every_point_with_the_users_topology(user_dir: Path, tmp_path: Path) -> None:
    """-m goes through Hydra's app and the sweep plugin: the search path must reach every point."""
    done = ringctl("launch", "--config-dir", str(user_dir), "+topology=mycluster", "launcher=local",
                   "-m", "workload.seq_len=1200,1000", cwd=tmp_path)
    assert done.returncode == 2, done.stderr + done.stdout
    assert "workload.seq_len=1000" in done.stderr and "multiple of 12" in done.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_launch_help_lists_the_users_options_and_no_bases(user_dir: Path, tmp_path: Path) -> None:
    done = ringctl("launch", "--config-dir", str(user_dir), "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    listing = done.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    groups = {name: {o.strip() for o in options.split(",")}
              for name, _, options in (line.partition(":") for line in listing.splitlines())
              if name in ("topology", "launcher", "workload", "wandb")}
    assert groups["topology"] >= {"2node", "emulated2node", "mycluster", "bigger"}
    assert groups["launcher"] >= {"auto", "local", "slurm"}
    assert groups["workload"] >= {"attention", "custom", "train"}
    assert groups["wandb"] == {"disabled", "offline", "online"}
    assert not [o for options in groups.values() for o in options if o.startswith(("_", "schema"))]


@pytest.mark.parametrize("command", ["plan", "launch"])
def test_missing_dir_is_exit_2_naming_the_option(command: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    done = ringctl(command, "--config-dir", str(missing), "+topology=2node", cwd=tmp_path)
    assert done.returncode == 2, done.stderr + done.stdout
    assert f"--config-dir='{missing}'" in done.stderr and "existing directory" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    env = ringctl(command, "+topology=2node", "--json" if command == "plan" else "--cfg=job", cwd=tmp_path,
                  RINGCTL_CONFIG_DIR=str(missing))
    assert env.returncode == 2 and f"RINGCTL_CONFIG_DIR='{missing}'" in env.stderr


def test_a_packaged_name_in_the_users_dir_is_refused(user_dir: Path, tmp_path: Path) -> None:
    """The package comes first on the search path: a user's 2node.yaml would be ignored
    without a word, so it is an error naming the file."""
    (user_dir / "topology" / "2node.yaml").write_text(MYCLUSTER)
    done = ringctl("plan", "--config-dir", str(user_dir), "+topology=2node", "--json", cwd=tmp_path)
    assert done.returncode == 2 and "--config-dir=" in done.stderr and "topology/2node.yaml" in done.stderr
