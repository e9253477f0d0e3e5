"""`ringctl metrics JOB [--json]`: a job's metrics read back from its W&B run files.

    ringctl metrics 12345                  # per-step history as a table, then the summary
    ringctl metrics runs/<time>-<name>/12345 --json

JOB is a job id from the index `ringctl launch` keeps, or a job folder (as for `ringctl
status`). The run is read from the job folder (`wandb/*run-*/run-<id>.wandb`, offline or
online), with no W&B server or account: ringctl.runlog decodes the file. History rows are
the steps the job logged (media such as the plan picture are left out: they are files in
the run folder); the summary is the run's final summary. --json prints both as one object.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _format(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringctl metrics", description=__doc__.splitlines()[0])
    parser.add_argument("job", help="job id or job folder")
    parser.add_argument("--json", action="store_true", help="print history and summary as one JSON object")
    return parser


def main(command: str, argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    from ringctl.commands.jobs import find
    from ringctl.runlog import RunLog, run_file

    try:
        ref = find(args.job)
        results_path = ref.folder / "results.json"
        results = json.loads(results_path.read_text()) if results_path.exists() else None
        path = run_file(ref.folder, results)
    except LookupError as exc:
        print(f"ringctl {command}: {exc}", file=sys.stderr)
        return 2
    try:
        log = RunLog.read(path, internal=args.json)
    except ValueError as exc:  # not a W&B run file
        print(f"ringctl {command}: {path}: {exc}", file=sys.stderr)
        return 1
    try:
        if args.json:
            out = {"job_id": ref.job_id, "folder": str(ref.folder), "run_file": str(path), "history": log.history, "summary": log.summary}
            print(json.dumps(out), flush=True)
        else:
            _print_tables(ref.job_id, log)
            print(f"run file: {path}", flush=True)
    except BrokenPipeError:  # `ringctl metrics JOB | head`: the reader left, not an error
        sys.stdout = None  # no second failure at exit
    return 0


def _print_tables(job_id: str, log: Any) -> None:
    from rich.table import Table

    from ringctl.jobs import console as make_console

    console = make_console()
    if log.history:
        console.print(f"job {job_id}: history ({len(log.history)} steps)")
        table = Table()
        columns = log.columns
        for column in columns:
            table.add_column("step" if column == "_step" else column, justify="right")
        for row in log.history:
            table.add_row(*(_format(row[c]) if c in row else "" for c in columns))
        console.print(table)
    else:
        console.print(f"job {job_id}: no metrics logged per step")
    console.print(f"job {job_id}: summary")
    summary = Table(show_header=False)
    summary.add_column("key")
    summary.add_column("value", justify="right")
    for key in sorted(log.summary):
        summary.add_row(key, _format(log.summary[key]))
    console.print(summary)
