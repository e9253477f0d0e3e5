"""`ringctl calibrate`: a job that measures compute and links and writes a topology YAML.

- The written YAML has the fields of the shipped topologies, composes from a config
  directory of one's own (`--config-dir DIR +topology=NAME`) and plans.
- The link measurements pair the ranks by their discovered nodes (cyclic placement too).
- Bad input: one line, exit 2, nothing submitted.
- The README's example, run as written (locally here): the file where --out says and in the
  job folder, the figures in results.json and the W&B run, and `ringctl plan` from the file.
- On the dev cluster with the emulated fabric (`--fabric inter=100mbit,nics=1`): the
  measured inter-node rate is within 15% of the tbf rate, and `ringctl plan` with the file
  predicts the forward time `ringctl launch` then measures (attention `fwd_s`) within +-25%.
  The shape is the attention workload's (S=2048, 8 heads x 64, float32) with 8 KV heads, so
  the job is link-bound (2 MB hops) even when other work slows the compute several-fold: near
  the balance point max(compute, transfer) underprices 2 shared cores, whose compute and
  transfers take CPU from each other (README, "Performance"). About two minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from ringctl.config import CONF_DIR, compose
from ringctl.plan import check_seq_len, make_plan
from ringctl.runlog import summary
from ringctl.topology import Topology
from ringctl.workloads.calibrate import (
    TINY_BLOCK_TOKENS,
    Lanes,
    Shape,
    model_topology,
    rate_without_overhead,
    render_yaml,
    shared_port_efficiency,
    tiny_seq_len,
    topology_fields,
)
from slurm_cluster import DevCluster, running_cluster

FABRIC_MBIT = 100
TBF_BYTES_PER_S = FABRIC_MBIT * 1e6 / 8
SHIPPED_FIELDS = set(yaml.safe_load((CONF_DIR / "topology" / "emulated2node.yaml").read_text()))
WRITTEN_FIELDS = SHIPPED_FIELDS | {"step_overhead_us", "memory_bandwidth_GBps"}  # the shipped files may predate them


def ringctl(args: list[str], runs: Path, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    dropped = ("SLURM_CONF", "WANDB_API_KEY", "RINGCTL_MAX_RANKS_PER_NODE", "RINGCTL_CONFIG_DIR")
    environ = {k: v for k, v in os.environ.items() if k not in dropped}
    environ.update(RINGCTL_RUNS=str(runs), WANDB_SILENT="true", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "ringctl", *args], check=False, capture_output=True, text=True, env=environ, cwd=cwd, timeout=timeout
    )


def _figures() -> tuple[dict, dict]:
    compute = {
        "compute_tflops": 0.0123, "blocks_computed": 4, "block_tokens": 512, "forward_s": 0.0437,
        "forward_idle_links_s": 0.04, "backward_over_forward": 2.7, "model_backward_over_forward": 2.5,
        "step_overhead_us": 1234.5, "step_overhead_subtracted": True, "tiny_block_tokens": 8,
        "tiny_blocks_computed": 4, "tiny_block_s": 0.004938, "compute_tflops_with_overhead": 0.0111,
        "block_loop_overhead_us": 1234.5 / 2, "memory_bandwidth_GBps": 3.21,
        "stream": {"keys": 512, "few_keys": 8, "streamed_bytes": 516096, "shard_s": 2e-4, "few_s": 3.9e-5,
                   "memory_bandwidth_GBps": 3.21, "note": None},
        "ring_step": {"plan": "hierarchical", "block_tokens": 8, "ring_forward_s": 0.0069, "model_forward_s": 0.00196,
                      "steps": 4, "clamped": False, "step_overhead_us": 1234.5},
    }
    nics = {"count": 1, "source": "interfaces", "interfaces_per_node": 1, "measured": 1, "bound": ["eth0"] * 4}
    links = {
        "intra": {"bandwidth_GBps": 0.8, "latency_us": 400.0},
        "inter": {"bandwidth_GBps": 0.006, "latency_us": 500.0, "flows_per_node": 2},
        "inter_one_lane": {"bandwidth_GBps": 0.0119, "latency_us": 480.0, "flows_per_node": 1},
        "nics": nics,
    }
    return compute, links


def test_written_topology_has_the_shipped_fields_and_composes_from_a_config_dir(tmp_path: Path) -> None:
    compute, links = _figures()
    topology = Topology.discover(["a", "b", "a", "b"], inter=None)
    cfg = OmegaConf.create({
        "topology": {"ring": "flat", "order": "node", "distribution": "cyclic", "virtual_node_size": None},
        "resources": {"gpus_per_node": 0},
    })
    ctx = SimpleNamespace(topology=topology, device=torch.device("cpu"))
    fields = topology_fields(cfg, ctx, compute, links, "mine")
    # per NIC, the most one NIC carried: 2 flows at once got 6 MB/s each through 1 NIC, one alone 11.9
    assert fields["inter"]["bandwidth_GBps"] == pytest.approx(0.012)
    links["inter_one_lane"]["bandwidth_GBps"] = 0.0125
    assert topology_fields(cfg, ctx, compute, links, "mine")["inter"]["bandwidth_GBps"] == pytest.approx(0.0125)
    assert (fields["nodes"], fields["ranks_per_node"], fields["nics_per_node"]) == (2, 2, 1)
    # two nodes: no two-peer hop, the config's port efficiencies (the default 1.0) kept
    assert fields["inter"]["shared_port_efficiency"] == fields["intra"]["shared_port_efficiency"] == 1.0
    shared = {"message_bytes": 1 << 20, "one_peer_s": 0.16, "two_peers_s": 0.22, "efficiency": 0.727}
    measured = topology_fields(cfg, ctx, compute, {**links, "inter_shared_port": shared}, "mine")
    assert measured["inter"]["shared_port_efficiency"] == 0.727 and measured["intra"]["shared_port_efficiency"] == 1.0
    assert "0.727" in render_yaml(measured, Shape(1, 2048, 8, 2, 64), compute, {**links, "inter_shared_port": shared}, [])
    text = render_yaml(fields, Shape(1, 2048, 8, 2, 64), compute, links, ["a header"])
    (tmp_path / "topology").mkdir()
    (tmp_path / "topology" / "mine.yaml").write_text(text)
    loaded = yaml.safe_load(text)
    assert set(loaded) == WRITTEN_FIELDS and loaded["step_overhead_us"] == pytest.approx(1234.5, rel=1e-3)
    assert list(loaded).index("memory_bandwidth_GBps") == list(loaded).index("step_overhead_us") + 1
    assert "/ 4 steps" in text and "617.2 us per block" in text  # the ring's figure, the loop's beside it
    composed = OmegaConf.to_container(compose(["+topology=mine"], config_dir=tmp_path).topology)
    assert isinstance(composed, dict)
    for key, value in fields.items():
        if isinstance(value, dict):  # a link class: figures to the written precision, `links` as is
            assert composed[key] == {k: pytest.approx(v, rel=1e-3) if isinstance(v, float) else v for k, v in value.items()}, key
        elif isinstance(value, float):
            assert composed[key] == pytest.approx(value, rel=1e-3), key
        else:
            assert composed[key] == value, key
    planned = Topology.from_config(composed)
    assert planned.compute_tflops == pytest.approx(0.0123) and planned.nics_per_node == 1
    assert planned.step_overhead_us == pytest.approx(1234.5, rel=1e-3) and planned.inter.shared_port_efficiency == 1.0
    assert planned.rank_to_node == (0, 1, 0, 1)  # cyclic, as the calibration job ran
    assert planned.memory_bandwidth_GBps == pytest.approx(3.21, rel=1e-3)
    # not measurable: null in the file, said why, and the plan prices blocks by FLOPs alone
    note = "1 query over 512 keys took no longer than over 8"
    unmeasured = {**compute, "memory_bandwidth_GBps": None,
                  "stream": {**compute["stream"], "memory_bandwidth_GBps": None, "note": note}}
    text = render_yaml(topology_fields(cfg, ctx, unmeasured, links, "mine"), Shape(1, 2048, 8, 2, 64), unmeasured, links, [])
    assert f"memory_bandwidth_GBps: null    # null: {note}" in text
    assert Topology.from_config(yaml.safe_load(text)).memory_bandwidth_GBps is None
    # what the step overhead's prediction prices: the measured figures as written, no fixed cost
    model = model_topology(topology, compute, links)
    assert (model.intra.latency_us, model.inter.latency_us, model.nics_per_node) == (400.0, 500.0, 1)
    assert model.inter.bandwidth_GBps == pytest.approx(0.0125)  # per NIC, as written (one lane alone, above)
    assert (model.step_overhead_us, model.memory_bandwidth_GBps, model.compute_tflops) == (0.0, 3.21, 0.0123)
    assert model.rank_to_node == topology.rank_to_node


def test_lanes_pair_ranks_by_their_discovered_nodes() -> None:
    lanes = Lanes.of(Topology.discover(["a", "b", "a", "b"]))  # SLURM's cyclic placement
    assert lanes.nodes == [[0, 2], [1, 3]]
    assert [lanes.intra_peers(r) for r in range(4)] == [(2, 2), (3, 3), (0, 0), (1, 1)]
    assert [lanes.inter_peers(r, 2) for r in range(4)] == [(1, 1), (0, 0), (3, 3), (2, 2)]
    assert [lanes.inter_peers(r, 1) for r in range(4)] == [(1, 1), (0, 0), None, None]
    three = Lanes.of(Topology.discover(["a", "a", "b", "b", "c", "c"]))
    assert [three.inter_peers(r, 2) for r in range(6)] == [(2, 4), (3, 5), (4, 0), (5, 1), (0, 2), (1, 3)]
    assert Lanes.of(Topology.discover(["a"])).intra_peers(0) is None
    # the two-peer hop: lane 0 only, next and previous node's lane 0, on three nodes or more
    cyclic3 = Lanes.of(Topology.discover(["a", "b", "c", "a", "b", "c"]))
    assert [cyclic3.shared_port_peers(r) for r in range(6)] == [(1, 2), (2, 0), (0, 1), None, None, None]
    assert [lanes.shared_port_peers(r) for r in range(4)] == [None] * 4


def test_rate_without_overhead_and_port_efficiency() -> None:
    # 4 blocks of 0.1 s fixed cost in 1 s: the FLOPs took 0.6 s
    assert rate_without_overhead(1.2e12, 1.0, 4, 0.1) == (pytest.approx(2.0), True)
    # fixed costs over half the time (0.8 s of 1 s): not separable, the plain rate, said so
    assert rate_without_overhead(1.2e12, 1.0, 4, 0.2) == (pytest.approx(1.2), False)
    assert rate_without_overhead(1.2e12, 1.0, 4, 0.3) == (pytest.approx(1.2), False)
    assert shared_port_efficiency(0.3, 0.4) == 0.75
    assert shared_port_efficiency(0.3, 0.25) == 1.0  # two peers faster than one: no sharing loss
    assert shared_port_efficiency(1e-6, 10.0) == 0.001  # kept inside (0, 1]
    for layout in ("zigzag", "contiguous", "striped", "docs"):
        shape = Shape(1, 3072, 8, 2, 64, layout=layout)
        assert check_seq_len(tiny_seq_len(shape, 3), layout, 3) == TINY_BLOCK_TOKENS
    assert tiny_seq_len(Shape(1, 12, 8, 2, 64), 3) == 12  # blocks of 4 tokens: small already


def _two_peer_posts(rank: int, world: int) -> list[list[tuple[str, int]]]:
    """The ops of every batch_isend_irecv call two_peer_hop_seconds makes on 3 ranks."""
    import torch.distributed as dist

    from ringctl.workloads import calibrate

    batches: list[list[tuple[str, int]]] = []
    post = dist.batch_isend_irecv

    def recording(ops: list[Any]) -> Any:
        batches.append([(op.op.__name__, op.group_peer) for op in ops])
        return post(ops)

    dist.batch_isend_irecv = recording  # type: ignore[assignment]
    try:  # the pool's next call runs in this process: put it back
        calibrate.two_peer_hop_seconds(1024, ((rank + 1) % world, (rank - 1) % world), torch.device("cpu"), repeats=2)
    finally:
        dist.batch_isend_irecv = post
    return batches


def test_two_peer_probe_posts_both_receives_before_either_send() -> None:
    """The shared-port probe posts a step as the ring does (RingComm.hops): a receive posted
    after a send to the same peer queues its "receive ready" notice behind that send's data
    on their TCP stream, and the probe then measured the serialisation, not the port (0.70
    instead of 0.94 on the 3-node dev fabric)."""
    from _dist import run_workers

    for rank, batches in enumerate(run_workers(_two_peer_posts, 3)):
        nxt, prev = (rank + 1) % 3, (rank - 1) % 3
        assert batches and all(b == [("irecv", prev), ("irecv", nxt), ("isend", nxt), ("isend", prev)] for b in batches), batches


def test_model_flops_are_the_cost_models() -> None:
    """compute_tflops = forward_flops / time must give back the plan's block compute time."""
    from ringctl.plan import Workload, estimate

    shape = Shape(1, 2048, 8, 2, 64)
    topology = Topology((2, 2), compute_tflops=0.02)
    plan = make_plan(topology, algorithm="flat")
    cost = estimate(plan, Workload(1, 2048, 8, 2, 64, "float32", True))
    blocks_seconds = shape.forward_flops(4) / 0.02e12  # the W blocks one rank computes
    assert cost.compute_s["forward"] * 4 == pytest.approx(blocks_seconds)
    # the measured fixed cost is per block: W of them on top of the FLOPs' time
    overhead = Topology((2, 2), compute_tflops=0.02, step_overhead_us=750.0)
    cost = estimate(make_plan(overhead, algorithm="flat"), Workload(1, 2048, 8, 2, 64, "float32", True))
    assert cost.compute_s["forward"] * 4 == pytest.approx(blocks_seconds + 4 * 750e-6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["workload=attention"], "workload='attention' is invalid; allowed: calibrate only"),
        (["--out", "x.txt"], "--out='x.txt' is invalid; allowed: a file path ending in .yaml"),
        (["--name", "emulated2node"], "--name='emulated2node' is invalid; allowed: a name ringctl does not ship"),
        (["--bogus"], "option='--bogus' is invalid"),
        (["workload.seq_len=1001", "+topology=2node", "launcher=local"], "workload.seq_len=1001 is invalid"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_submits_nothing(args: list[str], message: str, tmp_path: Path) -> None:
    done = ringctl(["calibrate", *args], tmp_path / "runs")
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "runs").exists()


def readme_commands() -> list[str]:
    """The README's `ringctl calibrate` example: its two command lines, as written."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = text.split("### Measuring it: `ringctl calibrate`", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_example_runs_locally_writes_the_topology_and_logs_the_figures(tmp_path: Path) -> None:
    """The README's two commands exactly as written (a shell, HOME=tmp_path, no SLURM: local)."""
    calibrate, plan = readme_commands()
    assert calibrate.startswith("ringctl calibrate ") and plan.startswith("ringctl plan ")
    runs = tmp_path / "runs"
    dropped = ("SLURM_CONF", "WANDB_API_KEY", "RINGCTL_MAX_RANKS_PER_NODE", "RINGCTL_CONFIG_DIR")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(HOME=str(tmp_path), RINGCTL_RUNS=str(runs), WANDB_SILENT="true",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", "-c", calibrate], check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    path = tmp_path / "ringctl-conf" / "topology" / "mycluster.yaml"
    assert f"topology: {path}" in done.stdout
    assert f"ringctl plan --config-dir {path.parent.parent} +topology=mycluster" in done.stdout
    [entry] = [json.loads(line) for line in (runs / "index.jsonl").read_text().splitlines()]
    folder = Path(entry["folder"])
    results = json.loads((folder / "results.json").read_text())
    written = yaml.safe_load(path.read_text())
    assert set(written) == WRITTEN_FIELDS and written["name"] == "mycluster"
    assert yaml.safe_load((folder / "topology" / "mycluster.yaml").read_text()) == written  # a copy in the job folder
    assert results["topology"]["compute_tflops"] == pytest.approx(written["compute_tflops"], rel=1e-3)
    assert (written["nodes"], written["ranks_per_node"], written["gpus_per_node"]) == (2, 2, 0)
    cal = results["calibration"]
    assert cal["compute"]["block_tokens"] == 3072 // 4 and cal["shape"]["seq_len"] == 3072
    assert cal["intra"]["bandwidth_GBps"] > 0 and cal["inter"]["bandwidth_GBps"] > 0
    # the fixed cost per step, and the rate it leaves: FLOPs / rate + overhead per block = the time
    c = cal["compute"]
    assert c["tiny_block_tokens"] == TINY_BLOCK_TOKENS
    assert c["block_loop_overhead_us"] * 1e-6 == pytest.approx(c["tiny_block_s"] / c["tiny_blocks_computed"])
    # the written fixed cost per step: the ring on 8-token blocks less the model without it, per step
    ring = c["ring_step"]
    assert (ring["plan"], ring["steps"], ring["block_tokens"]) == ("hierarchical", 4, TINY_BLOCK_TOKENS)
    assert c["step_overhead_us"] >= 0 and ring["model_forward_s"] > 0
    residual = (ring["ring_forward_s"] - ring["model_forward_s"]) / 4
    assert c["step_overhead_us"] == pytest.approx(max(0.0, residual) * 1e6) and ring["clamped"] == (residual < 0)
    # the K/V streaming rate: the shard's K/V bytes less 8 keys' over the time they added, or null
    stream, bandwidth = c["stream"], c["memory_bandwidth_GBps"]
    assert stream["keys"] == 3072 // 4 and stream["streamed_bytes"] == 2 * (768 - 8) * 2 * 64 * 4
    if bandwidth is None:
        assert stream["note"] and written["memory_bandwidth_GBps"] is None
    else:
        assert bandwidth > 0 and bandwidth == pytest.approx(stream["streamed_bytes"] / (stream["shard_s"] - stream["few_s"]) / 1e9)
        assert written["memory_bandwidth_GBps"] == pytest.approx(bandwidth, rel=1e-3)
    # the rate: the forward less the block loop's own fixed cost per block
    left = c["forward_s"] - c["blocks_computed"] * c["block_loop_overhead_us"] * 1e-6
    expected = c["model_forward_flops"] / (left if c["step_overhead_subtracted"] else c["forward_s"]) / 1e12
    assert c["compute_tflops"] == pytest.approx(expected)
    assert c["step_overhead_subtracted"] == (left >= 0.5 * c["forward_s"])
    assert written["step_overhead_us"] == pytest.approx(c["step_overhead_us"], rel=1e-3)
    # two nodes: the port efficiencies are the config's, and said so
    assert cal["inter_shared_port"] is None
    assert written["inter"]["shared_port_efficiency"] == written["intra"]["shared_port_efficiency"] == 1.0
    assert "shared port efficiency not measured (needs 3 nodes)" in done.stdout
    assert f"  step     {c['step_overhead_us']:.4g} us fixed cost per ring step" in done.stdout
    assert "  memory   " in done.stdout
    planned = Topology.from_config(written)
    assert planned.step_overhead_us == pytest.approx(c["step_overhead_us"], rel=1e-3)
    assert planned.memory_bandwidth_GBps == (None if bandwidth is None else pytest.approx(bandwidth, rel=1e-3))
    assert planned.compute_tflops == pytest.approx(c["compute_tflops"], rel=1e-3)
    # the same figures in the W&B run, read back from its file
    [run_file] = [p for p in folder.glob("wandb/offline-run-*/run-*.wandb")]
    logged = summary(run_file)
    assert logged["calibrate/compute_tflops"] == pytest.approx(cal["compute"]["compute_tflops"])
    assert logged["calibrate/step_overhead_us"] == pytest.approx(c["step_overhead_us"])
    assert logged.get("calibrate/memory_bandwidth_GBps") == (None if bandwidth is None else pytest.approx(bandwidth))
    assert "calibrate/inter_shared_port_efficiency" not in logged
    assert logged["calibration/inter/latency_us"] == pytest.approx(cal["inter"]["latency_us"])
    # the README's second command: the file plans from the config directory
    shown = subprocess.run(["bash", "-c", plan + " --json"], check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["world_size"] == 4


# ---- on the dev cluster with the emulated fabric ------------------------------------------------


@pytest.fixture(scope="module")
def fabric_cluster() -> Iterator[DevCluster]:
    with running_cluster(
        "calibrate", nodes=2, cpus=8, prefix=f"cal{os.getpid() % 100000}n", fabric=f"inter={FABRIC_MBIT}mbit,nics=1"
    ) as cluster:
        yield cluster


def test_calibrated_topology_recovers_the_fabric_and_predicts_the_job(fabric_cluster: DevCluster, tmp_path: Path) -> None:
    runs, conf = tmp_path / "runs", tmp_path / "conf"
    env = {"SLURM_CONF": str(fabric_cluster.slurm_conf)}
    out = conf / "topology" / "measured2node.yaml"
    load_before = os.getloadavg()
    shape = ["workload.kv_heads=8", "workload.seq_len=2048"]  # the link-bound point the figures were measured at
    # no W&B run and no float64 check here: the README example above checks both; this
    # test is about the figures and the time (the check's float64 hops over the 100 Mbit
    # fabric would add seconds to every run of the suite)
    cal = ringctl(["calibrate", "+topology=emulated2node", "launcher=slurm", *shape, "--out", str(out), "wandb=disabled"], runs, env)
    assert cal.returncode == 0, cal.stdout + cal.stderr
    assert f"topology: {out}" in cal.stdout
    written = yaml.safe_load(out.read_text())
    assert set(written) == WRITTEN_FIELDS and written["step_overhead_us"] >= 0
    assert (written["nodes"], written["ranks_per_node"], written["nics_per_node"]) == (2, 2, 1)
    assert written["distribution"] == "cyclic" and written["name"] == "measured2node"
    rate = written["inter"]["bandwidth_GBps"] * 1e9

    plan = ringctl(["plan", "--config-dir", str(conf), "+topology=measured2node", *shape, "--json"], runs, env)
    assert plan.returncode == 0, plan.stderr
    predicted = json.loads(plan.stdout)
    job = ringctl(
        ["launch", "--config-dir", str(conf), "+topology=measured2node", "launcher=slurm", *shape, "workload.iters=5",
         "workload.check=false", "wandb=disabled"],
        runs, env,
    )
    assert job.returncode == 0, job.stdout + job.stderr
    [folder] = [Path(e["folder"]) for e in map(json.loads, (runs / "index.jsonl").read_text().splitlines()) if e["name"] == "ringctl"]
    results = json.loads((folder / "results.json").read_text())
    # what `ringctl plan` showed is what ran
    assert results["plan"]["ring_order"] == predicted["ring_order"]
    assert results["plan"]["predicted_forward_time_s"] == pytest.approx(predicted["predicted_forward_time_s"])
    measured = min(results["times"]["fwd_s"])
    error = (predicted["predicted_forward_time_s"] - measured) / measured
    print(
        f"\ntbf {TBF_BYTES_PER_S / 1e6:.2f} MB/s, calibrated inter {rate / 1e6:.2f} MB/s per NIC "
        f"({(rate - TBF_BYTES_PER_S) / TBF_BYTES_PER_S:+.1%}); compute {written['compute_tflops'] * 1e3:.1f} GFLOP/s per rank; "
        f"{predicted['ring']} ring forward predicted {predicted['predicted_forward_time_s'] * 1e3:.1f} ms, "
        f"measured {measured * 1e3:.1f} ms (least of {len(results['times']['fwd_s'])}; median "
        f"{results['times']['fwd_median_s'] * 1e3:.1f}): {error:+.1%}; load average {load_before} -> {os.getloadavg()}"
    )
    assert abs(rate - TBF_BYTES_PER_S) <= 0.15 * TBF_BYTES_PER_S
    assert abs(error) <= 0.25
