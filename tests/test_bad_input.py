"""Bad input to `ringctl launch`: one line naming the key, the value and what is allowed;
exit code 2; no job submitted and no job folder left (the runs root stays empty).

Runs the real CLI as a subprocess, with launcher=local or launcher=slurm: validation
happens before any executor exists, so no SLURM cluster is needed here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = {
    "unknown topology": (["+topology=nope"], ["topology='nope'", "2node"]),
    "unknown key": (["+topology=2node", "workload.nope=1"], ["workload.nope", "workload.seq_len"]),
    "unknown group option": (["+topology=2node", "launcher=pbs"], ["launcher='pbs'", "slurm"]),
    "wrong type": (["+topology=2node", "workload.seq_len=long"], ["workload.seq_len='long'", "Integer"]),
    "seq_len the layout cannot split": (
        ["+topology=2node", "launcher=local", "workload.seq_len=1004"],
        ["workload.seq_len=1004", "multiple of 8"],
    ),
    "check seq_len the layout cannot split": (
        ["+topology=2node", "launcher=local", "workload.layout=striped", "workload.check_seq_len=6"],
        ["workload.check_seq_len=6", "multiple of 4"],
    ),
    "unknown layout": (["+topology=2node", "workload.layout=spiral"], ["workload.layout='spiral'", "zigzag"]),
    "kv heads do not divide heads": (["+topology=2node", "workload.kv_heads=3"], ["workload.kv_heads=3", "divisor"]),
    "uneven tasks per node": (
        ["+topology=2node", "launcher=slurm", "topology.ranks_per_node=[3,2]"],
        ["topology.ranks_per_node=[3, 2]", "same count on every node"],
    ),
    "virtual nodes that do not fit the ranks": (
        ["+topology=2node", "launcher=local", "topology.virtual_node_size=3"],
        ["topology.virtual_node_size=3", "divisor of the 4 ranks"],
    ),
    "zero ranks per node": (["+topology=2node", "launcher=slurm", "launcher.max_ranks_per_node=0"], ["launcher.max_ranks_per_node=0"]),
    "sbatch value with a newline": (
        ["+topology=2node", "launcher=slurm", "launcher.partition='gpu\n#SBATCH --wrap=x'"],
        ["launcher.partition=", "no newline"],
    ),
    "extra sbatch option with a newline": (
        ["+topology=2node", "launcher=slurm", "+launcher.additional.comment='a\nb'"],
        ["launcher.additional.comment=", "no newline"],
    ),
    "extra sbatch option ringctl owns": (
        ["+topology=2node", "launcher=slurm", "+launcher.additional.nodes=9"],
        ["launcher.additional.nodes=9", "topology"],
    ),
    "unknown ring algorithm": (["+topology=2node", "launcher=local", "topology.ring=spiral"], ["topology.ring='spiral'", "hierarchical"]),
    "online W&B without a key": (["+topology=2node", "wandb=online"], ["wandb.mode='online'", "WANDB_API_KEY"]),
    "custom entry that does not import": (
        ["+topology=2node", "workload=custom", "workload.entry=no_such_pkg.mod:fn"],
        ["workload.entry='no_such_pkg.mod:fn'", "importable"],
    ),
    "sweep with one bad point": (
        ["+topology=2node", "launcher=local", "-m", "workload.seq_len=1024,1004"],
        ["workload.seq_len=1004", "multiple of 8"],
    ),
}


def run_cli(args: list[str], runs: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "RINGCTL_MAX_RANKS_PER_NODE", "SLURM_CONF")}
    environ.update(RINGCTL_RUNS=str(runs), **env)
    return subprocess.run(
        [sys.executable, "-m", "ringctl", "launch", *args],
        capture_output=True, text=True, env=environ, timeout=120,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case: str, tmp_path: Path) -> None:
    args, expected = CASES[case]
    runs = tmp_path / "runs"
    done = run_cli(args, runs)
    assert done.returncode == 2, done.stderr + done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("ringctl launch:"), lines[0]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert "Traceback" not in done.stderr
    assert not runs.exists() or not any(runs.iterdir()), sorted(runs.rglob("*"))
