"""`ringctl status [JOB|FOLDER]`, `ringctl logs JOB [--rank R] [--follow]`, `ringctl cancel JOB`.

They work from any shell: a job is found through the index that `ringctl launch` keeps
(<runs root>/index.jsonl: job id -> job folder; the root is $RINGCTL_RUNS or ./runs), or
given directly as its folder; its state comes from SLURM (sacct through submitit) or, for
local jobs, from the controller process and submitit's result files.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _root() -> Path:
    from ringctl.launch import runs_root

    return runs_root()


def find(spec: str) -> JobRef:
    """A job id from the index, or a job folder (absolute or relative path)."""
    from ringctl.launch import read_index

    for entry in reversed(read_index(_root())):
        if entry["job_id"] == spec:
            return JobRef(entry["job_id"], Path(entry["folder"]), entry["kind"], entry.get("name", ""), tuple(entry.get("overrides", ())))
    path = Path(spec)
    if path.is_dir():
        submitted = sorted(path.glob("*_submitted.pkl"))
        if submitted:
            job_id = submitted[0].name[: -len("_submitted.pkl")]
            kind = "slurm" if list(path.glob("*_submission.sh")) or not job_id.isdigit() else "local"
            for entry in read_index(_root()):
                if Path(entry["folder"]).resolve() == path.resolve():
                    kind = entry["kind"]
            return JobRef(job_id, path.resolve(), kind)
    raise LookupError(
        f"job {spec!r} not found: not a job id in {_root() / 'index.jsonl'} nor a job folder "
        "(set RINGCTL_RUNS to the runs root `ringctl launch` used)"
    )


def status(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ringctl.commands.launch import COLORS, stage
    from ringctl.commands.launch import console as make_console
    from ringctl.launch import read_index

    console = make_console()
    if args.job:
        ref = find(args.job)
        state = ref.state()
        name = stage(state)
        console.print(f"job {ref.job_id} ({ref.kind}): [{COLORS.get(name, 'white')}]{name}[/] ({state})")
        console.print(f"folder: {ref.folder}")
        results = ref.folder / "results.json"
        if results.exists() and name == "done":
            from ringctl.commands.launch import summarise

            summarise(json.loads(results.read_text()), results, console)
        return 0
    entries = read_index(_root())[-args.last:]
    if not entries:
        console.print(f"no jobs recorded under {_root()}")
        return 0
    table = Table(title=f"jobs under {_root()}", title_justify="left")
    for column in ("job", "kind", "stage", "state", "name", "overrides", "folder"):
        table.add_column(column)
    for entry in entries:
        ref = JobRef(entry["job_id"], Path(entry["folder"]), entry["kind"])
        state = ref.state()
        name = stage(state)
        table.add_row(
            ref.job_id, ref.kind, f"[{COLORS.get(name, 'white')}]{name}[/]", state,
            entry.get("name", ""), " ".join(entry.get("overrides", ())), str(ref.folder),
        )
    console.print(table)
    return 0


def logs(args: argparse.Namespace) -> int:
    """One rank's stdout and stderr; --follow keeps printing until the job ends."""
    from ringctl.commands.launch import stage

    ref = find(args.job)
    paths = [ref.folder / f"{ref.job_id}_{args.rank}_log.out", ref.folder / f"{ref.job_id}_{args.rank}_log.err"]
    offsets = {p: 0 for p in paths}

    def pump() -> None:
        for path in paths:
            if path.exists():
                with open(path, "rb") as f:
                    f.seek(offsets[path])
                    chunk = f.read()
                    offsets[path] += len(chunk)
                if chunk:
                    stream = sys.stderr if path.suffix == ".err" else sys.stdout
                    stream.write(chunk.decode(errors="replace"))
                    stream.flush()

    pump()
    if not any(p.exists() for p in paths) and not args.follow:
        print(f"no logs yet for rank {args.rank} in {ref.folder}", file=sys.stderr)
    while args.follow and stage(ref.state()) in ("queued", "running"):
        time.sleep(1.0)
        pump()
    pump()
    return 0


def cancel(args: argparse.Namespace) -> int:
    ref = find(args.job)
    if ref.kind == "slurm":
        ref.submitit_job().cancel(check=True)  # scancel; FailedSubmissionError carries its text
    else:
        (ref.folder / CANCELLED_MARK).write_text(str(time.time()))
        try:
            os.kill(int(ref.job_id), signal.SIGINT)  # submitit's controller stops every task
        except ProcessLookupError:
            pass
    print(f"cancelled job {ref.job_id} ({ref.kind})")
    return 0


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"ringctl {command}", description=__doc__.splitlines()[0])
    if command == "status":
        parser.add_argument("job", nargs="?", help="job id or job folder (default: recent jobs)")
        parser.add_argument("--last", type=int, default=20, help="how many recent jobs to list")
    else:
        parser.add_argument("job", help="job id or job folder")
    if command == "logs":
        parser.add_argument("--rank", type=int, default=0, help="global rank (task) whose log to show")
        parser.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    return parser


def main(command: str, argv: list[str]) -> int:
    try:
        args = _parser(command).parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return {"status": status, "logs": logs, "cancel": cancel}[command](args)
    except LookupError as exc:
        print(f"ringctl {command}: {exc}", file=sys.stderr)
        return 2
