"""Following ringctl jobs: find them, read their state, show progress and results.

Library code under both the CLI (`ringctl launch`, `status`, `logs`, `cancel`) and the Hydra
sweep plugin, so neither imports the other. A job is found through the index `ringctl launch`
keeps (<runs root>/index.jsonl: job id -> job folder) or given as its folder; its state
comes from SLURM (sacct through submitit) or, for local jobs, from the controller process
and submitit's result files.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# submitit/SLURM state -> what the progress display shows
STAGES = {
    "PENDING": "queued", "REQUEUED": "queued", "CONFIGURING": "queued", "UNKNOWN": "queued",
    "NO PROCESS AND NO RESULT": "queued", "RUNNING": "running", "COMPLETING": "running",
    "COMPLETED": "done", "FINISHED": "done", "CANCELLED": "cancelled",
}
COLORS = {"queued": "yellow", "running": "cyan", "done": "green", "failed": "red", "cancelled": "magenta"}


def console() -> Any:
    """Rich console; wide when output goes to a file or pipe (logs, CI), so paths stay whole."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


def stage(state: str) -> str:
    """queued | running | done | failed | cancelled, from any SLURM or local state."""
    state = state.upper()
    if state.startswith("CANCELLED"):
        return "cancelled"
    return STAGES.get(state, "failed")


CANCELLED_MARK = "ringctl_cancelled"  # written into a local job's folder by `ringctl cancel`


@dataclass
class JobRef:
    """A job found on disk: its id, folder and backend."""

    job_id: str
    folder: Path
    kind: str  # slurm | local
    name: str = ""
    overrides: tuple[str, ...] = ()

    def submitit_job(self) -> Any:
        import submitit

        cls = submitit.SlurmJob if self.kind == "slurm" else submitit.LocalJob
        return cls(folder=self.folder, job_id=self.job_id)

    def task_outcome(self, task: int = 0) -> str | None:
        """'success' | 'error' from submitit's result pickle, None while there is none."""
        path = self.folder / f"{self.job_id}_{task}_result.pkl"
        if not path.exists():
            return None
        try:
            with open(path, "rb") as f:
                return str(pickle.load(f)[0])
        except (OSError, EOFError, pickle.UnpicklingError):
            return None

    def state(self) -> str:
        """SLURM's state (sacct) or, locally: RUNNING / COMPLETED / FAILED / CANCELLED."""
        outcome = self.task_outcome()
        if self.kind == "slurm":
            state = str(self.submitit_job().state)
            if state.upper() in ("UNKNOWN", "", "RUNNING", "COMPLETING") and outcome is not None:
                # sacct lags behind the result file rank 0 writes as it ends
                return "COMPLETED" if outcome == "success" else "FAILED"
            return state
        if (self.folder / CANCELLED_MARK).exists():
            return "CANCELLED"
        if outcome is not None:
            return "COMPLETED" if outcome == "success" else "FAILED"
        return "RUNNING" if _alive(int(self.job_id)) else "FAILED"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (finished, parent not reaped yet) is not running
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def find(spec: str, root: Path) -> JobRef:
    """A job id from the index under `root`, or a job folder (absolute or relative path)."""
    from ringctl.launch import read_index

    for entry in reversed(read_index(root)):
        if entry["job_id"] == spec:
            return JobRef(entry["job_id"], Path(entry["folder"]), entry["kind"], entry.get("name", ""), tuple(entry.get("overrides", ())))
    path = Path(spec)
    if path.is_dir():
        submitted = sorted(path.glob("*_submitted.pkl"))
        if submitted:
            job_id = submitted[0].name[: -len("_submitted.pkl")]
            kind = "slurm" if list(path.glob("*_submission.sh")) or not job_id.isdigit() else "local"
            for entry in read_index(root):
                if Path(entry["folder"]).resolve() == path.resolve():
                    kind = entry["kind"]
            return JobRef(job_id, path.resolve(), kind)
    raise LookupError(
        f"job {spec!r} not found: not a job id in {root / 'index.jsonl'} nor a job folder "
        "(set RINGCTL_RUNS to the runs root `ringctl launch` used)"
    )


# ---- following jobs: live progress, then the result summary -------------------------------


def follow(jobs: list[Any], poll_s: float = 1.0) -> int:
    """Rich live table (queued -> running -> done per job), then each job's summary.
    Returns 0 when all succeeded, 1 otherwise (after printing the failing traceback)."""
    from rich.live import Live

    out = console()
    started = time.time()
    try:
        with Live(_progress_table(jobs, started), console=out, refresh_per_second=4, transient=False) as live:
            while not all(j.job.done() for j in jobs):
                time.sleep(poll_s)
                live.update(_progress_table(jobs, started))
            live.update(_progress_table(jobs, started))
        if not out.is_terminal:  # Live leaves its last frame unterminated on a pipe/file
            out.line()
    except KeyboardInterrupt:
        out.print("stopped following; the jobs keep running (ringctl status / ringctl cancel)")
        return 130
    failed = 0
    for item in jobs:
        failed += not _report(item, out)
    return 1 if failed else 0


def _progress_table(jobs: list[Any], started: float) -> Any:
    from rich.table import Table

    table = Table(title=f"ringctl jobs ({time.time() - started:.0f} s)", title_justify="left")
    for column in ("job", "stage", "state", "folder"):
        table.add_column(column)
    for item in jobs:
        state = _state(item)
        name = stage(state)
        table.add_row(item.job_id, f"[{COLORS.get(name, 'white')}]{name}[/]", state, str(item.folder))
    return table


def _state(item: Any) -> str:
    """SLURM's state, or the local controller's; a finished job's outcome from its result."""
    return JobRef(item.job_id, item.folder, item.kind).state()


def _report(item: Any, console: Any) -> bool:
    """Print one finished job's result summary, or its traceback. True when it succeeded."""
    try:
        item.job.results()
    except Exception as exc:  # submitit's FailedJobError carries the job's traceback
        console.print(f"[red]job {item.job_id} failed[/] (folder {item.folder})")
        print(root_cause(item.folder) or str(exc), file=sys.stderr)
        return False
    path = item.folder / "results.json"
    if not path.exists():
        console.print(f"[red]job {item.job_id} finished without {path}[/]")
        return False
    summarise(json.loads(path.read_text()), path, console)
    return True


def root_cause(folder: Path) -> str | None:
    """The first traceback a rank wrote (rank<R>.error, by time): the peers' errors that
    follow it are only "connection closed"."""
    errors = sorted(folder.glob("rank*.error"), key=lambda p: p.stat().st_mtime)
    if not errors:
        return None
    first = errors[0]
    others = ", ".join(p.stem for p in errors[1:])
    note = f" (then {others} failed too)" if others else ""
    return f"{first.stem} failed first{note}:\n{first.read_text()}"


def summarise(results: dict[str, Any], path: Path, console: Any) -> None:
    """The few figures a user looks at first; everything else is in results.json."""
    from rich.table import Table

    plan = results.get("plan", {})
    table = Table(title=f"job {results.get('job_id', '')}: {results['config']['workload']['name']}", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value")
    names = results.get("node_names", [])
    where = "virtual nodes on " if results.get("virtual_nodes") else ""
    table.add_row("nodes", f"{results.get('nodes')} ({where}{', '.join(dict.fromkeys(names))}); {len(names)} ranks")
    table.add_row("plan", f"{plan.get('ring', plan.get('algorithm', '?'))} ring, order {plan.get('ring_order')}")
    times = results.get("times", {})
    for key, value in times.items():
        if isinstance(value, (int, float)):
            table.add_row(key, f"{value * 1e3:.1f} ms" if key.endswith("_s") else str(value))
    for phase, links in results.get("bytes", {}).items():
        if isinstance(links, dict):
            for link, figures in links.items():
                table.add_row(
                    f"bytes {phase} {link}",
                    f"measured {figures['measured_total']:,} / predicted {figures['predicted_total']:,}",
                )
    if "check" in results:
        check = results["check"]
        verdict = "[green]passed[/]" if check["passed"] else "[red]FAILED[/]"
        table.add_row("exactness (float64 vs SDPA)", f"max error {check['max_error']:.2e} <= {check['tol']:.0e}: {verdict}")
    if "losses" in results:
        losses = results["losses"]
        table.add_row("loss", f"{losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
    console.print(table)
    wandb = results.get("wandb", {})
    if wandb.get("sync_command"):
        print(f"W&B offline run; to upload: {wandb['sync_command']}")
    print(f"results: {path}")
