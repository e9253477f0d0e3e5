"""`ringctl calibrate`: measure the cost model's figures on your nodes; write a topology YAML.

    ringctl calibrate +topology=2node launcher=slurm            # on the nodes SLURM allocates
    ringctl calibrate +topology=2node --out ~/rc/topology/mycluster.yaml
    ringctl calibrate +topology=2node workload.seq_len=131072 workload.dtype=bfloat16
    ringctl plan --config-dir ~/rc +topology=mycluster           # then plan (and launch) with it

A job like `ringctl launch`'s (same launcher, nodes, ranks, threads and job folder) runs the
`calibrate` workload (ringctl/workloads/calibrate.py): every rank at once times the block
computes of one ring pass at the workload's block shape and at 8-token blocks (compute rate
per rank), one query over a shard's keys and over 8 (the K/V streaming rate), ringctl's ring
forward on 8-token blocks less the model's prediction (fixed cost per ring step), inner- and
outer-ring hops (latency; bandwidth per flow
with every rank sending; on 3+ nodes, a NIC's efficiency with two peers at once) and counts
the NICs in use. Rank 0 writes the topology (the fields of conf/topology/*.yaml, each figure commented)
to `<job folder>/topology/<name>.yaml` and to --out PATH when given, and the command prints
the figures and the path. results.json and the W&B run keep every figure.

Options: --out PATH (a .yaml file; its name is the topology's name unless --name), --name
NAME, --config-dir DIR; the rest are Hydra overrides as for `ringctl launch` (the workload
is `calibrate`: set its shape with workload.seq_len=..., heads, kv_heads, head_dim, dtype).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from ringctl.errors import ConfigError

USAGE = "usage: ringctl calibrate [--config-dir DIR] [+topology=NAME] [KEY=VALUE ...] [--out PATH] [--name NAME]"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _quote(value: str) -> str:
    """A string value for Hydra's override grammar (single-quoted, \\ and ' escaped)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def parse(argv: list[str]) -> tuple[list[str], str | None, Path | None, str | None]:
    """(Hydra overrides, config dir, --out as an absolute path, --name); ConfigError on bad input."""
    from ringctl.config import CONF_DIR, pop_config_dir

    config_dir, argv = pop_config_dir(argv)
    overrides: list[str] = []
    out: Path | None = None
    name: str | None = None
    args = iter(argv)
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag in ("--out", "--name"):
            value = value if eq else next(args, "")
            if not value or value.startswith("-"):
                raise ConfigError(flag, value, "a file path ending in .yaml" if flag == "--out" else "a topology name")
            if flag == "--out":
                out = Path(value).expanduser().absolute()
                if out.suffix != ".yaml":
                    raise ConfigError("--out", value, "a file path ending in .yaml (DIR/topology/NAME.yaml for --config-dir DIR)")
                if out.is_dir():
                    raise ConfigError("--out", value, "a file path, not a directory")
            else:
                name = value
        elif arg.startswith("-"):
            raise ConfigError("option", arg, "--out PATH | --name NAME | --config-dir DIR | --help, then Hydra overrides KEY=VALUE")
        else:
            if flag.lstrip("+~") == "workload":
                raise ConfigError(
                    "workload", value, "calibrate only (ringctl calibrate runs it; set its shape with workload.seq_len=... etc.)"
                )
            overrides.append(arg)
    chosen = name or (out.stem if out is not None else None)
    if chosen is not None:
        key = "--name" if name else "--out"
        if not _NAME.match(chosen):
            raise ConfigError(key, chosen, "a name of letters, digits, '_', '-', '.' (it becomes +topology=NAME)")
        if (CONF_DIR / "topology" / f"{chosen}.yaml").exists():
            raise ConfigError(key, chosen, "a name ringctl does not ship (a packaged topology of that name would hide yours)")
    return overrides, config_dir, out, name


def build_overrides(overrides: list[str], out: Path | None, name: str | None) -> list[str]:
    """The user's overrides with the calibrate workload chosen and our flags as its keys."""
    head = ["workload=calibrate"]
    if not any(o.partition("=")[0].lstrip("+~") == "name" for o in overrides):
        head.append("name=calibrate")
    tail = []
    if out is not None:
        tail.append(f"workload.out={_quote(str(out))}")
    if name is not None:
        tail.append(f"workload.topology_name={_quote(name)}")
    return head + overrides + tail


def expected_path(cfg: Any, folder: Path) -> Path:
    """Where the job writes the topology: workload.out, else the job folder."""
    from ringctl.workloads.calibrate import default_name

    out = cfg.workload.get("out")
    return Path(str(out)) if out else folder / "topology" / f"{default_name(cfg)}.yaml"


def report(results: dict[str, Any]) -> list[str]:
    """The figures a user reads, one per line, and how to use the file."""
    cal, topo = results["calibration"], results["topology"]
    compute, nics = cal["compute"], cal["nics"]
    lines = [
        (
            f"calibration: {len(results.get('node_names', []))} ranks on {topo['nodes']} node(s), "
            f"shape {cal['shape']['seq_len']} tokens x {cal['shape']['heads']}/{cal['shape']['kv_heads']} heads "
            f"x {cal['shape']['head_dim']} ({cal['shape']['dtype']}); least of {cal['repeats']} runs, slowest rank"
        ),
        (
            f"  compute  {compute['compute_tflops'] * 1e3:.4g} GFLOP/s per rank ({compute['blocks_computed']} blocks of "
            f"{compute['block_tokens']} tokens + merges in {compute['forward_s'] * 1e3:.3g} ms with ring hops in flight; "
            f"{compute['compute_tflops_idle_links'] * 1e3:.4g} GFLOP/s with idle links; "
            f"bwd/fwd {compute['backward_over_forward']:.2f}, model {compute['model_backward_over_forward']})"
        ),
    ]
    if "step_overhead_us" in compute:
        ring = compute.get("ring_step")
        if ring:
            lines.append(
                f"  step     {compute['step_overhead_us']:.4g} us fixed cost per ring step (the {ring['plan']} ring on "
                f"{ring['block_tokens']}-token blocks {ring['ring_forward_s'] * 1e3:.3g} ms, less the model's "
                f"{ring['model_forward_s'] * 1e3:.3g} ms without it, / {ring['steps']} steps"
                + ("; less than predicted: 0" if ring["clamped"] else "") + ")"
            )
        else:
            lines.append(f"  step     {compute['step_overhead_us']:.4g} us fixed cost per ring step")
    if "block_loop_overhead_us" in compute:
        how = (
            f"subtracted from the forward's time for the rate; {compute['compute_tflops_with_overhead'] * 1e3:.4g} GFLOP/s with it"
            if compute["step_overhead_subtracted"] else "NOT subtracted: over half the forward's time, calibrate at a larger seq_len"
        )
        lines.append(
            f"  loop     {compute['block_loop_overhead_us']:.4g} us per block, the block loop alone "
            f"({compute['tiny_blocks_computed']} blocks of {compute['tiny_block_tokens']} tokens + merges in "
            f"{compute['tiny_block_s'] * 1e3:.3g} ms; {how})"
        )
    stream = compute.get("stream")
    if stream:
        if compute["memory_bandwidth_GBps"] is None:
            lines.append(f"  memory   null, blocks priced by FLOPs alone: {stream['note']}")
        else:
            lines.append(
                f"  memory   {compute['memory_bandwidth_GBps']:.4g} GB/s K/V streamed per rank (1 query over {stream['keys']} "
                f"keys {stream['shard_s'] * 1e6:.4g} us, over {stream['few_keys']} {stream['few_s'] * 1e6:.4g} us)"
            )
    intra, inter, one = cal.get("intra"), cal.get("inter"), cal.get("inter_one_lane")
    if intra:
        lines.append(f"  intra    {intra['bandwidth_GBps'] * 1e3:.4g} MB/s per flow, latency {intra['latency_us']:.4g} us")
    else:
        lines.append("  intra    not measured (one rank per node): the config's figures kept")
    if inter:
        alone = f"; one lane alone {one['bandwidth_GBps'] * 1e3:.4g} MB/s" if one else ""
        lines.append(
            f"  inter    {topo['inter']['bandwidth_GBps'] * 1e3:.4g} MB/s per NIC ({inter['flows_per_node']} flow(s) per node "
            f"at once: {inter['bandwidth_GBps'] * 1e3:.4g} MB/s each{alone}), latency {inter['latency_us']:.4g} us"
        )
        shared = cal.get("inter_shared_port")
        if shared:
            lines.append(
                f"  inter    shared port efficiency {shared['efficiency']:.3g} ({2 * shared['message_bytes']} B to one peer in "
                f"{shared['one_peer_s'] * 1e3:.3g} ms, half to each of two peers in {shared['two_peers_s'] * 1e3:.3g} ms)"
            )
        else:
            lines.append(
                f"  inter    shared port efficiency not measured (needs 3 nodes): the config's "
                f"{topo['inter'].get('shared_port_efficiency', 1.0):.3g} kept"
            )
    else:
        lines.append("  inter    not measured (one node): the config's figures kept")
    lines.append(f"  NICs     {nics['count']} per node ({nics['source']})")
    paths = results.get("topology_paths", [])
    if paths:
        path = Path(paths[-1])
        lines.append(f"topology: {path}")
        name = topo["name"]
        if path.parent.name == "topology":
            lines.append(f"use it:   ringctl plan --config-dir {path.parent.parent} +topology={name}")
        else:
            lines.append(f"use it:   copy it to DIR/topology/{name}.yaml, then ringctl plan --config-dir DIR +topology={name}")
    return lines


def main(command: str, argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() if __doc__ else USAGE)
        print(USAGE)
        return 0
    from ringctl.commands.launch import submit_one

    try:
        overrides, config_dir, out, name = parse(argv)
        full = build_overrides(overrides, out, name)
    except ConfigError as exc:
        print(f"ringctl {command}: {exc}", file=sys.stderr)
        return 2
    code, cfg, job = submit_one(command, full, config_dir)
    if job is None:
        return code
    if not cfg.wait:
        print(f"the topology will be written to {expected_path(cfg, job.folder)}")
        print(f"follow it with: ringctl status {job.job_id}   ringctl logs {job.job_id} --follow")
        return 0
    from ringctl.jobs import follow

    code = follow([job])
    results = job.folder / "results.json"
    if code != 0 or not results.exists():
        return code or 1
    for line in report(json.loads(results.read_text())):
        print(line)
    return 0
