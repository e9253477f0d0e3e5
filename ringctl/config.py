"""Typed configuration: dataclass schemas registered in Hydra's ConfigStore, YAML values.

One rule for defaults: the schemas here give every key its type and no value (MISSING);
the values live in the YAML files under conf/, where users read them. The root schema
`RingctlConfig` types every group before any option is chosen, so `topology.nodes=x`
fails as a wrong type even without `+topology=`. Entries whose names start with `_`
(`workload/_train`, `topology/_h100`, `launcher/_base`) are bases that options extend;
they are not offered as choices. Only the CLI and the launcher read these objects: the
runtime takes a RingPlan and tensors, never config.

conf/ ships inside the package as `ringctl.conf` (pyproject maps that package onto the
repository's conf/ directory), so a wheel composes like a clone. A user's own directory
(`--config-dir DIR` or RINGCTL_CONFIG_DIR) joins the search path after it: DIR/topology/
mycluster.yaml is then `+topology=mycluster`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ringctl.errors import ConfigError

#: the package that holds conf/ (see [tool.setuptools.package-dir] in pyproject.toml)
CONF_PACKAGE = "ringctl.conf"
#: conf/ as Hydra's `config_path` (for `hydra.main`) and the primary config's name
CONF_PATH = f"pkg://{CONF_PACKAGE}"
CONFIG_NAME = "config"
#: where the packaged YAML lies on disk: the clone's conf/ when installed editable,
#: site-packages/ringctl/conf from a wheel (for tools and tests that read the files)
CONF_DIR = Path(str(resources.files(CONF_PACKAGE)))
#: a user's config directory when --config-dir is not given
CONFIG_DIR_ENV = "RINGCTL_CONFIG_DIR"


@dataclass
class LinkConfig:
    """One link class of the fabric. Bandwidth is GB/s in one direction, per link (per NIC)."""

    bandwidth_GBps: float = MISSING
    latency_us: float = MISSING
    # switch: one port per rank (intra) / NIC (inter) into a switch | mesh: a link per pair
    links: str = MISSING
    # share of a switch port's rate flows to/from several peers at once get together
    # (1.0: credit-based fabrics; below 1: TCP over a rate-limited port; calibrate measures it)
    shared_port_efficiency: float = MISSING


@dataclass
class TopologyConfig:
    """The machine the job runs on, as the planner sees it (see ringctl/topology.py)."""

    name: str = MISSING
    nodes: int = MISSING
    # an int (every node) or a list with one int per node (uneven nodes). OmegaConf 2.3
    # types no union but `X | None`, and `list[int]` would reject the common `8`; so this
    # one key stays untyped here and Topology.from_config checks it (key, value, allowed).
    ranks_per_node: Any = MISSING
    gpus_per_node: int = MISSING
    nics_per_node: int = MISSING
    intra: LinkConfig = field(default_factory=LinkConfig)
    inter: LinkConfig = field(default_factory=LinkConfig)
    ring: str = MISSING
    # one_way | bidirectional (K/V heads split, half each way round the ring) | tokenring
    # (queries travel, partial results go straight back to their owners) | auto
    direction: str = MISSING
    # direction=auto leaves one_way only for a predicted gain of at least this fraction
    direction_min_gain: float = MISSING
    order: str = MISSING
    distribution: str = MISSING
    virtual_node_size: int | None = MISSING
    compute_tflops: float = MISSING
    # fixed microseconds of one ring step's compute besides its FLOPs (launches, merge, Python)
    step_overhead_us: float = MISSING
    # GB/s a rank's attention streams K/V (bounds few-query blocks: decode); null: FLOPs only
    memory_bandwidth_GBps: float | None = MISSING
    # GB (1e9 bytes) one rank may fill: device memory per GPU rank, a share of host RAM per
    # CPU rank; launch refuses a job whose predicted peak exceeds it. null: unknown, unchecked
    memory_per_rank_GB: float | None = MISSING


@dataclass
class LauncherConfig:
    """Where and how the job runs. `kind`: auto (slurm when `sbatch` is on PATH) | slurm | local."""

    kind: str = MISSING
    max_ranks_per_node: int | None = MISSING
    local_ranks_per_node: int = MISSING
    gpus_per_node: int | None = MISSING
    # CPUs (threads) per rank; null: SLURM 8 per GPU rank else 1, locally cores / local ranks
    cpus_per_task: int | None = MISSING
    time_min: int = MISSING
    partition: str | None = MISSING
    account: str | None = MISSING
    qos: str | None = MISSING
    constraint: str | None = MISSING
    exclusive: bool = MISSING
    # sbatch option -> value: a string, a number, or true for a flag without a value
    additional: dict[str, Any] = MISSING
    setup: list[str] = MISSING
    root: str = MISSING
    init_timeout_s: int = MISSING
    # sweeps: at most N array tasks running at once (sbatch --array=0-K%N); null: submitit's 256
    array_parallelism: int | None = MISSING
    # how each SLURM task starts python; null: this interpreter, or python3 in a container
    python: str | None = MISSING
    # a pyxis/enroot image every task runs in (srun --container-image); null: no container
    container_image: str | None = MISSING
    # SRC:DST[:FLAGS] mounts into it (srun --container-mounts); the runs root is always added
    container_mounts: list[str] = MISSING
    # requeues after the warning signal (time limit, preemption) before the job fails; 0: never
    max_requeues: int = MISSING
    # seconds before the time limit that the warning signal comes; null: submitit's 90
    signal_delay_s: int | None = MISSING
    # a peer silent this long is taken as dead or hung; null: init_timeout_s
    heartbeat_timeout_s: int | None = MISSING


@dataclass
class WorkloadConfig:
    """What every rank runs. Shapes are global: seq_len is the whole sequence."""

    name: str = MISSING
    batch: int = MISSING
    seq_len: int = MISSING
    heads: int = MISSING
    kv_heads: int = MISSING
    head_dim: int = MISSING
    dtype: str = MISSING
    layout: str = MISSING
    causal: bool = MISSING
    seed: int = MISSING
    # packed documents drawn with `seed` (ringctl.documents.parse_documents): null (one
    # sequence), "lognormal[:mean=N,sigma=X]", "fixed:mean=N" or a list of document lengths
    documents: Any = MISSING


@dataclass
class AttentionConfig(WorkloadConfig):
    """ring_attention fwd+bwd timing, plus an exactness check against SDPA in float64."""

    warmup: int = MISSING
    iters: int = MISSING
    check: bool = MISSING
    check_seq_len: int = MISSING
    check_tol: float = MISSING


@dataclass
class TrainConfig(WorkloadConfig):
    """A small causal transformer LM whose attention layers call ring_attention."""

    steps: int = MISSING
    vocab: int = MISSING
    layers: int = MISSING
    lr: float = MISSING
    checkpoint_every: int = MISSING


@dataclass
class CustomConfig(WorkloadConfig):
    """A user function `pkg.module:fn(cfg, ctx)` called on every rank."""

    entry: str = MISSING
    # the user's own arguments, handed to fn as they are
    args: dict[str, Any] = MISSING


@dataclass
class InferConfig(WorkloadConfig):
    """A multi-turn inference session on the train workload's model: a prompt prefilled
    across the ring into a sharded KV cache, turns of new tokens, greedy decode after each
    (ringctl.workloads.infer). seq_len is the model's context: prompt + turns + decoded
    tokens must fit in it."""

    prompt: int = MISSING
    # new tokens of each later turn, in order
    turns: list[int] = MISSING
    # greedy tokens generated after the prompt and after each turn
    decode: int = MISSING
    # pass_kv | pass_q | auto (ringctl.infer_plan: the cost model's faster one, per turn)
    mode: str = MISSING
    vocab: int = MISSING
    layers: int = MISSING
    # a train job's checkpoint file (step_*.pt) to take the weights from; null: the seed's
    checkpoint: str | None = MISSING
    # generate again in one process (SDPA, no cache) and compare the tokens
    check: bool = MISSING


@dataclass
class CalibrateConfig(WorkloadConfig):
    """`ringctl calibrate`: compute rate and links measured on the job's nodes, for the
    workload shape above; written as a topology YAML."""

    repeats: int = MISSING
    # also write the topology here (absolute path; the job folder always gets one)
    out: str | None = MISSING
    # the written topology's name (null: out's file name, else <topology.name>_calibrated)
    topology_name: str | None = MISSING


@dataclass
class WandbConfig:
    """Weights & Biases from rank 0. The API key comes from WANDB_API_KEY only, never config."""

    mode: str = MISSING
    project: str = MISSING
    entity: str | None = MISSING
    group: str | None = MISSING
    tags: list[str] = MISSING


@dataclass
class RingctlConfig:
    """The whole config: one typed node per group, typed before any option is selected."""

    topology: TopologyConfig = field(default_factory=TopologyConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    name: str = MISSING
    wait: bool = MISSING


#: the config groups (the root schema's typed nodes)
GROUPS = tuple(f.name for f in dataclasses.fields(RingctlConfig) if f.default_factory is not dataclasses.MISSING)

cs = ConfigStore.instance()
cs.store(name="ringctl_schema", node=RingctlConfig)
# a workload option extends its own schema (the root only knows WorkloadConfig's keys)
cs.store(group="workload", name="_attention", node=AttentionConfig)
cs.store(group="workload", name="_train", node=TrainConfig)
cs.store(group="workload", name="_custom", node=CustomConfig)
cs.store(group="workload", name="_calibrate", node=CalibrateConfig)
cs.store(group="workload", name="_infer", node=InferConfig)

#: allowed values of the string-valued keys the planner does not own, checked by
#: ringctl.launch.validate (layouts and dtypes: ringctl.plan.LAYOUTS, DTYPE_BYTES)
LAUNCHER_KINDS = ("auto", "slurm", "local")
WANDB_MODES = ("offline", "online", "disabled")


# ---- where configs come from: the package, then the user's directory ----------------------


def resolve_config_dir(config_dir: str | Path | None = None) -> Path | None:
    """The user's config directory, absolute: `config_dir` (--config-dir), else
    RINGCTL_CONFIG_DIR, else None. ConfigError when it is not a directory, or when a file in
    it has the name of a packaged one (the package comes first on the search path, so that
    file would be silently ignored)."""
    key = "--config-dir"
    if config_dir is None or str(config_dir) == "":
        config_dir, key = os.environ.get(CONFIG_DIR_ENV, ""), CONFIG_DIR_ENV
        if not config_dir:
            return None
    path = Path(config_dir).expanduser().absolute()
    if not path.is_dir():
        raise ConfigError(key, str(config_dir), "an existing directory holding group folders, e.g. DIR/topology/mycluster.yaml")
    for mine in sorted(path.glob("*.yaml")) + sorted(path.glob("*/*.yaml")):
        relative = mine.relative_to(path)
        if (CONF_DIR / relative).exists():
            raise ConfigError(
                key, str(config_dir), f"files with names ringctl does not ship ({relative} is packaged and would hide yours; rename it)"
            )
    return path


def pop_config_dir(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """(DIR, the other arguments) from `--config-dir DIR`, `--config-dir=DIR` or Hydra's
    spelling `-cd DIR`; DIR is None when absent (then RINGCTL_CONFIG_DIR applies)."""
    found: str | None = None
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        name, eq, value = arg.partition("=")
        if name in ("--config-dir", "-cd"):
            found = value if eq else next(args, "")
            if not found or found.startswith("-"):
                raise ConfigError("--config-dir", found, "a directory, e.g. --config-dir ~/ringctl-conf")
        else:
            rest.append(arg)
    return found, rest


def searchpath_overrides(config_dir: str | Path | None = None) -> list[str]:
    """The Hydra override that adds the user's directory to the search path, as a list
    (empty without one): put it in front of the overrides given to `hydra.main` or compose."""
    path = resolve_config_dir(config_dir)
    return [] if path is None else [_searchpath_override([f"file://{path}"])]


def _searchpath_override(entries: Sequence[str]) -> str:
    r"""`hydra.searchpath=['file:///a', ...]`, each entry quoted for Hydra's override grammar
    (inside quotes only \ and ' need escaping)."""
    quoted = ("'" + e.replace("\\", "\\\\").replace("'", "\\'") + "'" for e in entries)
    return f"hydra.searchpath=[{','.join(quoted)}]"


def _is_searchpath(override: str) -> bool:
    return override.partition("=")[0].lstrip("+~") == "hydra.searchpath"


def compose(overrides: Sequence[str] = (), config_dir: str | Path | None = None) -> DictConfig:
    """Compose the packaged conf/ (plus `config_dir`, else RINGCTL_CONFIG_DIR) with Hydra's
    compose API; any composition error becomes a ConfigError.

    Used by `ringctl plan` and `ringctl launch` (and anyone else who needs the composed
    config without running Hydra's app): unknown groups, unknown keys, wrong types and keys
    left unset all come back as one line naming the key, the value given and what is allowed.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    args = searchpath_overrides(config_dir) + list(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONF_PACKAGE, version_base=None, job_name="ringctl"):
        try:
            cfg = hydra_compose(config_name=CONFIG_NAME, overrides=args)
        except Exception as exc:  # Hydra and OmegaConf raise many types; all mean bad input
            raise config_error_from(exc, args) from exc
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        key = min(missing)
        group = key.partition(".")[0]
        where = f"the selected {group} file" if group in GROUPS else "conf/config.yaml"
        raise ConfigError(key, MISSING, f"a value: {where} leaves it unset; set it there or pass {key}=VALUE")
    return cfg


# ---- `ringctl launch --help`: the groups and their choices, bases left out ----------------


def _config_groups(_root_: Any) -> str:
    """The config groups and their options for the help text, like Hydra's $APP_CONFIG_GROUPS
    but without the bases (names starting with `_`), and with the user's directory when
    the command line added one (hydra.searchpath)."""
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        return ", ".join(GROUPS)
    loader = GlobalHydra.instance().config_loader()
    searchpath = list(OmegaConf.select(_root_, "hydra.searchpath", default=None) or [])
    overrides = [_searchpath_override(searchpath)] if searchpath else []
    lines = []
    for group in GROUPS:
        options = loader.get_group_options(group, overrides=overrides)
        lines.append(f"{group}: {', '.join(sorted(o for o in options if not o.startswith('_')))}")
    return "\n".join(lines)


OmegaConf.register_new_resolver("ringctl.config_groups", _config_groups, replace=True)


# ---- composition errors as one line -------------------------------------------------------


def _override_value(overrides: Sequence[str], key: str) -> str:
    """The value the user gave for `key` (with or without a +/++/~ prefix), else ''."""
    for item in overrides:
        name, _, value = item.partition("=")
        if name.lstrip("+~") == key:
            return value
    return ""


def _allowed_keys(overrides: Sequence[str], key: str) -> str:
    """Keys allowed beside `key`: the children of its parent in the config composed
    with only the user's group selections (and search path)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    kept = [o for o in overrides if o.partition("=")[0].lstrip("+~") in GROUPS or _is_searchpath(o)]
    parent, _, _ = key.rpartition(".")
    try:
        if GlobalHydra.instance().is_initialized():
            node: Any = hydra_compose(config_name=CONFIG_NAME, overrides=kept)
        else:
            with initialize_config_module(config_module=CONF_PACKAGE, version_base=None, job_name="ringctl"):
                node = hydra_compose(config_name=CONFIG_NAME, overrides=kept)
        for part in filter(None, parent.split(".")):
            node = node[part]
    except Exception:  # only a hint inside an error being reported: never mask that error  # noqa: BLE001
        return "see `ringctl launch --cfg job`"
    if not isinstance(node, DictConfig):
        return "see `ringctl launch --cfg job`"
    prefix = parent + "." if parent else ""
    if len(node) == 0:
        return f"none yet; add one with +{key}=VALUE"
    return "keys " + ", ".join(prefix + str(k) for k in node)


def _unparsable(overrides: Sequence[str]) -> str | None:
    """The first override Hydra's grammar cannot parse, if any."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for item in overrides:
        try:
            parser.parse_overrides([item])
        except HydraException:  # the parser reports every grammar error as one
            return item
    return None


def config_error_from(exc: Exception, overrides: Sequence[str]) -> ConfigError:
    """Translate a Hydra/OmegaConf composition error into one ConfigError line."""
    import re

    from hydra.errors import MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides)
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
            options = sorted(o for o in exc.options if not o.startswith("_"))
            return ConfigError(group.replace("/", "."), given, ", ".join(options))
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    found = re.search(r"Could not (?:override|append to config)[^']*'([^']+)'", text)
    key = found.group(1) if found else ""
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        full_key = str(cause.full_key)
        if "not in struct" in str(cause) or ("Key '" in str(cause) and "not in" in str(cause)):
            key = key or full_key
            return ConfigError(key, _override_value(overrides, key), _allowed_keys(overrides, key))
        key = full_key
        first = str(cause).splitlines()[0]
        return ConfigError(key, _override_value(overrides, key), first)
    if key:
        return ConfigError(key, _override_value(overrides, key), _allowed_keys(overrides, key))
    first = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
    return ConfigError("overrides", " ".join(o for o in overrides if not _is_searchpath(o)), first)
