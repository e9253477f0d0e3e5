"""A Hydra Launcher that validates every sweep point, then submits them all at once.

Hydra's sweeper expands `-m a=1,2 b=x,y` into points and hands them here. Each point is
composed and checked by ringctl.launch.validate first; one bad point stops the sweep
before anything is submitted (exit 2). Then ringctl's Launcher submits every point in one
submitit `executor.batch()`: one SLURM job array (local processes without SLURM). All
points share one W&B group named after the sweep. A table maps each point to its job id.

The outcome leaves through SystemExit (2: a bad point, nothing submitted; 1: a job failed):
Hydra's Launcher API has no exit status of its own, and its FAILED JobReturn becomes Hydra's
traceback with exit 1 for every cause alike. `ringctl launch` runs this through the public
`hydra.main`, which passes SystemExit through unchanged (see ringctl/commands/launch.py).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, open_dict


class RingctlLauncher(Launcher):
    def __init__(self, wait: bool = False, dry_run: bool = False, preflight: bool = False) -> None:
        self.wait = wait
        self.dry_run = dry_run or preflight
        self.preflight = preflight
        self.config: DictConfig | None = None
        self.hydra_context: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config

    def compose_points(self, job_overrides: Sequence[Sequence[str]]) -> list[tuple[DictConfig, Any]]:
        """Every point's config with its validated Resources; exits 2 (nothing submitted)
        if any is bad."""
        from ringctl.errors import ConfigError
        from ringctl.launch import validate

        points, errors = [], []
        for overrides in job_overrides:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg):
                cfg.pop("hydra", None)
            try:
                points.append((cfg, validate(cfg)))
            except ConfigError as exc:
                errors.append(f"ringctl launch: point [{' '.join(_shown(overrides))}]: {exc}")
        if errors:
            print("\n".join(errors), file=sys.stderr)
            raise SystemExit(2)
        return points

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from ringctl.launch import SubmissionError, make_launcher

        points = self.compose_points(job_overrides)
        first = points[0][0]
        name = f"sweep-{first.get('name', 'ringctl')}"
        group = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        for cfg, _ in points:
            if not cfg.wandb.get("group"):
                cfg.wandb.group = group  # one W&B group per sweep
        launcher = make_launcher(points[0][1], first.launcher.get("root"))
        shown = [tuple(_shown(o)) for o in job_overrides]
        if self.dry_run:
            from ringctl.launch import show_dry_run

            raise SystemExit(show_dry_run(launcher, points, name, shown, check=self.preflight))
        try:
            jobs = launcher.submit(points, name=name, overrides=shown)
        except SubmissionError as exc:
            print(f"ringctl launch: {exc}", file=sys.stderr)
            raise SystemExit(2 if exc.user_input else 1) from None
        _print_table(jobs, launcher.kind, group)
        code = 0
        if self.wait:
            from ringctl.jobs import follow

            code = follow(jobs)
        else:
            print("not waiting (add wait=true to follow); see: ringctl status")
        if code:
            raise SystemExit(code)
        return [
            JobReturn(
                overrides=list(o), cfg=cfg, hydra_cfg=self.config, working_dir=str(job.folder),
                task_name=name, status=JobStatus.COMPLETED, _return_value=job.job_id,
            )
            for o, (cfg, _), job in zip(job_overrides, points, jobs)
        ]


def _shown(overrides: Sequence[str]) -> list[str]:
    """The user's part of a point's overrides (ringctl's own hydra/ settings left out)."""
    return [o for o in overrides if not o.startswith("hydra")]


def _varying(jobs: list[Any]) -> list[str]:
    """Each point's overrides that differ between points (the swept keys)."""
    common = set.intersection(*(set(j.overrides) for j in jobs)) if len(jobs) > 1 else set()
    return [" ".join(o for o in j.overrides if o not in common) or "(defaults)" for j in jobs]


def _print_table(jobs: list[Any], kind: str, name: str) -> None:
    from rich.table import Table

    from ringctl.jobs import console

    arrays = sorted({j.job_id.split("_")[0] for j in jobs if "_" in j.job_id})
    if kind == "slurm" and arrays:  # several only when points differ in resources or sbatch options
        array = ("array " if len(arrays) == 1 else "arrays ") + ", ".join(arrays)
    else:
        array = f"{len(jobs)} jobs"
    table = Table(title=f"{name}: {array} ({kind})", title_justify="left")
    table.add_column("point")
    table.add_column("job id")
    table.add_column("folder")
    for job, point in zip(jobs, _varying(jobs)):
        table.add_row(point, job.job_id, str(Path(job.folder)))
    console().print(table)
