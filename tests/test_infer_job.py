"""`ringctl launch workload=infer`: a multi-turn session with a KV cache sharded over the ring,
through the whole stack (Hydra, submitit, local processes or a real SLURM job, gloo on 2
virtual or SLURM nodes x 2 ranks under the hierarchical plan, W&B offline).

Checked: the job's generated tokens equal the same model generating in ONE process with
SDPA over the whole sequence and no cache (the job compares and records
tokens_match_reference; the test also regenerates them here); every turn's strategy is the
forced one or the cost model's; bytes sent per link class equal the planner's prediction on
every rank; the cache stays balanced; time to first token, prefill tokens/s and decode
latency are recorded, in results.json and in the W&B run's history; bad settings are
refused before submission. (The README's inference lines, auto's choice and a served train
checkpoint among them, run in tests/test_readme.py.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jobctl import Cli, wait_for
from omegaconf import OmegaConf

import wandb_records
from ringctl.workloads.infer import reference_generate

#: small and fast: 2 nodes x 2 ranks, float64, a 120-token prompt, two chat turns, 3 tokens each
INFER = [
    "+topology=2node", "workload=infer", "workload.seq_len=256", "workload.prompt=120",
    "workload.turns=[16,3]", "workload.decode=3", "workload.heads=4", "workload.kv_heads=1",
    "workload.head_dim=8", "wandb=offline",
]


def _results(cli: Cli, job_id: str) -> tuple[dict[str, Any], Path]:
    [path] = cli.runs.glob(f"*/{job_id}/results.json")
    return json.loads(path.read_text()), path.parent


def _check_session(results: dict[str, Any], folder: Path, forced: str | None) -> None:
    assert results["tokens_match_reference"] is True, results.get("reference")
    assert results["reference"]["max_logit_error"] < 1e-10
    w = OmegaConf.create(results["config"]["workload"])
    want, _ = reference_generate(w)  # independently, in this process
    assert results["generated"] == want
    turns = results["turns"]
    # the prompt, 2 decode steps after it, then each chat turn (with the carried token) and 2 decodes
    assert [t["kind"] for t in turns] == ["prompt", "decode", "decode", "turn", "decode", "decode", "turn", "decode", "decode"]
    assert [t["new_tokens"] for t in turns] == [120, 1, 1, 17, 1, 1, 4, 1, 1]
    for t in turns:
        assert t["strategy"] == (forced or min(t["predicted_attention_s"], key=t["predicted_attention_s"].get))
        assert t["measured_attention_s"] > 0 and set(t["predicted_attention_s"]) == {"pass_kv", "pass_q"}
    forward = results["bytes"]["forward"]
    assert results["bytes"]["match"] is True and forward["inter"]["measured_total"] > 0
    for link in ("intra", "inter"):
        assert forward[link]["measured"] == forward[link]["predicted"], link
    assert results["plan"]["ring"] == "hierarchical" and len(results["node_names"]) == 4
    cache = results["cache"]
    assert cache["tokens"] == 120 + 19 + 3 * 3 - 1 and max(cache["tokens_per_rank"]) - min(cache["tokens_per_rank"]) <= 1
    times = results["times"]
    assert 0 < times["time_to_first_token_s"] <= times["session_s"] and times["decode_per_token_s"] > 0
    assert results["prefill_tokens_per_s"] > 0
    # W&B: one history row per turn, with the strategy and both times
    [run_file] = (folder / "wandb").glob("offline-run-*/run-*.wandb")
    rows = [r for r in wandb_records.history(run_file) if "infer/new_tokens" in r]
    assert [r["infer/new_tokens"] for r in rows] == [t["new_tokens"] for t in turns]
    assert [r["infer/pass_q"] for r in rows] == [int(t["strategy"] == "pass_q") for t in turns]


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Cli:
    return Cli(tmp_path_factory.mktemp("infer-local"))


@pytest.mark.parametrize("mode", ["pass_q"])  # auto: tests/test_readme.py::test_inference_examples
def test_local_session_generates_the_one_process_tokens(local: Cli, mode: str) -> None:
    done = local("launch", *INFER, "launcher=local", f"workload.mode={mode}", timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "generated tokens vs one process" in done.stdout and "identical" in done.stdout, done.stdout
    job_id = done.stdout.split("submitted job ")[1].split()[0]
    results, folder = _results(local, job_id)
    _check_session(results, folder, None if mode == "auto" else mode)


def test_session_runs_as_a_real_slurm_job(slurm_cluster: Any, tmp_path: Path) -> None:
    cli = Cli(tmp_path, slurm_cluster.env)
    done = cli("launch", *INFER, "launcher=slurm", "workload.mode=pass_kv", timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = done.stdout.split("submitted job ")[1].split()[0]
    assert "(slurm)" in done.stdout
    results, folder = _results(cli, job_id)
    _check_session(results, folder, "pass_kv")
    assert sorted(set(results["node_names"])) == sorted(slurm_cluster.node_names)
    # the launch reports the end from rank 0's result file; sacct records it a moment later
    wait_for(lambda: cli.sacct(job_id) == "COMPLETED", 60, "the job's end in sacct")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("workload.mode=fast", "workload.mode='fast' is invalid; allowed: auto | pass_kv | pass_q"),
        ("workload.turns=[4,0]", "workload.turns[1]=0 is invalid; allowed: an integer >= 1"),
        ("workload.layout=striped", "workload.layout='striped' is invalid; allowed: zigzag | contiguous"),
        ("workload.seq_len=128", "workload.seq_len=128 is invalid; allowed: >= 147"),
        ("workload.checkpoint=/nonexistent.pt", "workload.checkpoint='/nonexistent.pt' is invalid"),
    ],
)
def test_bad_settings_are_refused_before_submission(local: Cli, override: str, message: str) -> None:
    before = local.index()
    done = local("launch", *INFER, "launcher=local", override)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert local.index() == before  # nothing submitted
