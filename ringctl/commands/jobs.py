"""`ringctl status [JOB|FOLDER]`, `ringctl logs JOB [--rank R] [--follow]`, `ringctl cancel JOB`.

The command-line face of ringctl.jobs (finding jobs, their state, summaries): a job id from
the index `ringctl launch` keeps (the runs root is $RINGCTL_RUNS or ./runs), or a job folder.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from ringctl.jobs import CANCELLED_MARK, COLORS, JobRef, stage, summarise
from ringctl.jobs import console as make_console
from ringctl.jobs import find as find_job


def _root() -> Path:
    from ringctl.launch import runs_root

    return runs_root()


def find(spec: str) -> JobRef:
    return find_job(spec, _root())

def status(args: argparse.Namespace) -> int:
    from rich.table import Table

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
