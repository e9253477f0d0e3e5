"""Memory per rank in the planner and the launcher: `ringctl plan` shows the predicted peak per
rank (table, JSON) against topology.memory_per_rank_GB with the longest sequence that fits, and
`ringctl launch` refuses, before anything is submitted, a job whose predicted peak exceeds it.

The expected figures come from ringctl.memory.predict_peak / max_seq_len called here with the
shapes each test states (the CLI must show exactly those). Real CLI in subprocesses; no job
runs (refusals, and --dry-run for what fits).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ringctl.memory import max_seq_len, predict_peak
from ringctl.topology import Topology

RINGCTL = [sys.executable, "-m", "ringctl"]
#: the default workload (conf/workload/attention.yaml) as the predictor's arguments
DEFAULT: dict[str, Any] = {"batch": 1, "heads": 8, "kv_heads": 2, "head_dim": 64, "dtype": "float32", "layout": "zigzag", "causal": True}
#: 2node: 2 H100 nodes x 8 ranks, hierarchical ring, GPU ranks priced with the Triton kernels
TWO_NODE: dict[str, Any] = {**DEFAULT, "world_size": 16, "algorithm": "hierarchical", "nodes": 2, "block_impl": "triton"}
#: the embedded local default: one node of 2 CPU ranks, flat ring, the torch block path on one thread
LOCAL: dict[str, Any] = {**DEFAULT, "world_size": 2, "algorithm": "flat", "nodes": 1, "block_impl": "torch", "cpu_threads": 1}


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        k: v for k, v in os.environ.items()
        if k not in ("SLURM_CONF", "RINGCTL_MAX_RANKS_PER_NODE", "RINGCTL_CONFIG_DIR", "WANDB_API_KEY")
    }  # fmt: skip
    environ.update(RINGCTL_RUNS=str(cwd / "runs"), RINGCTL_STATE_DIR=str(cwd / "state"), COLUMNS="400", **env)
    return subprocess.run([*RINGCTL, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=120, check=False)


def _expected(shapes: dict[str, Any], seq_len: int, limit: int) -> dict[str, Any]:
    est = predict_peak(seq_len=seq_len, **shapes)
    return {**est.to_dict(), "memory_per_rank_bytes": limit, "max_seq_len": max_seq_len(limit, **shapes),
            "fits": est.with_inputs <= limit}  # fmt: skip


def test_plan_json_carries_the_prediction_the_limit_and_the_longest_sequence(tmp_path: Path) -> None:
    done = _run(["plan", "+topology=2node", "workload.seq_len=1048576", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    memory = json.loads(done.stdout)["memory"]
    expected = _expected(TWO_NODE, 1048576, 80 * 10**9)  # _h100.yaml: 80 GB per rank
    assert {k: memory[k] for k in expected} == expected
    assert memory["fits"] is True and memory["block_impl"] == "triton"
    # the longest sequence is the inverse: it fits, one divisor step more does not
    longest = memory["max_seq_len"]
    assert predict_peak(seq_len=longest, **TWO_NODE).with_inputs <= 80 * 10**9
    assert predict_peak(seq_len=longest + 32, **TWO_NODE).with_inputs > 80 * 10**9  # zigzag on 16 ranks: 32

    local = json.loads(_run(["plan", "--json"], tmp_path).stdout)["memory"]
    assert {k: local[k] for k in ("peak_bytes", "peak_bytes_with_inputs", "max_seq_len", "memory_per_rank_bytes")} == {
        k: v for k, v in _expected(LOCAL, 3072, 8 * 10**9).items()
        if k in ("peak_bytes", "peak_bytes_with_inputs", "max_seq_len", "memory_per_rank_bytes")
    }  # fmt: skip


def test_plan_table_shows_it_and_marks_a_plan_that_does_not_fit(tmp_path: Path) -> None:
    est = predict_peak(seq_len=3072, **LOCAL)
    limit = est.with_inputs - 1  # one byte short
    done = _run(["plan", f"topology.memory_per_rank_GB={limit / 1e9!r}", "--png", str(tmp_path / "ring.png")], tmp_path)
    assert done.returncode == 0, done.stderr
    [line] = [x for x in done.stdout.splitlines() if x.startswith("memory per rank:")]
    longest = max_seq_len(limit, **LOCAL)
    assert longest < 3072
    assert f"predicted peak {est.with_inputs / 1e6:.3g} MB" in line, line
    assert "does not fit: ringctl launch refuses it" in line and f"longest seq_len that fits: {longest:,}" in line, line
    assert "does not fit" in done.stdout.split("memory per rank:")[0]  # the table's row, too
    assert (tmp_path / "ring.png").stat().st_size > 0
    data = json.loads(_run(["plan", f"topology.memory_per_rank_GB={limit / 1e9!r}", "--json"], tmp_path).stdout)
    assert data["memory"]["fits"] is False and data["memory"]["max_seq_len"] == longest


def test_plan_without_a_limit_says_so(tmp_path: Path) -> None:
    done = _run(["plan", "topology.memory_per_rank_GB=null", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    memory = json.loads(done.stdout)["memory"]
    assert memory["memory_per_rank_bytes"] is None and memory["max_seq_len"] is None and memory["fits"] is True
    assert memory["peak_bytes"] == predict_peak(seq_len=3072, **LOCAL).total


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_a_bad_memory_per_rank_names_the_key(value: str, tmp_path: Path) -> None:
    done = _run(["plan", f"topology.memory_per_rank_GB={value}", "--json"], tmp_path)
    assert done.returncode == 2
    assert "topology.memory_per_rank_GB=" in done.stderr and "a number > 0" in done.stderr, done.stderr


# ---- launch: refused before submission ---------------------------------------------------------
LIMIT_GB = 0.05
LAUNCH = ["launcher=local", "launcher.cpus_per_task=1", "wandb=disabled", f"topology.memory_per_rank_GB={LIMIT_GB}"]


def test_launch_over_the_limit_is_refused_naming_the_keys_and_leaves_nothing(tmp_path: Path) -> None:
    limit = int(LIMIT_GB * 1e9)
    longest = max_seq_len(limit, **LOCAL)
    over = longest + 4  # zigzag on 2 ranks: multiples of 4
    est = predict_peak(seq_len=over, **LOCAL)
    assert est.with_inputs > limit
    done = _run(["launch", *LAUNCH, f"workload.seq_len={over}"], tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for text in (
        f"workload.seq_len={over}", f"at most {longest}", f"topology.memory_per_rank_GB={LIMIT_GB:g}",
        f"{est.with_inputs:,} bytes", f"{limit:,} bytes", "workload.batch", "workload.heads", "workload.dtype",
    ):  # fmt: skip
        assert text in lines[0], (text, lines[0])
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert not (tmp_path / "state" / "index.jsonl").exists()


def test_launch_just_under_the_limit_validates(tmp_path: Path) -> None:
    longest = max_seq_len(int(LIMIT_GB * 1e9), **LOCAL)
    done = _run(["launch", *LAUNCH, f"workload.seq_len={longest}", "workload.check=false", "--dry-run"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_gpu_ranks_are_priced_with_the_triton_kernels(tmp_path: Path) -> None:
    """A SLURM job with GPUs (no cluster needed: --dry-run validates and stops)."""
    limit = 10**9
    longest = max_seq_len(limit, **TWO_NODE)
    assert longest != max_seq_len(limit, **{**TWO_NODE, "block_impl": "torch", "cpu_threads": 8})
    args = ["+topology=2node", "launcher=slurm", "launcher.gpus_per_node=8", "topology.memory_per_rank_GB=1", "--dry-run"]
    over = _run(["launch", *args, f"workload.seq_len={longest + 32}"], tmp_path)
    assert over.returncode == 2 and f"at most {longest} here" in over.stderr, over.stderr


def test_topology_keeps_the_field() -> None:
    assert Topology.from_config({"nodes": 1, "ranks_per_node": 2, "memory_per_rank_GB": 1.5}).memory_per_rank_bytes == 1_500_000_000
    assert Topology.from_config({"nodes": 1, "ranks_per_node": 2}).memory_per_rank_bytes is None
