"""`workload=custom`: the user's `module:fn(cfg, ctx)` from the directory `ringctl launch` runs
in, its arguments, its return value in the summary and results.json, and a plan priced for
the shapes its ring_attention calls really had (or marked unknown when there were none).

Local launches (launcher=local: 2 virtual nodes x 2 ranks) with the module in tmp_path as
the working directory, run as a user runs them: the `ringctl` console script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

USER_MODULE = '''
import torch
import ringctl


def main(cfg, ctx):
    """Ring attention over a float64 sequence, checked against SDPA on the whole of it."""
    seq_len, heads, kv_heads, head_dim = int(cfg.workload.args.seq_len), 4, 2, 16
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, seq_len, h, head_dim, generator=gen, dtype=torch.float64) for h in (heads, kv_heads, kv_heads))
    shard = lambda t: ringctl.shard_sequence(t, ctx.position, ctx.world_size, layout=cfg.workload.layout)
    out = ctx.ring_attention(shard(q), shard(k), shard(v))
    out = ctx.ring_attention(shard(q), shard(k), shard(v))  # a second call of the same shape
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    error = float((out - shard(ref)).abs().max())
    return {"max_error": error, "tag": cfg.workload.args.tag, "rank": ctx.rank, "position": ctx.position}


def no_attention(cfg, ctx):
    """No ring_attention call through ctx; returns something JSON cannot hold."""
    return torch.arange(3)
'''


def ringctl(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    dropped = ("SLURM_CONF", "WANDB_API_KEY", "RINGCTL_MAX_RANKS_PER_NODE", "PYTHONPATH", "RINGCTL_CONFIG_DIR")
    environ = {k: v for k, v in os.environ.items() if k not in dropped}
    environ.update(RINGCTL_RUNS=str(cwd / "runs"), WANDB_SILENT="true")
    script = Path(sys.executable).with_name("ringctl")  # the console script: cwd is not on its sys.path
    return subprocess.run([str(script), *args], check=False, capture_output=True, text=True, env=environ, cwd=cwd, timeout=timeout)


def results_of(cwd: Path) -> dict[str, Any]:
    entry = json.loads((cwd / "runs" / "index.jsonl").read_text().splitlines()[-1])
    return json.loads((Path(entry["folder"]) / "results.json").read_text())


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("user")
    (cwd / "ringctl_user_model.py").write_text(USER_MODULE)
    return cwd


def test_module_in_the_launch_directory_runs_with_its_arguments(user_dir: Path) -> None:
    done = ringctl(
        # one_way pinned: auto may pick TokenRing for the config's MHA shape (8/8 heads), and
        # the K/V bytes below are pass-KV's
        ["launch", "+topology=2node", "launcher=local", "workload=custom", "workload.entry=ringctl_user_model:main",
         "+workload.args.seq_len=256", "+workload.args.tag=hello", "wandb=disabled", "topology.direction=one_way"],
        user_dir,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = results_of(user_dir)
    returned = results["custom"]
    assert returned["max_error"] < 1e-12 and returned["tag"] == "hello" and returned["rank"] == 0
    assert returned["position"] == results["plan"]["positions"][0]
    assert results["entry"]["file"] == str(user_dir / "ringctl_user_model.py")
    # the summary shows what the function returned, key by key
    assert "returned tag" in done.stdout and "hello" in done.stdout and "returned max_error" in done.stdout
    # the shapes the calls really had: seq_len 256 over 4 ranks, 4/2 heads x 16, float64 (not the config's sizes)
    assert results["attention_calls"] == [
        {"batch": 1, "seq_len": 256, "heads": 4, "kv_heads": 2, "head_dim": 16, "dtype": "float64", "causal": True, "calls": 2}
    ]
    assert "ring_attention calls" in done.stdout and "2 x B 1, S 256, heads 4/2 x 16, float64" in done.stdout
    plan = results["plan"]
    assert plan["predicted_for"]["seq_len"] == 256 and plan["block_tokens"] == 256 // 4
    kv_bytes = 2 * 1 * (256 // 4) * 2 * 16 * 8  # K and V of one shard, float64
    assert sum(plan["bytes_per_step"].values()) % kv_bytes == 0 and max(plan["bytes_per_step"].values()) > 0
    assert "predicted_forward_time_s" in plan


def test_without_ring_attention_calls_the_predictions_are_unknown(user_dir: Path) -> None:
    done = ringctl(
        # one rank per virtual node: what is checked does not depend on the ranks' count
        ["launch", "+topology=2node", "launcher=local", "launcher.local_ranks_per_node=1", "workload=custom",
         "workload.entry=ringctl_user_model:no_attention", "wandb=disabled"],
        user_dir,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = results_of(user_dir)
    assert results["custom"] == "tensor([0, 1, 2])"  # not JSON: its repr
    assert results["attention_calls"] == []
    plan = results["plan"]
    assert plan["predictions"].startswith("unknown")
    assert "predicted_forward_time_s" not in plan and plan["world_size"] == 2
    assert "the plan's predictions are unknown" in done.stdout


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("not_here:main", "module 'not_here' is neither in"),
        ("ringctl_user_model", "allowed: module:function"),
    ],
)
def test_a_missing_module_is_one_line_and_nothing_is_submitted(user_dir: Path, tmp_path: Path, entry: str, message: str) -> None:
    (tmp_path / "ringctl_user_model.py").write_text(USER_MODULE)
    done = ringctl(["launch", "workload=custom", f"workload.entry={entry}", "launcher=local"], tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "runs").exists()


def test_readme_example_as_written_and_its_metrics(tmp_path: Path) -> None:
    """The README's mymodel.py and launch line exactly as written (a shell in that directory;
    no SLURM here: local processes), then `ringctl metrics` on the job."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Your own code as a job: `workload=custom`", 1)[1]
    module = section.split("```python\n", 1)[1].split("```", 1)[0]
    command = section.split("```bash\n", 1)[1].split("```", 1)[0].strip()
    assert module.startswith("# mymodel.py") and "workload.entry=mymodel:main" in command
    (tmp_path / "mymodel.py").write_text(module)
    dropped = ("SLURM_CONF", "WANDB_API_KEY", "RINGCTL_MAX_RANKS_PER_NODE", "PYTHONPATH", "RINGCTL_CONFIG_DIR")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(RINGCTL_RUNS=str(tmp_path / "runs"), WANDB_SILENT="true",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", "-c", command], check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    results = results_of(tmp_path)
    assert results["custom"]["tokens_here"] == 4096 // 4
    assert "returned out_norm" in done.stdout and "3 x B 1, S 4096, heads 8/2 x 64, float32, causal" in done.stdout
    assert results["plan"]["predicted_for"]["seq_len"] == 4096
    job_id = json.loads((tmp_path / "runs" / "index.jsonl").read_text().splitlines()[-1])["job_id"]
    shown = ringctl(["metrics", job_id, "--json"], tmp_path)
    assert shown.returncode == 0, shown.stderr
    out = json.loads(shown.stdout)
    assert [row["_step"] for row in out["history"]] == [1, 2, 3]
    assert all(row["out_norm"] == pytest.approx(results["custom"]["out_norm"]) for row in out["history"])
    assert out["summary"]["custom/out_norm"] == pytest.approx(results["custom"]["out_norm"])
