"""Config composition (Hydra's compose API) for every group, and golden sbatch files.

Golden files: tests/golden/*.sbatch hold the exact sbatch scripts submitit writes for
ringctl's parameters. After an intended change, regenerate them with
    RINGCTL_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_config.py
and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from submitit.slurm.slurm import _make_sbatch_string

from ringctl.config import CONF_DIR, AttentionConfig, CustomConfig, LauncherConfig, TrainConfig, WandbConfig, compose
from ringctl.errors import ConfigError
from ringctl.launch import resources, sbatch_parameters, validate

GOLDEN = Path(__file__).parent / "golden"


def test_defaults_compose_to_typed_groups() -> None:
    cfg = compose([])
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
    """Each YAML under conf/<group>/ (topology included) composes with the root config."""
    groups = [p for p in CONF_DIR.iterdir() if p.is_dir()]
    assert {g.name for g in groups} >= {"topology", "launcher", "workload", "wandb"}
    for group in groups:
        for path in sorted(group.glob("*.yaml")):
            prefix = "+" if group.name == "topology" else ""
            cfg = compose([f"{prefix}{group.name}={path.stem}"])
            assert group.name in cfg


def test_typed_override_rejected() -> None:
    with pytest.raises(ConfigError, match=r"workload\.seq_len='many'"):
        compose(["workload.seq_len=many"])


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
    if os.environ.get("RINGCTL_REGEN_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing {path}; regenerate: RINGCTL_REGEN_GOLDEN=1 pytest {__file__}"
    assert text == path.read_text(), f"sbatch changed; if intended: RINGCTL_REGEN_GOLDEN=1 pytest {__file__}"
