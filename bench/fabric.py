"""Measured topology gains on an emulated multi-node fabric: the whole set in one command.

    python bench/fabric.py                  # every scenario on the dev cluster (root; ~10 min)
    python bench/fabric.py --only rails     # one scenario
    python bench/fabric.py --local          # dry run: local processes, no fabric, no SLURM

For each scenario it brings up a SLURM dev cluster with the emulated fabric
(`slurm/dev-cluster up --fabric inter=...,nics=...`, its own --state-dir and node prefix),
calibrates the cost model there (bench/calibrate.py under srun: compute rate per rank with
all ranks at once, intra-node loopback rate; written into the scenario's topology YAML),
runs every point as a real job through `ringctl launch` (results.json and an offline W&B
run in each job folder), and tears the cluster down, even on failure. Then it prints the
table (measured vs predicted forward time, ratios of plans measured side by side), writes
the sweep plot and one W&B offline run with the table and the plot.

Scenarios (see conf/topology/emulated*.yaml):
1. `cyclic`: 2 nodes x 2 ranks, nics=1, SLURM --distribution=cyclic: topology-aware flat
   ring (order=node) vs the rank-order ring (order=rank). Goal: <= 0.6x.
2. `rails`: 2 nodes x 2 ranks, nics=2 (one NIC per rank), inter ~10x below intra:
   hierarchical vs topology-aware flat, swept over sequence length (3.). Goal: <= 0.6x
   where the flat ring is link-bound.
3. `cyclic3`: scenario 1 on 3 nodes (6 ranks).

Compared quantity: the forward time of one ring attention call (the attention workload's
`fwd_s`: slowest rank per iteration; the least over the iterations, since the 2 cores are
shared with other work and the least is the least disturbed) vs the plan's
`predicted_forward_time_s` (W-1 ring steps of max(compute, transfer) plus the last block;
see ringctl/plan.py `estimate`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEV_CLUSTER = REPO / "slurm" / "dev-cluster"
TOPOLOGY_DIR = REPO / "conf" / "topology"
PYTHON = sys.executable
RINGCTL = [PYTHON, "-m", "ringctl"]
# every rank single-threaded: 4-6 ranks already share 2 cores (calibration does the same)
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Workload:
    """Attention sizes of every point (seq_len varies): float32, causal, zigzag, GQA 8/2."""

    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    batch: int = 1
    warmup: int = 1
    iters: int = 5

    def overrides(self, seq_len: int, world_size: int) -> list[str]:
        # the float64 exactness check runs at ~256 tokens, split evenly by zigzag (2W chunks)
        check = 2 * world_size * max(1, 256 // (2 * world_size))
        return [
            f"workload.seq_len={seq_len}", f"workload.check_seq_len={check}", f"workload.heads={self.heads}", f"workload.kv_heads={self.kv_heads}",
            f"workload.head_dim={self.head_dim}", f"workload.batch={self.batch}", "workload.dtype=float32",
            "workload.layout=zigzag", "workload.causal=true", f"workload.warmup={self.warmup}",
            f"workload.iters={self.iters}",
        ]


@dataclass(frozen=True)
class Plan:
    """One line of a comparison: topology.ring and topology.order."""

    ring: str
    order: str = "node"

    @property
    def label(self) -> str:
        if self.ring == "flat":
            return "flat rank-order" if self.order == "rank" else "flat topology-aware"
        return self.ring


@dataclass(frozen=True)
class Scenario:
    """One fabric (one cluster up/down), its topology config, the plans compared and sizes.
    `plans[1]` is compared with `plans[0]` (the reference) at every sequence length."""

    name: str
    topology: str
    nodes: int
    ranks_per_node: int
    fabric: str
    distribution: str
    plans: tuple[Plan, ...]
    seq_lens: tuple[int, ...]
    goal: str
    calibrate_seq_len: int = 8192  # compute-bound for the hierarchical ring: see bench/calibrate.py

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


SCENARIOS = (
    Scenario(
        "cyclic", "emulated2node", 2, 2, "inter=100mbit,nics=1", "cyclic",
        (Plan("flat", "rank"), Plan("flat", "node")), (1024, 2048, 4096),
        "1. nics=1, cyclic placement: topology-aware flat / rank-order flat <= 0.6",
    ),
    Scenario(
        "rails", "emulated2node_rails", 2, 2, "inter=100mbit,nics=2", "block",
        (Plan("flat"), Plan("hierarchical")), (1024, 2048, 4096, 8192),
        "2. nics=L: hierarchical / topology-aware flat <= 0.6 where flat is link-bound",
    ),
    Scenario(
        "cyclic3", "emulated3node", 3, 2, "inter=100mbit,nics=1", "cyclic",
        (Plan("flat", "rank"), Plan("flat", "node")), (3072,),
        "1. (3 nodes) nics=1, cyclic placement: topology-aware flat / rank-order flat <= 0.6", 6144,
    ),
)


@dataclass
class Point:
    """One job's outcome: what the table, the plot and W&B show."""

    scenario: str
    plan: str
    seq_len: int
    job_folder: str
    measured_fwd_s: float
    measured_bwd_s: float
    predicted_fwd_s: float
    predicted_bwd_s: float
    predicted_step_s: float
    compute_per_block_s: float
    transfer_per_hop_s: dict[str, float] = field(default_factory=dict)
    link_bound: bool = False
    bytes_match: bool = False

    @property
    def error(self) -> float:
        """(predicted - measured) / measured, forward."""
        return (self.predicted_fwd_s - self.measured_fwd_s) / self.measured_fwd_s


# ---- the dev cluster ---------------------------------------------------------------------


class Cluster:
    """`slurm/dev-cluster up ... --fabric SPEC` on enter, `down` on exit (always)."""

    def __init__(self, scenario: Scenario, index: int) -> None:
        self.scenario = scenario
        self.state_dir = Path(f"/tmp/ringctl-fabric-bench-{os.getpid()}-{scenario.name}")
        self.prefix = f"fb{os.getpid() % 10000}x{index}"
        self.env: dict[str, str] = {}

    def __enter__(self) -> Cluster:
        s = self.scenario
        cmd = [
            "bash", str(DEV_CLUSTER), "up", "--nodes", str(s.nodes), "--cpus", str(s.ranks_per_node),
            "--fabric", s.fabric, "--state-dir", str(self.state_dir), "--prefix", self.prefix,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}")
        conf = re.search(r"^export SLURM_CONF=(\S+)$", done.stdout, flags=re.M)
        if conf is None:
            self.__exit__(None, None, None)
            raise RuntimeError(f"slurm/dev-cluster up printed no SLURM_CONF:\n{done.stdout}{done.stderr}")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        self.env = {**env, **THREADS, "SLURM_CONF": conf.group(1)}
        log(f"cluster up: {s.nodes} nodes ({self.prefix}1..), fabric {s.fabric}")
        return self

    def __exit__(self, *exc: object) -> None:
        cmd = ["bash", str(DEV_CLUSTER), "down", "--state-dir", str(self.state_dir)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        log(f"cluster down ({'ok' if done.returncode == 0 else done.stderr.strip()})")


# ---- calibration and jobs ------------------------------------------------------------------


def calibrate(scenario: Scenario, workload: Workload, seq_len: int, env: dict[str, str] | None, out: Path) -> dict[str, Any]:
    """bench/calibrate.py with the scenario's ranks all at once; on the cluster it writes the
    topology YAML (a local dry run leaves it alone: see `local_overrides`)."""
    config = TOPOLOGY_DIR / f"{scenario.topology}.yaml"
    shape = [
        "--seq-len", str(seq_len), "--heads", str(workload.heads), "--kv-heads", str(workload.kv_heads),
        "--head-dim", str(workload.head_dim), "--batch", str(workload.batch), "--out", str(out),
    ] + ([] if env is None else ["--write", str(config)])
    script = [PYTHON, str(REPO / "bench" / "calibrate.py")]
    with tempfile.TemporaryDirectory(prefix="ringctl-cal-") as rendezvous:
        if env is None:
            cmd = script + ["--local", f"{scenario.nodes}x{scenario.ranks_per_node}"] + shape
            run_env = {**os.environ, **THREADS}
        else:
            cmd = [
                "srun", f"-N{scenario.nodes}", f"--ntasks-per-node={scenario.ranks_per_node}",
                "--distribution=block", *script, "--dir", rendezvous, *shape,
            ]
            run_env = env
        done = subprocess.run(cmd, capture_output=True, text=True, env=run_env, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"calibration failed ({' '.join(cmd)}):\n{done.stdout}{done.stderr}")
    result = json.loads(out.read_text())
    c, intra, inter = result["compute"], result.get("intra") or {}, result.get("inter") or {}
    log(
        f"calibrated {scenario.topology}: ring {result['ring']['compute_tflops'] * 1e3:.1f} GFLOP/s per rank "
        f"(blocks alone {c['compute_tflops'] * 1e3:.1f}, bwd/fwd {c['backward_over_forward']:.2f}); intra {intra.get('bandwidth_GBps', 0) * 1e3:.0f} MB/s; "
        f"inter {inter.get('bandwidth_GBps', 0) * 1e3:.1f} MB/s per flow (all ranks sending)"
    )
    return result


def local_overrides(calibration: dict[str, Any]) -> list[str]:
    """A local dry run's calibration goes on the command line, not into the fabric's YAML."""
    out = [f"topology.compute_tflops={calibration['ring']['compute_tflops']:.4g}"]
    if calibration.get("intra"):
        out.append(f"topology.intra.bandwidth_GBps={calibration['intra']['bandwidth_GBps']:.4g}")
    return out


def launch(scenario: Scenario, plan: Plan, seq_len: int, workload: Workload, env: dict[str, str] | None,
           runs: Path, group: str, extra: list[str] | None = None) -> Point:
    """One point through `ringctl launch` (a real job); reads its results.json."""
    launcher = ["launcher=local"] if env is None else ["launcher=slurm", f"topology.distribution={scenario.distribution}"]
    launcher += extra or []
    name = f"fabric-{scenario.name}-{plan.ring}-{plan.order}-{seq_len}"
    cmd = RINGCTL + [
        "launch", f"+topology={scenario.topology}", *launcher, f"topology.ring={plan.ring}",
        f"topology.order={plan.order}", *workload.overrides(seq_len, scenario.world_size), f"name={name}",
        "wandb.mode=offline", f"wandb.group={group}",
    ]
    run_env = {**(env or {**os.environ, **THREADS}), "RINGCTL_RUNS": str(runs)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=run_env, timeout=900)
    folder = re.search(r"folder: (\S+)", done.stdout)
    if done.returncode != 0 or folder is None:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    results = json.loads((Path(folder.group(1)) / "results.json").read_text())
    point = point_from(scenario, plan, seq_len, Path(folder.group(1)), results)
    log(
        f"{scenario.name:8s} {plan.label:20s} S={seq_len:6d}: fwd {point.measured_fwd_s * 1e3:7.1f} ms "
        f"(predicted {point.predicted_fwd_s * 1e3:7.1f}, {point.error:+.0%})"
    )
    return point


def point_from(scenario: Scenario, plan: Plan, seq_len: int, folder: Path, results: dict[str, Any]) -> Point:
    predicted = results["plan"]
    times = results["times"]
    compute = predicted["compute_time_per_block_s"]["forward"]
    step = predicted["predicted_step_time_s"]
    return Point(
        scenario=scenario.name, plan=plan.label, seq_len=seq_len, job_folder=str(folder),
        measured_fwd_s=min(times["fwd_s"]), measured_bwd_s=min(times["bwd_s"]),
        predicted_fwd_s=predicted["predicted_forward_time_s"], predicted_bwd_s=predicted["predicted_backward_time_s"],
        predicted_step_s=step, compute_per_block_s=compute,
        transfer_per_hop_s=dict(predicted["transfer_time_per_hop_s"]),
        link_bound=step > 1.05 * compute, bytes_match=bool(results.get("bytes", {}).get("match")),
    )


def run_scenario(scenario: Scenario, index: int, workload: Workload, local: bool, out: Path, group: str) -> tuple[list[Point], dict[str, Any]]:
    """Cluster up, calibrate, every (plan, seq_len) point, cluster down."""
    cal_len = scenario.calibrate_seq_len
    if local:
        calibration = calibrate(scenario, workload, cal_len, None, out / f"calibration-{scenario.name}.json")
        return run_points(scenario, workload, None, out, group, local_overrides(calibration)), calibration
    with Cluster(scenario, index) as cluster:
        calibration = calibrate(scenario, workload, cal_len, cluster.env, out / f"calibration-{scenario.name}.json")
        points = run_points(scenario, workload, cluster.env, out, group)
    return points, calibration


def run_points(scenario: Scenario, workload: Workload, env: dict[str, str] | None, out: Path, group: str,
               extra: list[str] | None = None) -> list[Point]:
    """Every (seq_len, plan) of the scenario, the plans of one seq_len back to back; a point
    that fails is reported and skipped (its row is left out of the table)."""
    points = []
    for seq_len in scenario.seq_lens:
        for plan in scenario.plans:
            try:
                points.append(launch(scenario, plan, seq_len, workload, env, out / "runs", group, extra))
            except RuntimeError as exc:
                log(f"{scenario.name} {plan.label} S={seq_len} FAILED: {exc}")
    return points


def collect(folders: list[Path]) -> tuple[list[Point], dict[str, Any]]:
    """Points and calibrations of earlier runs of this script (their --out folders), from
    the jobs' results.json: to rebuild the table, plot and W&B run without rerunning."""
    by_name = {s.name: s for s in SCENARIOS}
    points, calibrations = [], {}
    for folder in folders:
        for path in sorted(folder.glob("calibration-*.json")):
            calibrations[path.stem.removeprefix("calibration-")] = json.loads(path.read_text())
        for path in sorted(folder.glob("runs/*/*/results.json")):
            results = json.loads(path.read_text())
            config = results["config"]
            scenario = by_name.get(str(config["name"]).split("-")[1])
            if scenario is None or "times" not in results:
                continue
            plan = Plan(config["topology"]["ring"], config["topology"].get("order", "node"))
            points.append(point_from(scenario, plan, int(config["workload"]["seq_len"]), path.parent, results))
    return points, calibrations


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    names = [s.name for s in SCENARIOS]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", choices=names, help="run only these scenarios (repeatable)")
    p.add_argument("--local", action="store_true", help="dry run with launcher=local (no SLURM, no fabric)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/fabric-<time>)")
    p.add_argument("--png", type=Path, default=REPO / "docs" / "fabric_sweep.png", help="where the sweep plot goes")
    p.add_argument("--iters", type=int, default=Workload.iters, help="timed iterations per job (the least counts)")
    p.add_argument("--report", type=Path, nargs="+", default=None, metavar="OUT",
                   help="run nothing: rebuild table, plot and W&B run from earlier --out folders")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from fabric_report import print_table, sweep_png, wandb_run

    args = parse_args(argv)
    if args.iters < 1:
        raise SystemExit(f"fabric: --iters {args.iters}: an integer >= 1")
    if not args.local and not args.report and os.geteuid() != 0:
        raise SystemExit("fabric: the dev cluster needs root (or pass --local for a dry run)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = (args.out or REPO / "runs" / f"fabric-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    workload = Workload(iters=args.iters)
    group = f"fabric-{stamp}"
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only]
    points: list[Point] = []
    calibrations: dict[str, Any] = {}
    if args.report:
        points, calibrations = collect(args.report)
        chosen = [s for s in chosen if any(p.scenario == s.name for p in points)]
    for index, scenario in enumerate([] if args.report else chosen):
        found, calibrations[scenario.name] = run_scenario(scenario, index, workload, args.local, out, group)
        points += found
    summary = {
        "local": args.local, "workload": workload.__dict__, "calibration": calibrations,
        "scenarios": [s.__dict__ | {"plans": [p.label for p in s.plans]} for s in chosen],
        "points": [p.__dict__ | {"error": p.error} for p in points],
    }
    (out / "fabric.json").write_text(json.dumps(summary, indent=2, default=str))
    rows = print_table(chosen, points)
    summary["table"] = rows
    (out / "fabric.json").write_text(json.dumps(summary, indent=2, default=str))
    png = sweep_png(chosen, points, args.png)
    wandb_info = wandb_run(out, group, summary, rows, png)
    print(f"results: {out / 'fabric.json'}\nplot: {png}\nW&B offline run: {wandb_info}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
