"""Weights & Biases from rank 0: config, per-step metrics, summary, the plan picture.

Offline by default: the run folder lives inside the job folder and ringctl prints the
`wandb sync` command. Online only when `wandb.mode=online` AND WANDB_API_KEY is in the
environment; the key is read by wandb from the environment and never written by ringctl
(the config it logs is the job config, which has no key). Other ranks get a no-op.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any


class Metrics:
    """One W&B run for the whole job (rank 0); `log`/`finish` are no-ops elsewhere."""

    def __init__(
        self, cfg: Any, folder: Path, rank: int, *, plan: Any = None, topology: Any = None,
        run_id: str | None = None, resumed: bool = False,
    ) -> None:
        """`run_id`: the job's one W&B run (kept in the job folder), continued by every
        attempt of a requeued job (`resume="allow"`); `resumed`: this is such a later
        attempt, so the plan picture goes with its first logged step, not step 0."""
        self.run: Any = None
        self.folder = folder
        self.mode = str(cfg.wandb.mode)
        self._pending: dict[str, Any] = {}
        self.error = ""  # what stopped W&B, if it failed during the run
        self.finished = rank != 0 or self.mode == "disabled"  # the run closed cleanly, its data written
        if rank != 0 or self.mode == "disabled":
            return
        if self.mode == "online" and not os.environ.get("WANDB_API_KEY"):
            raise RuntimeError("wandb.mode=online needs WANDB_API_KEY in the environment (use wandb.mode=offline)")
        import wandb
        from omegaconf import OmegaConf

        config: Any = OmegaConf.to_container(cfg, resolve=True)  # a dict: cfg is a DictConfig
        mode: Any = self.mode  # checked by ringctl.launch.validate (WANDB_MODES)
        self.run = wandb.init(
            mode=mode,
            dir=str(folder),
            project=str(cfg.wandb.project),
            entity=cfg.wandb.get("entity") or None,
            group=cfg.wandb.get("group") or None,
            tags=list(cfg.wandb.get("tags") or []),
            name=f"{cfg.get('name', 'ringctl')}-{folder.name}",
            config=config,
            settings=wandb.Settings(console="off", x_disable_stats=True),
            id=run_id,
            resume="allow" if run_id else None,
        )
        if plan is not None:
            image = self._plan_image(plan, cfg.workload)
            if resumed:  # the resumed run is past step 0: the (re-)planned ring joins its next step
                self._pending = {"plan": image}
            else:
                self.run.log({"plan": image}, step=0)

    def _plan_image(self, plan: Any, workload_cfg: Any) -> Any:
        """The plan picture (ringctl.report) as a W&B image and a file in the job folder."""
        import wandb

        from ringctl.plan import Workload
        from ringctl.report import plan_png

        path = self.folder / "plan.png"
        plan_png(plan, path, workload=Workload.from_config(workload_cfg))
        return wandb.Image(str(path))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log one step. W&B failing (its service process killed, as SLURM does to every
        process of a job it requeues or cancels) never fails the job: W&B is switched off
        with a warning, and results.json still gets everything."""
        if self.run is not None:
            try:
                self.run.log({**self._pending, **metrics}, step=step)
            except Exception as exc:  # noqa: BLE001 - wandb raises many types; none may end the job
                self._broken(exc)
            self._pending = {}

    def replay(self, rows: list[tuple[int, dict[str, Any]]]) -> int:
        """Log again the steps an earlier attempt logged but W&B lost (its service process was
        killed with the job before writing them), from the checkpoint's copy. Steps the run
        already holds on the server (a resumed online run starts after them) are skipped.
        Returns how many steps were logged."""
        if self.run is None:
            return 0
        start = int(getattr(self.run, "starting_step", 0) or 0)
        count = 0
        for step, row in rows:
            if step >= start:
                self.log({**row, "train/replayed": True}, step=step)
                count += 1
        return count

    def _broken(self, exc: BaseException) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        print(f"ringctl: W&B stopped logging: {self.error}", file=sys.stderr, flush=True)
        self.run = None

    def finish(
        self, *, summary: dict[str, Any] | None = None, failed: bool = False, preempting: bool = False
    ) -> dict[str, Any]:
        """Write the summary, close the run; returns where it lives and how to sync it.
        `preempting`: the job requeues and a later attempt continues this run."""
        if self.run is None:
            return {"mode": self.mode, **({"error": self.error} if self.error else {})}
        run_dir = Path(self.run.dir).parent
        try:
            for key, value in (summary or {}).items():
                self.run.summary[key] = value
            if preempting:
                self.run.mark_preempting()
            self.run.finish(exit_code=1 if failed else 0)
            self.finished = not self.error
        except Exception as exc:  # noqa: BLE001 - as in log(): W&B never fails the job
            self._broken(exc)
        self.run = None
        info: dict[str, Any] = {"mode": self.mode, "run_dir": str(run_dir)}
        if self.error:
            info["error"] = self.error
        if self.mode == "offline":
            # a requeued job's attempts each left a folder of the same run (same id): sync all
            dirs = sorted(run_dir.parent.glob(f"offline-run-*-{run_dir.name.rsplit('-', 1)[-1]}")) or [run_dir]
            info["sync_command"] = "wandb sync " + " ".join(str(d) for d in dirs)
            info["run_dirs"] = [str(d) for d in dirs]
        return info
