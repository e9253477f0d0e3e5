"""Every `ringctl ...` command in the README's shell blocks, run as a user runs it: a bash
shell (the `ringctl` console script on PATH, HOME and the working directory a fresh
folder, so `~/ringctl-conf` and `./runs` are the test's own), W&B offline, no SLURM unless
the example is a SLURM one.

EXAMPLES accounts for each command the README's ```bash / ``` blocks hold (a new or changed
example fails `test_every_readme_command_is_accounted_for` until it is placed here):

- run here, locally (this machine has no SLURM controller for them: `launcher=auto` runs
  local processes, as the README says it does without a cluster);
- run against the dev cluster the suite starts (`slurm_cluster`): the sweep (one job array),
  `--preflight`, and the "To try SLURM on one machine" command;
- syntax only, with the reason: what needs a GPU partition or a real multi-node GPU cluster
  is composed, validated and rendered with `--dry-run` (the same overrides), nothing submitted;
- run as written by another test that extracts it from the README (named here, and checked
  to still do so): the calibrate pair (about two minutes) and the custom-workload example;
- synopsis lines (`ringctl status [JOB|FOLDER] ...`) are run in each of their forms.

Every command runs exactly as the README writes it. The first job, `ringctl launch
+topology=2node`, runs once per session with a (fake) W&B key in its environment, and
tests/test_launch_local.py checks that same job further.
One job per distinct command; about two to three minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SHELL_LANGS = ("", "bash", "sh", "shell", "console")


@dataclass(frozen=True)
class Example:
    how: str  # local | slurm | syntax | elsewhere | synopsis
    why: str = ""


LOCAL, SLURM = Example("local"), Example("slurm")
GPU_PARTITION = "needs a partition named `gpu` (a GPU cluster); the dev cluster has one CPU partition"
CALIBRATE = Example("elsewhere", "tests/test_calibrate.py::test_readme_example_runs_locally_writes_the_topology_and_logs_the_figures")
CUSTOM = Example("elsewhere", "tests/test_custom_workload.py::test_readme_example_as_written_and_its_metrics")

INFER_PLAN_16 = (
    "ringctl plan +topology=16node workload=infer workload.prompt=131072 workload.turns=[1024] workload.heads=32 "
    "workload.kv_heads=8 workload.head_dim=128 workload.dtype=bfloat16 workload.batch=1 --json"
)
INFER_CHECKPOINT = (
    "ringctl launch +topology=2node workload=infer workload.checkpoint=$(ls runs/*/*/checkpoints/step_000010.pt "
    "| tail -1) workload.seq_len=256 workload.heads=4 workload.prompt=128"
)

EXAMPLES: dict[str, Example] = {
    "ringctl plan +topology=emulated2node workload=infer": LOCAL,
    INFER_PLAN_16: LOCAL,
    "ringctl launch +topology=2node workload=infer": LOCAL,
    "ringctl launch +topology=emulated2node workload=infer": LOCAL,
    INFER_CHECKPOINT: LOCAL,
    "ringctl plan +topology=2node": LOCAL,
    "ringctl launch +topology=2node": LOCAL,
    "ringctl launch -m workload.seq_len=1024,2048 topology.ring=flat,hierarchical": SLURM,
    "ringctl status | logs JOB | cancel JOB": Example("synopsis"),
    "ringctl plan +topology=16node topology.distribution=cyclic --json": LOCAL,
    "ringctl plan +topology=4node topology.ring=flat workload.seq_len=262144 workload.dtype=bfloat16 --png ring.png": LOCAL,
    "ringctl launch +topology=2node launcher=slurm launcher.partition=gpu launcher.time_min=30": Example("syntax", GPU_PARTITION),
    "ringctl launch +topology=2node workload=train workload.steps=10": LOCAL,
    "ringctl launch +topology=2node workload=custom workload.entry=mypkg.mod:main": LOCAL,
    "ringctl launch +topology=2node wait=false": LOCAL,
    "ringctl launch topology.memory_per_rank_GB=0.01": LOCAL,
    "ringctl plan +topology=emulated3node_mesh workload.seq_len=6144": LOCAL,
    "ringctl plan +topology=emulated3node_mesh --json": LOCAL,
    "ringctl plan +topology=emulated3node_mesh topology.direction=tokenring workload.kv_heads=8": LOCAL,
    "ringctl launch +topology=2node workload=train workload.steps=10 workload.layout=docs \"workload.documents='lognormal:mean=64'\"": LOCAL,
    "ringctl launch +topology=2node workload=attention workload.documents=[100,1,37,300]": LOCAL,
    "ringctl plan +topology=2node workload.layout=docs \"workload.documents='lognormal:mean=2048'\" --json": LOCAL,
    "ringctl launch +topology=2node --cfg job": LOCAL,
    "ringctl launch +topology=2node launcher=slurm --dry-run": LOCAL,
    "ringctl launch +topology=2node launcher=slurm --preflight": SLURM,
    "ringctl status [JOB|FOLDER] ringctl logs JOB [--rank R] [--follow] ringctl cancel JOB": Example("synopsis"),
    "ringctl metrics JOB": LOCAL,
    "ringctl metrics JOB --json": LOCAL,
    "ringctl plan --config-dir ~/ringctl-conf +topology=a100x4": LOCAL,
    "ringctl launch --config-dir ~/ringctl-conf +topology=a100x4 launcher=slurm launcher.partition=gpu": Example(
        "syntax", GPU_PARTITION + "; and 4 nodes x 4 A100s"
    ),
    "export RINGCTL_CONFIG_DIR=~/ringctl-conf; ringctl launch --help": LOCAL,
    "ringctl calibrate +topology=2node --out ~/ringctl-conf/topology/mycluster.yaml": CALIBRATE,
    "ringctl plan --config-dir ~/ringctl-conf +topology=mycluster": CALIBRATE,
    "ringctl launch +topology=2node workload=custom workload.entry=mymodel:main +workload.args.seq_len=4096 +workload.args.steps=3": CUSTOM,
}
#: the README's "To try SLURM on one machine" command (inline, not in a block)
TRY_SLURM = "RINGCTL_MAX_RANKS_PER_NODE=2 ringctl launch +topology=2node launcher=slurm"

MYPKG_MOD = '''
import torch
import ringctl


def main(cfg, ctx):
    """One ring attention call over a small sequence; returns what the README's table shows."""
    torch.manual_seed(0)
    q = torch.randn(1, 256, 8, 64)
    k, v = (torch.randn(1, 256, 2, 64) for _ in range(2))
    shard = lambda t: ringctl.shard_sequence(t, ctx.position, ctx.world_size, layout=cfg.workload.layout)
    out = ctx.ring_attention(shard(q), shard(k), shard(v))
    return {"tokens_here": out.shape[1], "world_size": ctx.world_size}
'''


def shell_blocks(text: str) -> list[tuple[str, str]]:
    """(info string, body) of every fenced block at the start of a line (no indentation:
    the indented ones are output shown inside a list)."""
    return [(m.group(1).strip(), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)]


def readme_commands() -> list[str]:
    """Each line of a shell block that runs `ringctl`, its comment cut, blanks collapsed."""
    found: list[str] = []
    for lang, body in shell_blocks(README.read_text()):
        if lang not in SHELL_LANGS:
            continue
        for line in body.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if re.search(r"(^|;\s*)([A-Z_]+=\S*\s+)*ringctl\s", line):
                found.append(" ".join(line.split()))
    return found


def readme_yaml(name: str) -> tuple[str, str]:
    """The README's YAML block whose first line is `# <path>` ending in `name`."""
    for lang, body in shell_blocks(README.read_text()):
        first = body.splitlines()[0]
        if lang == "yaml" and first.startswith("# ") and first.endswith(name):
            return first[2:].strip(), body
    raise AssertionError(f"no yaml block for {name} in README.md")


class Shell:
    """bash in a user's folder: HOME and cwd there, the venv's console scripts on PATH."""

    def __init__(self, home: Path, cluster_env: dict[str, str] | None = None) -> None:
        self.home = home
        dropped = ("SLURM_CONF", "WANDB_API_KEY", "RINGCTL_MAX_RANKS_PER_NODE", "RINGCTL_CONFIG_DIR", "RINGCTL_RUNS", "PYTHONPATH")
        self.env = {k: v for k, v in os.environ.items() if k not in dropped}
        self.env.update(cluster_env or {})
        self.env.update(HOME=str(home), WANDB_SILENT="true", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")

    def run(self, command: str, *appended: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
        """A README command as written (checked to be one), `appended` after it, `env` added
        to the shell's environment."""
        assert command in EXAMPLES or command == TRY_SLURM or _filled_in(command), command
        return self.sh(" ".join([command, *appended]), timeout=timeout, **env)

    def sh(self, line: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", line], capture_output=True, text=True, env={**self.env, **env}, cwd=self.home, timeout=timeout)

    def index(self) -> list[dict[str, Any]]:
        path = self.home / "runs" / "index.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def last_job(self, **match: Any) -> dict[str, Any]:
        return [e for e in self.index() if all(e.get(k) == v for k, v in match.items())][-1]


def _filled_in(line: str) -> bool:
    """A README command with its JOB (or FOLDER) filled in: `ringctl metrics JOB [--json]`,
    and the synopsis' `status [JOB|FOLDER]`, `logs JOB [--rank R] [--follow]`, `cancel JOB`."""
    templates = [re.escape(c).replace("JOB", r"\S+") for c in EXAMPLES if "JOB" in c and EXAMPLES[c].how != "synopsis"]
    templates.append(r"ringctl (status( \S+)?|logs \S+( --rank \d+| --follow)?|cancel \S+)")
    return any(re.fullmatch(t, line) for t in templates)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def results_of(entry: dict[str, Any]) -> dict[str, Any]:
    return json.loads((Path(entry["folder"]) / "results.json").read_text())


# ---- the catalogue is the README ------------------------------------------------------------


def test_every_readme_command_is_accounted_for() -> None:
    commands = readme_commands()
    assert set(commands) == set(EXAMPLES), (
        f"in README, not here: {sorted(set(commands) - set(EXAMPLES))}; here, not in README: {sorted(set(EXAMPLES) - set(commands))}"
    )
    assert TRY_SLURM in " ".join(README.read_text().split())
    # `make launch` is the README's first command too
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^launch:.*\n\t\$\(VENV\)/bin/ringctl launch \+topology=2node$", makefile, re.M)


def test_examples_run_elsewhere_still_take_them_from_the_readme() -> None:
    for command, example in EXAMPLES.items():
        if example.how != "elsewhere":
            continue
        path, name = example.why.split("::")
        source = (REPO / path).read_text()
        assert f"def {name}(" in source, example.why
        body = source.split(f"def {name}(", 1)[1].split("\ndef ", 1)[0] + source
        assert "README.md" in body, f"{example.why} no longer reads the README ({command})"


# ---- run here: planning, composing, local jobs ----------------------------------------------


#: a fake W&B key in the environment of the README's first job (test_launch_local checks
#: that it is written nowhere)
SECRET = "ringctl-test-key-0123456789abcdef0123456789abcdef"
_SESSION: dict[str, Any] = {}


def readme_user(tmp_path_factory: pytest.TempPathFactory) -> Shell:
    """The README's user, one per session: test_launch_local checks the same first job."""
    if "user" not in _SESSION:
        _SESSION["user"] = Shell(tmp_path_factory.mktemp("readme-user"))
    user: Shell = _SESSION["user"]
    return user


def default_launch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`ringctl launch +topology=2node`: the README's first job (and `make launch`'s), run
    once per session (here and in test_launch_local, which checks it further), with a W&B
    key in the environment as a user may have one."""
    if "default" not in _SESSION:
        user = readme_user(tmp_path_factory)
        done = user.run("ringctl launch +topology=2node", WANDB_API_KEY=SECRET)
        out = ok(done)
        entry = user.last_job(overrides=["+topology=2node"])
        _SESSION["default"] = {"entry": entry, "stdout": out, "results": results_of(entry), "home": user.home}
    job: dict[str, Any] = _SESSION["default"]
    return job


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Shell:
    return readme_user(tmp_path_factory)


def test_plan_examples(local: Shell) -> None:
    out = ok(local.run("ringctl plan +topology=2node"))
    assert "RingPlan: hierarchical ring" in out and "rank-order ring" in out
    assert (local.home / "ringplan-2node.png").stat().st_size > 0  # "rich table + ringplan-2node.png"
    plan = json.loads(ok(local.run("ringctl plan +topology=16node topology.distribution=cyclic --json")))
    assert (plan["nodes"], plan["world_size"]) == (16, 128)
    # cyclic numbering: the rank-order ring crosses nodes at every hop, the plan once per node
    assert plan["baseline_cross_node_hops"] == 128 and plan["cross_node_hops"] == 16
    out = ok(local.run(
        "ringctl plan +topology=4node topology.ring=flat workload.seq_len=262144 workload.dtype=bfloat16 --png ring.png"
    ))
    assert "RingPlan: flat ring" in out and "seq_len 262144" in out and "bfloat16" in out
    assert (local.home / "ring.png").stat().st_size > 0


def test_memory_refusal_example(local: Shell) -> None:
    """The launch the README shows refused: exit 2, the line it quotes (the longest seq_len
    that fits depends on the ranks' threads: any number), nothing submitted."""
    command = "ringctl launch topology.memory_per_rank_GB=0.01"
    jobs_before = len(local.index())
    done = local.run(command)
    assert done.returncode == 2, done.stdout + done.stderr
    shown = " ".join(line.lstrip("# ") for line in README.read_text().split(command, 1)[1].splitlines()[1:3])
    shown = shown.split(" (predicted peak")[0]
    pattern = re.escape(shown).replace(r"at\ most\ 1184", r"at\ most\ \d+")
    assert r"\d+" in pattern, shown  # the README still quotes the figure this test generalises
    assert re.search(pattern, " ".join(done.stderr.split())), (shown, done.stderr)
    assert len(local.index()) == jobs_before


def test_packed_documents_examples(local: Shell) -> None:
    """The three packed-document lines: a train job on the docs layout, an attention job
    checked against SDPA with the block-diagonal mask, the plan's per-rank work."""
    train = "ringctl launch +topology=2node workload=train workload.steps=10 workload.layout=docs \"workload.documents='lognormal:mean=64'\""
    ok(local.run(train))
    results = results_of(local.index()[-1])  # the job just launched
    assert len(results["losses"]) == 10 and "error" not in results
    attention = "ringctl launch +topology=2node workload=attention workload.documents=[100,1,37,300]"
    ok(local.run(attention))
    results = results_of(local.index()[-1])
    assert "documents" in results and "error" not in results
    plan = json.loads(ok(local.run(
        "ringctl plan +topology=2node workload.layout=docs \"workload.documents='lognormal:mean=2048'\" --json"
    )))
    assert plan["documents"]["imbalance"] <= 1.05


def test_bidirectional_plan_examples(local: Shell) -> None:
    """On the emulated mesh the planner prices both directions and picks bidirectional; the
    table shows the two side by side, the JSON the bytes per link class and direction."""
    out = ok(local.run("ringctl plan +topology=emulated3node_mesh workload.seq_len=6144"))
    assert "bidirectional" in out and "one_way" in out.replace("one-way", "one_way"), out
    plan = json.loads(ok(local.run("ringctl plan +topology=emulated3node_mesh --json")))
    assert plan["direction"] == "bidirectional", plan["direction"]
    assert plan["bytes_by_direction"], plan
    # TokenRing, forced, priced beside the other two
    out = ok(local.run("ringctl plan +topology=emulated3node_mesh topology.direction=tokenring workload.kv_heads=8"))
    assert "tokenring <- plan" in out and "(fastest)" in out, out


def test_composing_without_submitting(local: Shell) -> None:
    jobs_before = len(local.index())  # the module's user folder holds other tests' jobs
    cfg = yaml.safe_load(ok(local.run("ringctl launch +topology=2node --cfg job")))
    assert cfg["topology"]["name"] == "2node" and cfg["launcher"]["kind"] == "auto"
    out = ok(local.run("ringctl launch +topology=2node launcher=slurm --dry-run"))
    assert "nothing submitted" in out and "#SBATCH --nodes=2" in out and "#SBATCH --requeue" in out
    # syntax only (GPU_PARTITION): the same overrides compose, validate and render
    out = ok(local.run("ringctl launch +topology=2node launcher=slurm launcher.partition=gpu launcher.time_min=30", "--dry-run"))
    assert "#SBATCH --partition=gpu" in out and "#SBATCH --time=30" in out
    assert len(local.index()) == jobs_before  # nothing submitted


def test_your_own_cluster_config_dir(local: Shell) -> None:
    where, body = readme_yaml("a100x4.yaml")
    path = Path(where.replace("~", str(local.home), 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    out = ok(local.run("ringctl plan --config-dir ~/ringctl-conf +topology=a100x4"))
    assert "topology a100x4: 4 nodes x 4 ranks = 16" in out, out
    # syntax only: a GPU partition and 4 nodes x 4 GPUs
    out = ok(local.run(
        "ringctl launch --config-dir ~/ringctl-conf +topology=a100x4 launcher=slurm launcher.partition=gpu", "--dry-run"
    ))
    assert "#SBATCH --nodes=4" in out and "#SBATCH --partition=gpu" in out and "#SBATCH --ntasks-per-node=4" in out
    out = ok(local.run("export RINGCTL_CONFIG_DIR=~/ringctl-conf; ringctl launch --help"))
    [groups] = [line for line in out.splitlines() if line.startswith("topology: ")]  # the groups list
    assert "a100x4" in groups and "2node" in groups, groups  # "lists a100x4 beside 2node"


@pytest.fixture(scope="module")
def default_job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return default_launch(tmp_path_factory)


def test_default_launch_runs_locally_as_the_readme_says(local: Shell, default_job: dict[str, Any]) -> None:
    entry, results, out = default_job["entry"], default_job["results"], default_job["stdout"]
    folder = Path(entry["folder"])
    # "2 virtual nodes x 2 CPU ranks, a real 2-node plan"; job folder runs/<time>-<name>/<job id>/
    assert entry["kind"] == "local" and results["virtual_nodes"] is True
    assert results["plan"]["nodes"] == 2 and results["plan"]["world_size"] == 4
    assert folder.name == entry["job_id"] and folder.parent.parent == local.home / "runs"
    assert re.fullmatch(r"\d{8}-\d{6}-ringctl", folder.parent.name)
    # results.json: config, plan with predictions, times, bytes measured = predicted, float64 check, threads
    for key in ("config", "plan", "times", "bytes", "check", "threads"):
        assert key in results, key
    assert results["check"]["passed"] and results["check"]["max_error"] <= 1e-9
    for phase in ("forward", "backward"):
        for link in ("intra", "inter"):
            assert results["bytes"][phase][link]["measured"] == results["bytes"][phase][link]["predicted"]
    assert (folder / "plan.png").exists() and list(folder.glob(f"{entry['job_id']}_0_log.out"))
    assert Path(results["wandb"]["run_dir"]).is_dir() and "wandb sync " in out  # W&B offline, its folder in the job's
    assert f"results: {folder / 'results.json'}" in out


def test_job_control_synopsis(local: Shell, default_job: dict[str, Any]) -> None:
    """`ringctl status [JOB|FOLDER]`, `ringctl logs JOB [--rank R] [--follow]` on the ended
    default job (cancel: see the wait=false test)."""
    job, folder = default_job["entry"]["job_id"], default_job["entry"]["folder"]
    for spec in (job, folder):
        out = ok(local.run(f"ringctl status {spec}"))
        assert f"job {job} (local): done (COMPLETED)" in out and "exactness" in out, out
    listed = ok(local.run("ringctl status"))  # the synopsis' bare `ringctl status`
    assert job in listed
    log = local.run(f"ringctl logs {job} --rank 1")
    assert log.returncode == 0 and "global_rank=1" in log.stdout + log.stderr
    follow = local.run(f"ringctl logs {job} --follow", timeout=60)  # the job has ended: prints and returns
    assert follow.returncode == 0 and "global_rank=0" in follow.stdout + follow.stderr


def test_wait_false_returns_at_once_then_cancel(local: Shell) -> None:
    out = ok(local.run("ringctl launch +topology=2node wait=false"))
    entry = local.last_job(overrides=["+topology=2node", "wait=false"])
    job = entry["job_id"]
    assert f"submitted job {job}" in out and entry["folder"] in out  # "print the job id and folder"
    # returned while the job runs: a 4-rank job takes far longer than its submission
    assert "(local): running" in ok(local.run(f"ringctl status {job}"))
    cancelled = ok(local.run(f"ringctl cancel {job}", timeout=120))
    assert f"cancelled job {job} (local): CANCELLED" in cancelled, cancelled
    assert "(local): cancelled (CANCELLED)" in ok(local.run(f"ringctl status {job}"))
    again = local.run(f"ringctl cancel {job}")  # "cancelling a finished job says so and exits 1"
    assert again.returncode == 1 and "nothing to cancel" in again.stderr, again.stderr


def test_train_example_and_its_metrics(local: Shell) -> None:
    """The train line as written: 10 steps, one checkpoint."""
    command = "ringctl launch +topology=2node workload=train workload.steps=10"
    out = ok(local.run(command))
    entry = local.last_job(overrides=command.split()[2:])
    results = results_of(entry)
    losses = results["losses"]
    assert len(losses) == 10 and losses[-1] < losses[0]
    assert f"{losses[0]:.4f} -> {losses[-1]:.4f} over 10 steps" in out
    assert [p.name for p in (Path(entry["folder"]) / "checkpoints").glob("step_*.pt")] == ["step_000010.pt"]
    # `ringctl metrics JOB` and `--json`: the W&B run read back, one row per step
    table = ok(local.run(f"ringctl metrics {entry['job_id']}"))
    assert "history (10 steps)" in table and "train/loss" in table
    shown = json.loads(ok(local.run(f"ringctl metrics {entry['job_id']} --json")))
    assert set(shown) >= {"history", "summary", "run_file"}
    assert [row["train/loss"] for row in shown["history"]] == pytest.approx(losses, abs=0, rel=1e-12)
    assert shown["summary"]["train/loss"] == pytest.approx(losses[-1], rel=1e-12)


def test_inference_examples(local: Shell) -> None:
    """The inference section: both strategies priced with the crossover it quotes, sessions
    whose tokens equal one process's with auto's choice per topology, a train checkpoint served."""
    out = ok(local.run("ringctl plan +topology=emulated2node workload=infer"))
    assert "pass_q <- auto" in out and "inference crossover: T/(T+P) = 0.203" in out, out
    assert (local.home / "ringplan-emulated2node.png").stat().st_size > 0
    info = json.loads(ok(local.run(INFER_PLAN_16)))["inference"]
    assert info["choice"] == "pass_q" and round(info["crossover"], 3) == 0.146
    modes = info["modes"]
    assert (round(modes["pass_q"]["predicted_s"] * 1e3, 2), round(modes["pass_kv"]["predicted_s"] * 1e3, 2)) == (0.32, 1.42)
    for command, chosen in (
        ("ringctl launch +topology=2node workload=infer", {"pass_kv": 32}),
        ("ringctl launch +topology=emulated2node workload=infer", {"pass_kv": 1, "pass_q": 31}),
    ):
        out = ok(local.run(command))
        results = results_of(local.last_job(overrides=command.split()[2:]))
        assert "identical" in out and results["tokens_match_reference"] is True and results["bytes"]["match"] is True
        assert {m: results["strategies"].count(m) for m in chosen} == chosen, results["strategies"]
        assert results["times"]["time_to_first_token_s"] > 0 and results["times"]["decode_per_token_s"] > 0
        counts = results["cache"]["tokens_per_rank"]
        assert results["prefill_tokens_per_s"] > 0 and max(counts) - min(counts) <= 1
    # the README's train line ran just before (test_train_example_and_its_metrics); run alone, run it here
    if not list(local.home.glob("runs/*/*/checkpoints/step_000010.pt")):
        ok(local.run("ringctl launch +topology=2node workload=train workload.steps=10"))
    ok(local.run(INFER_CHECKPOINT))
    results = results_of(local.index()[-1])
    assert results["config"]["workload"]["checkpoint"].endswith("checkpoints/step_000010.pt")
    assert results["tokens_match_reference"] is True
    # the trained weights, not the seed's: the one-process run from the checkpoint generates
    # the job's tokens, and its logits are not those of the model the seed builds
    from omegaconf import OmegaConf

    from ringctl.workloads.infer import reference_generate

    served = dict(results["config"]["workload"])
    served["checkpoint"] = str(local.home / served["checkpoint"])  # as written: relative to the launch directory
    tokens, logits = reference_generate(OmegaConf.create(served))
    assert results["generated"] == tokens
    _, seeded = reference_generate(OmegaConf.create({**served, "checkpoint": None}))
    assert max(float((a - b).abs().max()) for a, b in zip(logits, seeded, strict=True)) > 1e-3


def test_custom_workload_line(local: Shell) -> None:
    """`workload.entry=mypkg.mod:main` ("your fn(cfg, ctx)"): a package in the launch
    directory, found there as the README says."""
    (local.home / "mypkg").mkdir(exist_ok=True)
    (local.home / "mypkg" / "__init__.py").write_text("")
    (local.home / "mypkg" / "mod.py").write_text(MYPKG_MOD)
    out = ok(local.run("ringctl launch +topology=2node workload=custom workload.entry=mypkg.mod:main"))
    results = results_of(local.last_job(overrides=["+topology=2node", "workload=custom", "workload.entry=mypkg.mod:main"]))
    assert results["custom"] == {"tokens_here": 64, "world_size": 4}
    assert "returned tokens_here" in out and "1 x B 1, S 256, heads 8/2 x 64, float32, causal" in out


# ---- against the dev cluster ----------------------------------------------------------------


@pytest.fixture(scope="module")
def on_slurm(slurm_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Shell:
    return Shell(tmp_path_factory.mktemp("readme-slurm-user"), dict(slurm_cluster.env))


def test_slurm_examples(on_slurm: Shell) -> None:
    # the sweep: every point validated, then ONE job array; the command returns at once
    sweep = "ringctl launch -m workload.seq_len=1024,2048 topology.ring=flat,hierarchical"
    out = ok(on_slurm.run(sweep))
    points = [e for e in on_slurm.index() if e["name"] == "sweep-ringctl"]
    assert len(points) == 4 and len({e["job_id"].split("_")[0] for e in points}) == 1, points
    assert f"array {points[0]['job_id'].split('_')[0]} (slurm)" in out, out
    # preflight: the script, plus whether SLURM would take it and when; nothing queued
    out = ok(on_slurm.run("ringctl launch +topology=2node launcher=slurm --preflight"))
    assert "# preflight: accepted: would start at" in out and "#SBATCH --nodes=2" in out, out
    assert len(on_slurm.index()) == 4
    # "To try SLURM on one machine": 2 SLURM nodes x 2 tasks
    ok(on_slurm.run(TRY_SLURM))
    results = results_of(on_slurm.last_job(overrides=["+topology=2node", "launcher=slurm"]))
    names = results["node_names"]
    assert len(names) == 4 and len(set(names)) == 2 and results["virtual_nodes"] is False
    assert results["check"]["passed"]
    # the sweep's points ended well (they ran meanwhile)
    ids = [e["job_id"] for e in points]

    def states() -> list[str]:
        """The state column of `ringctl status ID...` for each point."""
        table = ok(on_slurm.sh("ringctl status " + " ".join(ids)))
        cells = [line.split("│") for line in table.splitlines() if line.startswith("│")]
        rows = {c[1].strip(): c[4].strip() for c in cells if len(c) > 4 and c[1].strip() in ids}
        return [rows.get(i, "") for i in ids]

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and states().count("COMPLETED") < 4 and "FAILED" not in states():
        time.sleep(2)
    assert states() == ["COMPLETED"] * 4, ok(on_slurm.sh("ringctl status " + " ".join(ids)))
    seen = {(r["config"]["workload"]["seq_len"], r["plan"]["ring"]) for r in map(results_of, points)}
    assert seen == {(s, ring) for s in (1024, 2048) for ring in ("flat", "hierarchical")}
