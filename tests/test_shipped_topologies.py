"""Every shipped topology plans and launches as shipped, with the default workload: `ringctl
plan +topology=T` exits 0, and `ringctl launch +topology=T --dry-run` validates the job (the
same checks a real launch runs before submitting) both as local processes and for SLURM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ringctl.config import CONF_DIR

TOPOLOGIES = sorted(p.stem for p in (CONF_DIR / "topology").glob("*.yaml") if not p.stem.startswith("_"))
RINGCTL = [sys.executable, "-m", "ringctl"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_CONF", "RINGCTL_MAX_RANKS_PER_NODE", "RINGCTL_CONFIG_DIR")}
    env["RINGCTL_RUNS"] = str(cwd / "runs")
    return subprocess.run([*RINGCTL, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_there_are_topologies() -> None:
    assert {"1node", "2node", "4node", "16node", "emulated3node"} <= set(TOPOLOGIES)


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_plans_as_shipped(topology: str, tmp_path: Path) -> None:
    done = _run(["plan", f"+topology={topology}", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("launcher", ["local", "slurm"])
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_launches_as_shipped(topology: str, launcher: str, tmp_path: Path) -> None:
    done = _run(["launch", f"+topology={topology}", f"launcher={launcher}", "--dry-run"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def _stated(path: Path) -> dict:
    """The keys a topology file states itself or through its bases in conf/topology."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    stated: dict = {}
    for base in data.pop("defaults", []):
        if isinstance(base, str) and base != "_self_":
            stated.update(_stated(path.with_name(f"{base}.yaml")))
    stated.update(data)
    return stated


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_states_memory_per_rank(topology: str) -> None:
    """Every shipped topology says how much memory a rank has (not the local default's by
    omission): H100 ranks 80 GB of HBM, CPU ranks their share of the host's RAM."""
    stated = _stated(CONF_DIR / "topology" / f"{topology}.yaml")
    memory = stated.get("memory_per_rank_GB")
    assert isinstance(memory, float) and memory > 0, (topology, memory)
    if stated.get("gpus_per_node"):
        assert memory == 80.0, (topology, memory)
