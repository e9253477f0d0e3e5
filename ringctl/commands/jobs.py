"""`ringctl status [JOB|FOLDER ...]`, `ringctl logs JOB [--rank R] [--follow]`, `ringctl cancel JOB`.

The command-line face of ringctl.jobs (finding jobs, their state, summaries): a job id from
the index `ringctl launch` keeps (the runs root is $RINGCTL_RUNS or ./runs), or a job folder.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ringctl.jobs import (
    CANCELLED_MARK,
    COLORS,
    JobRef,
    SlurmUnreachable,
    is_terminal,
    slurm_states,
    stage,
    summarise,
)
from ringctl.jobs import console as make_console
from ringctl.jobs import find as find_job

#: seconds `ringctl cancel` waits for a local job's processes to end after SIGTERM
#: (the tasks stop at a step end, checkpoint and exit) before it sends SIGKILL
CANCEL_GRACE_S = 20.0
#: seconds `ringctl cancel` waits for SLURM to report the job CANCELLED
SLURM_CANCEL_WAIT_S = 30.0


def _root() -> Path:
    from ringctl.launch import runs_root

    return runs_root()


def find(spec: str) -> JobRef:
    return find_job(spec, _root())


def _states(refs: list[JobRef]) -> tuple[dict[str, str], str]:
    """Every job's state, SLURM's asked with one sacct call; and sacct's trouble, if any."""
    slurm = [r.job_id for r in refs if r.kind == "slurm"]
    answer: dict[str, str] = {}
    starts: dict[str, float] = {}
    trouble = ""
    if slurm:
        try:
            answer = slurm_states(slurm, starts=starts)
        except SlurmUnreachable as exc:
            trouble = str(exc)
    states = {}
    for ref in refs:
        if ref.kind == "slurm":
            states[ref.job_id] = ref.state(answer.get(ref.job_id, "UNKNOWN" if trouble else "PENDING"), starts.get(ref.job_id))
        else:
            states[ref.job_id] = ref.state()
    return states, trouble


def _cause_line(ref: JobRef) -> str:
    failure = ref.failure()
    if failure is None:
        return ""
    return failure.headline()


def status(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ringctl.launch import known_jobs, user_index_root

    console = make_console()
    if len(args.job) == 1:
        return _status_one(find(args.job[0]), console)
    entries: list[dict[str, Any]]
    if args.job:
        refs = [find(spec) for spec in args.job]
        entries = [{"name": r.name, "overrides": list(r.overrides)} for r in refs]
    else:
        # $RINGCTL_RUNS names one runs root: list just its jobs; else every job of this user
        entries = known_jobs(_root(), everywhere="RINGCTL_RUNS" not in os.environ)[-args.last:]
        refs = [JobRef.from_entry(e) for e in entries]
    if not refs:
        console.print(f"no jobs recorded under {_root()} nor in the per-user index")
        return 0
    states, trouble = _states(refs)
    where = str(_root()) if "RINGCTL_RUNS" in os.environ else f"{_root()} and {user_index_root()}"
    table = Table(title=f"jobs under {where}", title_justify="left")
    for column in ("job", "kind", "stage", "state", "name", "overrides", "folder", "cause"):
        table.add_column(column)
    for ref, entry in zip(refs, entries):
        state = states[ref.job_id]
        name = stage(state)
        cause = _cause_line(ref) if name in ("failed",) else ""
        table.add_row(
            ref.job_id, ref.kind, f"[{COLORS.get(name, 'white')}]{name}[/]", state,
            entry.get("name", ""), " ".join(entry.get("overrides", ())), str(ref.folder), cause,
        )
    console.print(table)
    if trouble:
        console.print(f"[yellow]SLURM did not answer ({trouble}): states of SLURM jobs are UNKNOWN[/]")
    return 0


def _status_one(ref: JobRef, console: Any) -> int:
    from ringctl.health import read_attempts

    states, trouble = _states([ref])
    state = states[ref.job_id]
    name = stage(state)
    console.print(f"job {ref.job_id} ({ref.kind}): [{COLORS.get(name, 'white')}]{name}[/] ({state})")
    console.print(f"folder: {ref.folder}")
    if trouble:
        console.print(f"[yellow]SLURM did not answer: {trouble}[/]")
    attempts = [a for a in read_attempts(ref.folder) if a.get("event") == "start"]
    if len(attempts) > 1 or any(a.get("event") == "requeue" for a in read_attempts(ref.folder)):
        nodes = "; ".join(f"attempt {a['attempt']}: {', '.join(dict.fromkeys(a.get('node_names', [])))}" for a in attempts)
        console.print(f"attempts: {len(attempts)} ({nodes})")
    results = ref.results()
    if name == "done" and results is not None:
        summarise(results, ref.folder / "results.json", console)
    elif name == "failed":
        cause = _cause_line(ref)
        if cause:
            console.print(f"[red]first cause[/]: {cause}")
        elif results is not None and results.get("error"):
            console.print(f"[red]error[/]: {str(results['error']).strip().splitlines()[-1]}")
        if results is not None and results.get("losses"):
            console.print(f"losses of {len(results['losses'])} steps kept in {ref.folder / 'results.json'}")
    elif name == "cancelled" and results is not None and results.get("stopped"):
        console.print(f"stopped: {results['stopped']}")
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


def _job_processes(ref: JobRef) -> list[int]:
    """A local job's live processes: its controller's process group (the controller runs in
    a session of its own, ringctl.local_controller) whose command line names the job's
    folder. Checked per process, so a reused pid or group id is never signalled."""
    if not ref.job_id.isdigit():
        return []
    group, base = int(ref.job_id), str(ref.folder.parent).encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[2]) != group or stat[0] == "Z":
                continue
            if base not in (proc / "cmdline").read_bytes():
                continue
        except (OSError, ValueError, IndexError):
            continue
        found.append(int(proc.name))
    return found


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(ref: JobRef, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    left = _job_processes(ref)
    while left and time.monotonic() < deadline:
        time.sleep(0.25)
        left = _job_processes(ref)
    return left


def cancel(args: argparse.Namespace) -> int:
    """Stop the job and say so only once it is stopped. A job that already ended is left
    as it is (exit 1). Locally: SIGTERM to the job's processes (every rank stops at a step
    end with a checkpoint), SIGKILL after CANCEL_GRACE_S; under SLURM: scancel, then wait
    for SLURM to report CANCELLED."""
    ref = find(args.job)
    state = ref.state()
    if ref.kind == "slurm":
        if is_terminal(state):
            print(f"job {ref.job_id} already ended ({state}): nothing to cancel", file=sys.stderr)
            return 1
        ref.submitit_job().cancel(check=True)  # scancel; FailedSubmissionError carries its text
        deadline = time.monotonic() + SLURM_CANCEL_WAIT_S
        while time.monotonic() < deadline:
            try:
                state = slurm_states([ref.job_id]).get(ref.job_id, state)
            except SlurmUnreachable:
                pass
            if stage(state) == "cancelled":
                print(f"cancelled job {ref.job_id} (slurm): {state}")
                return 0
            time.sleep(0.5)
        print(f"scancel sent, but SLURM still reports job {ref.job_id} {state}", file=sys.stderr)
        return 1
    pids = _job_processes(ref)
    if not pids:
        print(f"job {ref.job_id} is not running ({state}): nothing to cancel", file=sys.stderr)
        return 1
    (ref.folder / CANCELLED_MARK).write_text(str(time.time()))
    _signal_all(pids, signal.SIGCONT)  # a stopped rank must run to see SIGTERM
    _signal_all(pids, signal.SIGTERM)
    left = _wait_gone(ref, CANCEL_GRACE_S)
    if left:
        _signal_all(left, signal.SIGKILL)
        left = _wait_gone(ref, 5.0)
    if left:
        print(f"could not stop job {ref.job_id}: processes {left} still run", file=sys.stderr)
        return 1
    print(f"cancelled job {ref.job_id} (local): {ref.state()}")
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--last={text!r} is invalid; allowed: an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--last={text!r} is invalid; allowed: an integer >= 1")
    return value


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"ringctl {command}", description=__doc__.splitlines()[0])
    if command == "status":
        parser.add_argument("job", nargs="*", help="job ids or job folders (default: recent jobs)")
        parser.add_argument("--last", type=_positive, default=20, help="how many recent jobs to list")
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
