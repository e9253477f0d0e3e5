"""Config composition (Hydra's compose API) for every group, and golden sbatch files.

Golden files: tests/golden/*.sbatch hold the exact sbatch scripts submitit writes for
ringctl's parameters. After an intended change, regenerate them with
    RINGCTL_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_config.py
(that run fails for each file it rewrites), review the diff, and rerun without it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml
from omegaconf import MISSING, OmegaConf
from submitit.slurm.slurm import _make_sbatch_string

import ringctl.config
from ringctl.config import (
    CONF_DIR,
    AttentionConfig,
    CustomConfig,
    LauncherConfig,
    RingctlConfig,
    TopologyConfig,
    TrainConfig,
    WandbConfig,
    compose,
)
from ringctl.errors import ConfigError
from ringctl.launch import resources, sbatch_parameters, validate

GOLDEN = Path(__file__).parent / "golden"


def test_defaults_compose_to_typed_groups() -> None:
    cfg = compose([])
    assert OmegaConf.get_type(cfg) is RingctlConfig
    assert OmegaConf.get_type(cfg.topology) is TopologyConfig  # typed before any +topology=
    assert cfg.topology.name == "local" and cfg.topology.nodes == 1
    assert OmegaConf.get_type(cfg.launcher) is LauncherConfig
    assert OmegaConf.get_type(cfg.workload) is AttentionConfig
    assert OmegaConf.get_type(cfg.wandb) is WandbConfig
    assert cfg.launcher.kind == "auto" and cfg.wandb.mode == "offline" and cfg.wait is True


@pytest.mark.parametrize("option", ["auto", "slurm", "local"])
def test_launcher_group(option: str) -> None:
    cfg = compose([f"launcher={option}"])
    assert OmegaConf.get_type(cfg.launcher) is LauncherConfig
    assert cfg.launcher.kind == option


@pytest.mark.parametrize(
    ("option", "schema"), [("attention", AttentionConfig), ("train", TrainConfig), ("custom", CustomConfig)]
)
def test_workload_group(option: str, schema: type) -> None:
    cfg = compose([f"workload={option}"])
    assert OmegaConf.get_type(cfg.workload) is schema
    assert cfg.workload.name == option


@pytest.mark.parametrize("option", ["offline", "online", "disabled"])
def test_wandb_group(option: str) -> None:
    cfg = compose([f"wandb={option}"])
    assert cfg.wandb.mode == option
    assert "api_key" not in cfg.wandb and "key" not in cfg.wandb  # keys come from the environment only


def test_every_group_file_composes() -> None:
    """Each option under conf/<group>/ (topology included) composes with the root config;
    the bases (`_name.yaml`) are what the options extend, not options."""
    groups = [p for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "__pycache__"]
    assert {g.name for g in groups} == {"topology", "launcher", "workload", "wandb"}
    for group in groups:
        for path in sorted(p for p in group.glob("*.yaml") if not p.name.startswith("_")):
            prefix = "+" if group.name == "topology" else ""
            cfg = compose([f"{prefix}{group.name}={path.stem}"])
            assert group.name in cfg


def test_typed_override_rejected() -> None:
    with pytest.raises(ConfigError, match=r"workload\.seq_len='many'"):
        compose(["workload.seq_len=many"])
    with pytest.raises(ConfigError, match=r"topology\.nodes='two'.*Integer"):
        compose(["topology.nodes=two"])  # typed without a +topology= selection
    with pytest.raises(ConfigError, match=r"launcher\.partition"):
        compose(["launcher.partition=[a,b]"])  # str | None: a list is no partition


#: the one schema field whose value is not MISSING: its line belongs to the thread-count
#: change (null: 8 CPUs per GPU rank); its YAML value (launcher/_base.yaml) agrees
SCHEMA_VALUE_EXCEPTIONS: dict[tuple[str, str], object] = {}


SCHEMAS = [v for v in vars(ringctl.config).values()
           if isinstance(v, type) and dataclasses.is_dataclass(v) and v.__module__ == "ringctl.config"]


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.__name__)
def test_schemas_hold_types_and_yaml_holds_values(schema: type) -> None:
    """Each default is stated once, in conf/: a schema field is MISSING or a nested schema."""
    for f in dataclasses.fields(schema):
        if f.default_factory is not dataclasses.MISSING:
            assert dataclasses.is_dataclass(f.default_factory), (schema.__name__, f.name)
            continue
        expected = SCHEMA_VALUE_EXCEPTIONS.get((schema.__name__, f.name), MISSING)
        assert f.default == expected, f"{schema.__name__}.{f.name} = {f.default!r}: its value belongs in conf/"
    assert OmegaConf.get_type(OmegaConf.structured(schema)) is schema  # OmegaConf takes every annotation


def test_h100_topologies_state_only_what_differs() -> None:
    """1node/2node/4node/16node extend topology/_h100.yaml and add their name and size."""
    base = yaml.safe_load((CONF_DIR / "topology" / "_h100.yaml").read_text())
    for name, nodes in (("1node", 1), ("2node", 2), ("4node", 4), ("16node", 16)):
        text = yaml.safe_load((CONF_DIR / "topology" / f"{name}.yaml").read_text())
        assert text["defaults"] == ["_h100", "_self_"] and set(text) <= {"defaults", "name", "nodes", "ring"}, name
        topo = compose([f"+topology={name}"]).topology
        assert (topo.name, topo.nodes) == (name, nodes)
        assert topo.ranks_per_node == base["ranks_per_node"] and topo.inter.bandwidth_GBps == base["inter"]["bandwidth_GBps"]


def test_key_left_unset_is_named(tmp_path: Path) -> None:
    """A user's launcher option that forgets `kind`: one line naming the key."""
    (tmp_path / "launcher").mkdir()
    (tmp_path / "launcher" / "mine.yaml").write_text("defaults:\n  - _base\n  - _self_\ntime_min: 5\n")
    with pytest.raises(ConfigError) as info:
        compose(["launcher=mine"], config_dir=tmp_path)
    assert info.value.key == "launcher.kind" and "launcher.kind=VALUE" in str(info.value)
    assert compose(["launcher=mine", "launcher.kind=local"], config_dir=tmp_path).launcher.time_min == 5


def test_local_default_is_two_virtual_nodes() -> None:
    """The embedded default: 2node topology, local processes capped at 2 ranks per node."""
    cfg = compose(["+topology=2node", "launcher=local"])
    res = validate(cfg)
    assert (res.kind, res.nodes, res.ranks_per_node, res.virtual_node_size) == ("local", 2, 2, 2)
    assert res.world_size == 4 and res.gpus_per_node == 0


def test_slurm_tasks_per_node_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RINGCTL_MAX_RANKS_PER_NODE", raising=False)
    cfg = compose(["+topology=2node", "launcher=slurm", "launcher.max_ranks_per_node=3", "launcher.gpus_per_node=0"])
    res = resources(cfg)
    assert (res.kind, res.nodes, res.ranks_per_node, res.virtual_node_size) == ("slurm", 2, 3, None)
    params = sbatch_parameters(cfg, res, "ringctl")
    assert params["nodes"] == 2 and params["ntasks_per_node"] == 3 and "gpus_per_node" not in params


GOLDEN_CASES = {
    "2node_slurm": ["launcher.max_ranks_per_node=2", "launcher.gpus_per_node=0"],
    "2node_slurm_options": [
        "launcher.partition=debug", "launcher.account=proj", "launcher.qos=high", "launcher.time_min=30",
        "launcher.exclusive=true", "+launcher.additional.mem=16G", "+launcher.additional.mail-type=END",
        "launcher.setup=[module load cuda]",
    ],
}


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
@pytest.mark.parametrize("array", [None, 4])
def test_golden_sbatch(case: str, array: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RINGCTL_MAX_RANKS_PER_NODE", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no sinfo: GPUs as the topology says
    cfg = compose(["+topology=2node", "launcher=slurm", *GOLDEN_CASES[case]])
    res = resources(cfg)
    params = sbatch_parameters(cfg, res, "ringctl")
    text = _make_sbatch_string(
        command="<PYTHON> -u -m submitit.core._submit /runs/JOB", folder="/runs/JOB", map_count=array, **params
    )
    path = GOLDEN / f"{case}{'_array' + str(array) if array else ''}.sbatch"
    hint = f"if intended: RINGCTL_REGEN_GOLDEN=1 pytest {__file__}, review the diff, rerun without it"
    if os.environ.get("RINGCTL_REGEN_GOLDEN") and (not path.exists() or path.read_text() != text):
        # a run that rewrites a golden file never passes: its diff must be reviewed first
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        pytest.fail(f"regenerated {path}: review `git diff {path}`, then rerun without RINGCTL_REGEN_GOLDEN")
    assert path.exists(), f"missing {path}; {hint}"
    assert text == path.read_text(), f"sbatch for {case} (array={array}) differs from {path}; {hint}"
