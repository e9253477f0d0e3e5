"""workload=train through the whole stack (`ringctl launch`, local processes, gloo, the
2-node hierarchical plan, ring_attention forward and backward, gradient all-reduce): the
first steps' losses equal those of the same model, data and seed trained in ONE process
with plain SDPA on the whole sequence, to float32 tolerance; checkpoints land in the job
folder and load back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ringctl.workloads.train import reference_losses

STEPS = 4


def test_ring_training_equals_one_process_sdpa(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_CONF", "RINGCTL_MAX_RANKS_PER_NODE")}
    env["RINGCTL_RUNS"] = str(runs)
    args = ["+topology=2node", "launcher=local", "workload=train", f"workload.steps={STEPS}",
            "workload.checkpoint_every=2", "wandb=disabled"]
    done = subprocess.run([sys.executable, "-m", "ringctl", "launch", *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    [results_path] = runs.glob("*/*/results.json")
    results = json.loads(results_path.read_text())
    assert results["plan"]["nodes"] == 2 and results["plan"]["world_size"] == 4

    workload = OmegaConf.create(results["config"]["workload"])
    expected = reference_losses(workload, STEPS)
    torch.testing.assert_close(
        torch.tensor(results["losses"], dtype=torch.float32), torch.tensor(expected, dtype=torch.float32)
    )
    assert results["losses"][-1] < results["losses"][0]  # it learns

    checkpoints = [Path(p) for p in results["checkpoints"]]
    assert [p.name for p in checkpoints] == ["step_000002.pt", "step_000004.pt"]
    assert all(p.parent == results_path.parent / "checkpoints" for p in checkpoints)
    state = torch.load(checkpoints[-1], weights_only=True)
    assert state["step"] == STEPS and "embed.weight" in state["model"]
