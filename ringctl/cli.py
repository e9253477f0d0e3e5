"""The `ringctl` command: one entry point, one module per subcommand.

    ringctl plan   +topology=2node [overrides] [--json] [--png PATH]
    ringctl launch +topology=2node [overrides] [-m sweep...]
    ringctl status [JOB|FOLDER]
    ringctl logs   JOB [--rank R] [--follow]
    ringctl cancel JOB
    ringctl calibrate +topology=2node [overrides] [--out PATH]
    ringctl metrics JOB [--json]

`plan` and `launch` compose `conf/` with Hydra; the others read submitit's job
folders and work from any shell. Nothing imports this module.
"""

from __future__ import annotations

import os
import sys
from importlib import import_module

# subcommand -> module in ringctl.commands exposing `main(argv: list[str]) -> int`
COMMANDS = {
    "plan": "plan",
    "launch": "launch",
    "status": "jobs",
    "logs": "jobs",
    "cancel": "jobs",
    "calibrate": "calibrate",
    "metrics": "metrics",
}


def _usage() -> str:
    return (
        "usage: ringctl {" + ",".join(COMMANDS) + "} [args]\n"
        "  ringctl plan +topology=2node [--json]     show the RingPlan (table, PNG, JSON)\n"
        "  ringctl launch +topology=2node            run the job (SLURM, or local processes)\n"
        "  ringctl status|logs|cancel JOB            job control from any shell\n"
        "  ringctl calibrate +topology=2node         measure your nodes, write a topology YAML\n"
        "  ringctl metrics JOB [--json]              a job's W&B history and summary\n"
        "Add --help after a subcommand for its options."
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"ringctl: unknown command {command!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = import_module(f"ringctl.commands.{COMMANDS[command]}")
    try:
        return int(module.main(command, rest) or 0)
    except BrokenPipeError:  # `ringctl ... | head`: the reader left; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second failure at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
