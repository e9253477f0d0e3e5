"""workload.documents through the whole stack (`ringctl launch`, local processes, gloo, the
2-node hierarchical plan): a train job on packed lognormal documents under the `docs`
layout (a sequence length that the ranks do not divide, so the layout pads internally)
has the losses of the same model trained in ONE process with SDPA and the block-diagonal
causal mask; an attention job on explicit document lengths with a padded tail passes its
float64 check against SDPA with that mask, with bytes as the plan predicts; results.json
and the plan record the documents; a bad spec is refused before anything runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ringctl.workloads.train import reference_losses

STEPS = 3


def _launch(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    runs = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_CONF", "RINGCTL_MAX_RANKS_PER_NODE")}
    env["RINGCTL_RUNS"] = str(runs)
    done = subprocess.run(
        [sys.executable, "-m", "ringctl", "launch", "+topology=2node", "launcher=local",
         "wandb=disabled", *args],
        capture_output=True, text=True, env=env, timeout=400,
    )  # fmt: skip
    return done, runs


def _results(runs: Path) -> dict[str, Any]:
    [path] = runs.glob("*/*/results.json")
    return json.loads(path.read_text())


def test_training_on_packed_documents_equals_one_process_sdpa(tmp_path: Path) -> None:
    done, runs = _launch(
        tmp_path, "workload=train", f"workload.steps={STEPS}", "workload.checkpoint_every=10",
        "workload.layout=docs", "workload.seq_len=250", "workload.documents='lognormal:mean=40'",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    results = _results(runs)
    assert results["plan"]["world_size"] == 4 and results["plan"]["layout"] == "docs"
    documents = results["plan"]["documents"]
    assert documents["count"] > 3 and documents["layout_padding_tokens"] == 2  # 4 * 63 - 250
    assert sum(documents["visible_pairs_per_rank"]) > 0

    workload = OmegaConf.create(results["config"]["workload"])
    assert workload.documents == "lognormal:mean=40"
    expected = reference_losses(workload, STEPS)
    torch.testing.assert_close(
        torch.tensor(results["losses"], dtype=torch.float32), torch.tensor(expected, dtype=torch.float32)
    )
    # the documents matter: the same data with one causal sequence trains differently
    plain = reference_losses(OmegaConf.merge(workload, {"documents": None, "layout": "zigzag"}), 1)
    assert abs(plain[0] - expected[0]) > 1e-4


def test_attention_job_with_a_padded_tail_passes_its_check(tmp_path: Path) -> None:
    done, runs = _launch(
        tmp_path, "workload=attention", "workload.seq_len=480", "workload.check_seq_len=240",
        "workload.documents=[100,1,37,300]", "workload.iters=1", "workload.warmup=0",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    results = _results(runs)
    check = results["check"]
    assert check["passed"] and check["max_error"] <= 1e-9, check
    assert results["bytes"]["match"], results["bytes"]
    assert results["documents"]["count"] == 4 and results["documents"]["tokens"] == 438
    assert results["plan"]["documents"]["tokens"] == 438


def test_bad_documents_spec_is_refused_before_running(tmp_path: Path) -> None:
    done, runs = _launch(tmp_path, "workload=attention", "workload.documents=zipf")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "workload.documents='zipf' is invalid; allowed: none | lognormal" in done.stdout + done.stderr
    assert not list(runs.glob("*/*/results.json"))
