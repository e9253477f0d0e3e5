"""`ringctl plan`: compose conf/, build the Topology and RingPlan, show them.

    ringctl plan +topology=2node                          # table + ringplan-2node.png
    ringctl plan +topology=16node topology.distribution=cyclic --json
    ringctl plan +topology=4node topology.ring=flat workload.seq_len=262144 --png ring.png
    ringctl plan --config-dir ~/ringctl-conf +topology=mycluster   # DIR/topology/mycluster.yaml

Overrides are Hydra's (`topology.*`, `workload.*`: batch, seq_len, heads, kv_heads,
head_dim, dtype, layout, causal). Hydra composes through its compose API, so nothing is
written to disk except the PNG asked for. Bad input prints one line naming the key, the
value and what is allowed, and exits 2. The table form also writes the ring's picture
(`ringplan-<topology>.png`, or --png PATH); --json writes a PNG only when asked. No torch import: this runs anywhere, fast.
The predicted peak memory per rank (ringctl.memory) is shown against
topology.memory_per_rank_GB with the longest seq_len that fits (JSON: "memory"); a plan
that does not fit is marked (and `ringctl launch` refuses it).
With `workload=infer` the plan also prices one inference call (the first turn after the
prompt: T = workload.turns[0] new tokens over P = workload.prompt cached ones) by pass-KV
and by pass-Q, shows which `auto` picks and the crossover T/(T+P) (JSON: "inference").
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from ringctl.errors import ConfigError

if TYPE_CHECKING:
    from ringctl.infer_plan import InferWorkload
    from ringctl.memory import MemoryCheck
    from ringctl.plan import RingPlan, Workload
    from ringctl.topology import Topology

USAGE = "usage: ringctl plan [--config-dir DIR] [+topology=NAME] [KEY=VALUE ...] [--json] [--png PATH]"


def _parse(argv: list[str]) -> tuple[list[str], bool, str | None, str | None]:
    """Split our flags from Hydra overrides: (overrides, as_json, png_path, config_dir).
    config_dir is --config-dir's value (None: RINGCTL_CONFIG_DIR, else none)."""
    from ringctl.config import pop_config_dir

    config_dir, argv = pop_config_dir(argv)
    overrides: list[str] = []
    as_json, png = False, None
    args = iter(argv)
    for arg in args:
        if arg == "--json":
            as_json = True
        elif arg == "--png":
            png = next(args, None)
            if not png:
                raise ConfigError("--png", "", "a file path, e.g. --png ring.png")
        elif arg.startswith("--png="):
            png = arg.partition("=")[2]
            if not png:
                raise ConfigError("--png", "", "a file path, e.g. --png ring.png")
        elif arg.startswith("-"):
            raise ConfigError(
                "option", arg, "--json | --png PATH | --config-dir DIR | --help, then Hydra overrides KEY=VALUE"
            )
        else:
            overrides.append(arg)
    return overrides, as_json, png, config_dir


def build(overrides: list[str], config_dir: str | None = None) -> tuple[Topology, RingPlan, Workload]:
    """(topology, plan, workload) from the config composed with `overrides` (and the user's
    `config_dir`); ConfigError on bad input."""
    topology, plan, workload, _ = build_with_memory(overrides, config_dir)
    return topology, plan, workload


def build_with_memory(
    overrides: list[str], config_dir: str | None = None
) -> tuple[Topology, RingPlan, Workload, MemoryCheck]:
    """`build` and the plan's predicted peak memory per rank against the topology's
    memory_per_rank_GB (ringctl.memory), priced for the topology's ranks: the Triton kernels
    where it has GPUs (gpus_per_node > 0), else the torch block path on one thread."""
    topology, plan, workload, memory, _ = build_all(overrides, config_dir)
    return topology, plan, workload, memory


def build_all(
    overrides: list[str], config_dir: str | None = None
) -> tuple[Topology, RingPlan, Workload, MemoryCheck, InferWorkload | None]:
    """`build_with_memory` and, for the infer workload (workload.name == "infer"), the
    inference call the plan prices both ways (ringctl.infer_plan.InferWorkload.from_config:
    the first turn after the prompt); None for training workloads."""
    from ringctl.config import compose
    from ringctl.memory import check_plan_memory
    from ringctl.plan import plan_from_config
    from ringctl.topology import Topology

    cfg = compose(overrides, config_dir)
    topology = Topology.from_config(cfg.topology)
    plan, workload = plan_from_config(topology, cfg.topology, cfg.workload)
    gpus = cfg.topology.get("gpus_per_node") or 0
    impl = "triton" if isinstance(gpus, int) and gpus > 0 else "torch"
    memory = check_plan_memory(plan, workload, topology.memory_per_rank_bytes, block_impl=impl)
    inference = None
    if cfg.workload.get("name") == "infer":
        from ringctl.infer_plan import InferWorkload, check_mode

        check_mode(cfg.workload.get("mode"))
        inference = InferWorkload.from_config(cfg.workload)
    return topology, plan, workload, memory, inference


def main(command: str, argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip().split("\n\n")[1] if __doc__ else USAGE)
        print(USAGE)
        return 0
    try:
        overrides, as_json, png, config_dir = _parse(argv)
        topology, plan, workload, memory, inference = build_all(overrides, config_dir)
        data = plan.to_dict(workload)
        data["memory"] = memory.to_dict()
        if inference is not None:
            from ringctl.infer_plan import infer_summary

            data["inference"] = infer_summary(plan, inference)
    except ValueError as exc:  # ConfigError and the planner's own checks: bad input
        print(f"ringctl {command}: {exc}", file=sys.stderr)
        return 2
    if as_json:
        try:
            print(json.dumps(data), flush=True)
        except BrokenPipeError:  # `ringctl plan --json | head`: the reader left, not an error
            sys.stdout = None  # no second failure at exit
            return 0
    else:
        from ringctl.report import print_report

        print_report(plan, workload, topology, memory=memory, inference=inference)
        # the table always comes with its picture; --json stays side-effect free
        png = png or f"ringplan-{topology.name}.png"
    if png:
        from ringctl.report import plan_png

        try:
            written = plan_png(plan, png, workload=workload, memory=memory, inference=inference)
        except OSError as exc:
            print(f"ringctl {command}: --png={png!r} cannot be written: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"wrote {written}", file=sys.stderr if as_json else sys.stdout)
    return 0
