"""Weights & Biases from rank 0: config, per-step metrics, summary, the plan picture.

Offline by default: the run folder lives inside the job folder and ringctl prints the
`wandb sync` command. Online only when `wandb.mode=online` AND WANDB_API_KEY is in the
environment; the key is read by wandb from the environment and never written by ringctl
(the config it logs is the job config, which has no key). Other ranks get a no-op.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class Metrics:
    """One W&B run for the whole job (rank 0); `log`/`finish` are no-ops elsewhere."""

    def __init__(self, cfg: Any, folder: Path, rank: int, *, plan: Any = None, topology: Any = None) -> None:
        self.run: Any = None
        self.folder = folder
        self.mode = str(cfg.wandb.mode)
        if rank != 0 or self.mode == "disabled":
            return
        if self.mode == "online" and not os.environ.get("WANDB_API_KEY"):
            raise RuntimeError("wandb.mode=online needs WANDB_API_KEY in the environment (use wandb.mode=offline)")
        import wandb
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(cfg, resolve=True)
        self.run = wandb.init(
            mode=self.mode,
            dir=str(folder),
            project=str(cfg.wandb.project),
            entity=cfg.wandb.get("entity") or None,
            group=cfg.wandb.get("group") or None,
            tags=list(cfg.wandb.get("tags") or []),
            name=f"{cfg.get('name', 'ringctl')}-{folder.name}",
            config=config,
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        if plan is not None:
            self._log_plan(plan, topology, cfg.workload)

    def _log_plan(self, plan: Any, topology: Any, workload_cfg: Any) -> None:
        """The plan picture (ringctl.report) as a W&B image and a file in the job folder."""
        import wandb

        from ringctl.plan import Workload
        from ringctl.report import plan_png

        path = self.folder / "plan.png"
        plan_png(plan, path, workload=Workload.from_config(workload_cfg))
        self.run.log({"plan": wandb.Image(str(path))}, step=0)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def finish(self, *, summary: dict[str, Any] | None = None, failed: bool = False) -> dict[str, Any]:
        """Write the summary, close the run; returns where it lives and how to sync it."""
        if self.run is None:
            return {"mode": self.mode}
        for key, value in (summary or {}).items():
            self.run.summary[key] = value
        run_dir = Path(self.run.dir).parent
        self.run.finish(exit_code=1 if failed else 0)
        self.run = None
        info: dict[str, Any] = {"mode": self.mode, "run_dir": str(run_dir)}
        if self.mode == "offline":
            info["sync_command"] = f"wandb sync {run_dir}"
        return info
