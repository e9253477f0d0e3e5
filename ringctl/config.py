"""Typed configuration: dataclass schemas registered in Hydra's ConfigStore.

Defaults live in the YAML files under conf/ (each group's files extend the schema
registered here as `<group>/schema`); these dataclasses give types and validation.
Only the CLI and the launcher read these objects: the runtime takes a RingPlan and
tensors, never config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from ringctl.errors import ConfigError

#: the conf/ directory at the repository root (the package is installed editable)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class LinkConfig:
    """One link class of the fabric. Bandwidth is GB/s in one direction, per link (per NIC)."""

    bandwidth_GBps: float = 450.0
    latency_us: float = 2.0


@dataclass
class TopologyConfig:
    """The machine the job runs on, as the planner sees it (see ringctl/topology.py)."""

    name: str = "local"
    nodes: int = 1
    # int for even nodes, or a list with one entry per node for uneven ones
    ranks_per_node: Any = 2
    gpus_per_node: int = 0
    nics_per_node: int = 1
    intra: LinkConfig = field(default_factory=LinkConfig)
    inter: LinkConfig = field(default_factory=lambda: LinkConfig(bandwidth_GBps=50.0, latency_us=5.0))
    ring: str = "flat"  # flat | hierarchical
    # node: node-contiguous ring order (topology-aware); rank: ring 0..W-1 (baseline, flat only)
    order: str = "node"
    distribution: str = "block"  # block | cyclic: how SLURM places ranks on nodes
    # ranks per virtual node when one machine stands in for several nodes (null = real hostnames)
    virtual_node_size: Any = None
    compute_tflops: float = 400.0  # attention FLOP rate per rank for the cost model


cs = ConfigStore.instance()
cs.store(group="topology", name="schema", node=TopologyConfig)


@dataclass
class LauncherConfig:
    """Where and how the job runs. `kind`: auto (slurm when `sbatch` is on PATH) | slurm | local."""

    kind: str = "auto"
    # ranks per node actually started: the topology's ranks_per_node capped by this
    # (the local default and the dev cluster run a few CPU ranks per node, not 8 GPUs)
    max_ranks_per_node: Any = None
    # the cap when the job runs as local processes and max_ranks_per_node is null
    # (launcher=auto on a machine without SLURM): ranks per virtual node
    local_ranks_per_node: int = 2
    # GPUs per node (--gpus-per-node); null: one per rank when the topology has GPUs
    gpus_per_node: Any = None
    cpus_per_task: int = 1
    time_min: int = 10
    partition: Any = None
    account: Any = None
    qos: Any = None
    constraint: Any = None
    exclusive: bool = False
    # extra sbatch options, name -> value (validated: known to submitit, no newlines)
    additional: dict[str, Any] = field(default_factory=dict)
    # shell lines run before the job (module load ..., source env)
    setup: list[str] = field(default_factory=list)
    # where job folders and the job index live
    root: str = "runs"
    # torch.distributed init timeout (a missing peer fails fast instead of hanging)
    init_timeout_s: int = 120


@dataclass
class WorkloadConfig:
    """What every rank runs. Shapes are global: seq_len is the whole sequence."""

    name: str = "attention"
    batch: int = 1
    seq_len: int = 1024
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"  # float64 | float32 | bfloat16 | float16
    layout: str = "zigzag"  # contiguous | zigzag | striped
    causal: bool = True
    seed: int = 0


@dataclass
class AttentionConfig(WorkloadConfig):
    """ring_attention fwd+bwd timing, plus an exactness check against SDPA in float64."""

    warmup: int = 1
    iters: int = 3
    check: bool = True
    # the float64 exactness check runs at this sequence length (rank 0 gathers it all)
    check_seq_len: int = 256
    check_tol: float = 1e-9


@dataclass
class TrainConfig(WorkloadConfig):
    """A small causal transformer LM whose attention layers call ring_attention."""

    name: str = "train"
    steps: int = 20
    vocab: int = 256
    layers: int = 2
    lr: float = 3e-3
    checkpoint_every: int = 10


@dataclass
class CustomConfig(WorkloadConfig):
    """A user function `pkg.module:fn(cfg, ctx)` called on every rank."""

    name: str = "custom"
    entry: str = ""
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class WandbConfig:
    """Weights & Biases from rank 0. The API key comes from WANDB_API_KEY only, never config."""

    mode: str = "offline"  # offline | online | disabled
    project: str = "ringctl"
    entity: Any = None
    group: Any = None
    tags: list[str] = field(default_factory=list)


cs.store(group="launcher", name="schema", node=LauncherConfig)
cs.store(group="workload", name="schema_attention", node=AttentionConfig)
cs.store(group="workload", name="schema_train", node=TrainConfig)
cs.store(group="workload", name="schema_custom", node=CustomConfig)
cs.store(group="wandb", name="schema", node=WandbConfig)

#: allowed values of the string-valued keys, checked by ringctl.launch.validate
LAUNCHER_KINDS = ("auto", "slurm", "local")
DTYPES = ("float64", "float32", "bfloat16", "float16")
LAYOUTS = ("contiguous", "zigzag", "striped")
WANDB_MODES = ("offline", "online", "disabled")


def compose(overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Compose conf/ with Hydra's compose API; any composition error becomes a ConfigError.

    Used by `ringctl launch` (and anyone else who needs the composed config without
    running Hydra's app): unknown groups, unknown keys and wrong types all come back as
    one line naming the key, the value given and what is allowed.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None, job_name="ringctl"):
        try:
            return hydra_compose(config_name="config", overrides=overrides)
        except Exception as exc:  # Hydra and OmegaConf raise many types; all mean bad input
            raise config_error_from(exc, overrides) from exc


def _override_value(overrides: list[str], key: str) -> str:
    """The value the user gave for `key` (with or without a +/++/~ prefix), else ''."""
    for item in overrides:
        name, _, value = item.partition("=")
        if name.lstrip("+~") == key:
            return value
    return ""


def _allowed_keys(overrides: list[str], key: str) -> str:
    """Keys allowed beside `key`: the children of its parent in the config composed
    with only the user's group selections."""
    from hydra import compose as hydra_compose
    from omegaconf import DictConfig

    group_names = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    groups = [o for o in overrides if o.partition("=")[0].lstrip("+~") in group_names]
    parent, _, _ = key.rpartition(".")
    try:
        node = hydra_compose(config_name="config", overrides=groups)
        for part in filter(None, parent.split(".")):
            node = node[part]
    except Exception:
        return "see `ringctl launch --cfg job`"
    if not isinstance(node, DictConfig):
        return "see `ringctl launch --cfg job`"
    prefix = parent + "." if parent else ""
    if len(node) == 0:
        return f"none yet; add one with +{key}=VALUE"
    return "keys " + ", ".join(prefix + str(k) for k in node.keys())


def _unparsable(overrides: list[str]) -> str | None:
    """The first override Hydra's grammar cannot parse, if any."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for item in overrides:
        try:
            parser.parse_overrides([item])
        except Exception:
            return item
    return None


def config_error_from(exc: Exception, overrides: list[str]) -> ConfigError:
    """Translate a Hydra/OmegaConf composition error into one ConfigError line."""
    import re

    from hydra.errors import MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    text = str(exc)
    bad = _unparsable(overrides)
    if bad is not None:
        key, _, value = bad.partition("=")
        return ConfigError(key.lstrip("+~") or "overrides", value if key else bad, "KEY=VALUE with a valid value (quote it: KEY='...')")
    if isinstance(exc, MissingConfigException) and exc.options is not None:
        # "Could not find 'topology/nope'" (a group option that does not exist)
        found = re.search(r"Could not (?:find|load) '([^']+)/([^'/]+)'", text)
        if found:
            group, given = found.group(1), found.group(2)
            options = sorted(o for o in exc.options if not o.startswith("schema"))
            return ConfigError(group.replace("/", "."), given, ", ".join(options))
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    found = re.search(r"Could not (?:override|append to config)[^']*'([^']+)'", text)
    key = found.group(1) if found else ""
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        full_key = str(cause.full_key)
        if "not in struct" in str(cause) or "Key '" in str(cause) and "not in" in str(cause):
            key = key or full_key
            return ConfigError(key, _override_value(overrides, key), _allowed_keys(overrides, key))
        key = full_key
        first = str(cause).splitlines()[0]
        return ConfigError(key, _override_value(overrides, key), first)
    if key:
        return ConfigError(key, _override_value(overrides, key), _allowed_keys(overrides, key))
    first = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
    return ConfigError("overrides", " ".join(overrides), first)
