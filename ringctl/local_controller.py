"""The controller of a local job: `python -m ringctl.local_controller <job folder>`.

submitit's local Controller starts one process per rank and waits for all of them, so one
stopped or hung rank holds the job until its time limit, and SIGTERM to the controller
only forwards SIGTERM (which submitit's tasks ignore). This one is submitit's Controller
with three changes, the local counterparts of what SLURM does for a ringctl job:

- once the first task has exited, the others get TASK_EXIT_GRACE_S to follow (srun's
  --wait), then are killed: a stopped rank (SIGSTOP) or one hung outside any collective
  cannot keep the job alive;
- SIGTERM/SIGINT (`ringctl cancel`) stops every task (SIGCONT, SIGTERM, then SIGKILL after
  the grace), restarts nothing, and the controller exits;
- each restart (the tasks exit with submitit's requeue code after a warning signal) is
  numbered for the tasks (RINGCTL_ATTEMPT), and how every task of the last attempt ended
  is written to `<job id>_exits.json` in the job folder, for the diagnosis of a failure;
- each attempt's rendezvous port is one the kernel reports free at that moment
  (RINGCTL_MASTER_PORT, which ringctl.job hands to submitit's MASTER_PORT): submitit
  otherwise draws it from the job id in 20000-60000, which overlaps the ephemeral range, so
  a port held by any connection on the machine (another job's gloo, for one) failed rank
  0's TCPStore with EADDRINUSE.

It runs in a session of its own (ringctl.launch starts it so), so `ringctl cancel` signals
the whole process group, and a terminal's Ctrl-C on `ringctl launch` does not reach it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from submitit.core.utils import JobPaths
from submitit.local.local import (
    LOCAL_REQUEUE_RETURN_CODE,
    Controller,
    LocalJobEnvironment,
)

#: the rendezvous port of a local attempt, for ringctl.job (submitit's export refuses a
#: MASTER_PORT that is already set)
PORT_ENV = "RINGCTL_MASTER_PORT"
#: seconds the other tasks get once the first task of the job has exited
TASK_EXIT_GRACE_S = 15.0
GRACE_ENV = "RINGCTL_TASK_EXIT_GRACE_S"
#: how many times the tasks may be restarted after a warning signal (the job itself
#: also counts, against launcher.max_requeues)
MAX_RESTARTS = 16


def free_port() -> int:
    """A TCP port no socket on this machine holds now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


class RingctlController(Controller):
    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.folder = JobPaths(self.folder, self.pid).folder  # <base>/%j -> this job's folder
        self.grace_s = float(os.environ.get(GRACE_ENV, TASK_EXIT_GRACE_S))
        self.attempt = 0
        self.stop_since: float | None = None  # when SIGTERM/SIGINT reached the controller
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)

    def _stop(self, signum: int, frame: Any) -> None:
        if self.stop_since is None:
            self.stop_since = time.monotonic()
        self._forward_signal(signal.SIGCONT)  # a stopped task must run to see SIGTERM
        self._forward_signal(signal.SIGTERM)

    def start_tasks(self) -> None:
        os.environ["RINGCTL_ATTEMPT"] = str(self.attempt)
        os.environ[PORT_ENV] = str(free_port())
        super().start_tasks()

    def wait(self, freq: int = 24) -> list[int | None]:
        """Until every task exited, the time limit passed, the grace after the first exit
        passed, or the grace after a stop request passed."""
        started = time.monotonic()
        warned = False
        first_exit: float | None = None
        while True:
            codes = [t.poll() for t in self.tasks]
            if all(c is not None for c in codes):
                return codes
            now = time.monotonic()
            if first_exit is None and any(c is not None for c in codes):
                first_exit = now
            if first_exit is not None and now - first_exit > self.grace_s:
                return codes
            if self.stop_since is not None and now - self.stop_since > self.grace_s:
                return codes
            if not warned and now - started >= self.timeout_s - self.signal_delay_s:
                warned = True
                self._forward_signal(LocalJobEnvironment._usr_sig())
            if now - started >= self.timeout_s:
                return codes
            time.sleep(1.0 / freq)

    def kill_tasks(self) -> None:
        """SIGKILL what is left (stopped tasks included), after SIGCONT+SIGTERM and a second."""
        if any(t.poll() is None for t in self.tasks):
            self._forward_signal(signal.SIGCONT)
            self._forward_signal(signal.SIGTERM)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and any(t.poll() is None for t in self.tasks):
                time.sleep(0.05)
        super().kill_tasks()

    def _write_exits(self, codes: list[int | None]) -> None:
        """How each task of this attempt ended: "exit N", "SIGKILL", "killed by the controller"."""
        exits = {}
        for rank, code in enumerate(codes):
            if code is None:
                exits[rank] = f"still running {self.grace_s:.0f} s after the first task ended: killed by the controller"
            elif code < 0:
                exits[rank] = signal.Signals(-code).name
            else:
                exits[rank] = f"exit {code}"
        path = self.folder / f"{self.pid}_exits.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"attempt": self.attempt, "exits": exits, "stopped": self.stop_since is not None}))
        tmp.replace(path)

    def run(self, max_retry: int = MAX_RESTARTS) -> None:
        for _ in range(max_retry):
            try:
                self.start_tasks()
                codes = self.wait()
                self._write_exits(codes)
                if self.stop_since is not None or not any(c == LOCAL_REQUEUE_RETURN_CODE for c in codes):
                    break
                self.attempt += 1
            finally:
                self.kill_tasks()


def main() -> None:
    if len(sys.argv) != 2:
        print("usage: python -m ringctl.local_controller <job folder>", file=sys.stderr)
        raise SystemExit(2)
    RingctlController(Path(sys.argv[1])).run()


if __name__ == "__main__":
    main()
