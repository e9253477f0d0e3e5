"""Rank health: heartbeats, per-rank final records, and the diagnosis of a failed job.

A rank that dies (SIGKILL, out of memory, its node lost) writes nothing; a rank that is
stopped (SIGSTOP) or hangs keeps its peers waiting in a collective. So every rank keeps a
record file in the job folder, `health/attempt-<A>/rank<R>.json`: written when the rank
starts (rank, node, pid), touched every `HEARTBEAT_S` by a thread (its mtime is the
heartbeat), rewritten once when the rank ends (state and reason). From these files alone,
a peer or `ringctl launch` can tell which rank failed *first*: a rank whose own code
raised, else a rank that went silent or died without a record, else one that was
signalled; peers' "connection closed" errors come last.

Stdlib only: the CLI reads it without torch.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HEALTH_DIR = "health"
ATTEMPTS_NAME = "attempts.jsonl"
#: seconds between two heartbeats of a rank
HEARTBEAT_S = 1.0
#: a peer whose heartbeat is older than this, with no final record, is taken to be dead
#: when a collective has already failed (the quick diagnosis after "connection closed")
DEAD_AFTER_S = 4.0
#: how long a rank whose collective failed looks for the peer that caused it
DIAGNOSE_WINDOW_S = 6.0

# record states: running (no final record yet) | done | failed | stopped
# kinds of a failed record, most telling first
ERROR, SIGNALLED, SILENT_PEER, COMM = "error", "signal", "silent-peer", "comm"

_COMM_PATTERNS = re.compile(
    r"Connection (closed|reset|refused)|Broken pipe|gloo/transport|Timed out waiting|timed out|"
    r"ECONNRESET|NCCL|DistBackendError|DistNetworkError|Socket Timeout|recv|peer",
    re.IGNORECASE,
)


def attempt_dir(folder: Path, attempt: int) -> Path:
    return folder / HEALTH_DIR / f"attempt-{attempt}"


def current_attempt(environ: Any = os.environ) -> int:
    """Which run of this job this is: SLURM counts its requeues (SLURM_RESTART_COUNT);
    ringctl's local controller counts its restarts (RINGCTL_ATTEMPT)."""
    for key in ("SLURM_RESTART_COUNT", "RINGCTL_ATTEMPT"):
        value = str(environ.get(key, "")).strip()
        if value.isdigit():
            return int(value)
    return 0


def latest_attempt(folder: Path) -> int | None:
    """The highest attempt that left records in the folder (None: none did)."""
    found = [int(p.name.split("-", 1)[1]) for p in (folder / HEALTH_DIR).glob("attempt-*") if p.name.split("-", 1)[1].isdigit()]
    return max(found) if found else None


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot; /proc/<pid>/stat field 22):
    with the pid, it names one process for good (pids are reused)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces
    return int(stat.rsplit(")", 1)[1].split()[19])


def is_comm_error(text: str) -> bool:
    """Whether an exception text is a collective failing because of a peer (connection
    closed or reset, timeout) rather than this rank's own error."""
    last = [line for line in text.strip().splitlines() if line.strip()][-1:] or [""]
    return bool(_COMM_PATTERNS.search(last[0]))


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass
class RankRecord:
    """What a rank says about itself (and, read back, when it last beat)."""

    rank: int
    node: str
    pid: int
    attempt: int
    started: float
    state: str = "running"  # running | done | failed | stopped
    kind: str = ""  # for failed: error | signal | silent-peer | comm
    reason: str = ""  # one line
    blames: list[int] = field(default_factory=list)  # ranks this rank found at fault
    ended: float | None = None
    beat: float = 0.0  # the file's mtime when read (not stored)

    @classmethod
    def read(cls, path: Path) -> RankRecord | None:
        try:
            data = json.loads(path.read_text())
            beat = path.stat().st_mtime
        except (OSError, ValueError):
            return None
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "beat"}
        try:
            return cls(**fields, beat=beat)
        except TypeError:
            return None

    def write(self, path: Path) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "beat"}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)


def read_records(folder: Path, attempt: int) -> dict[int, RankRecord]:
    out: dict[int, RankRecord] = {}
    for path in attempt_dir(folder, attempt).glob("rank*.json"):
        record = RankRecord.read(path)
        if record is not None:
            out[record.rank] = record
    return out


@dataclass
class Failure:
    """The first cause of a failed attempt: which rank, on which node, and what happened."""

    rank: int
    node: str
    kind: str  # error | died | silent | signal | not-started | comm | stopped
    reason: str
    attempt: int
    others: dict[int, str] = field(default_factory=dict)  # the other failed ranks, one line each

    def headline(self) -> str:
        where = f"rank {self.rank} on node {self.node}" if self.rank >= 0 else "every rank"
        return f"{where}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def diagnose(
    folder: Path,
    attempt: int,
    world_size: int,
    *,
    ended: bool = False,
    collective_failed: bool = False,
    now: float | None = None,
    dead_after_s: float = DEAD_AFTER_S,
    exits: dict[int, str] | None = None,
) -> Failure | None:
    """The first cause among the records of `attempt`, or None when nothing failed (yet).

    `ended`: every process of the attempt is gone (then a rank without a final record died
    without a word: killed, out of memory, node lost). `collective_failed`: the caller's
    own collective failed, so a peer with a stale heartbeat is dead. `exits`: how tasks ended as the
    launcher saw it (rank -> "SIGKILL", "exit 1", ...), to name a signal."""
    now = time.time() if now is None else now
    records = read_records(folder, attempt)
    exits = exits or {}
    failed = {r: rec for r, rec in records.items() if rec.state in ("failed", "stopped")}
    blamed: dict[int, str] = {}
    for rec in failed.values():
        for r in rec.blames:
            blamed.setdefault(r, rec.reason)

    def node(r: int) -> str:
        rec = records.get(r)
        return rec.node if rec else "?"

    def others(exclude: int) -> dict[int, str]:
        return {r: rec.reason for r, rec in sorted(failed.items()) if r != exclude}

    # 1. a rank whose own code raised (the earliest)
    own = sorted((rec for rec in failed.values() if rec.kind == ERROR), key=lambda x: x.ended or 0)
    if own:
        first = own[0]
        return Failure(first.rank, first.node, "error", first.reason, attempt, others(first.rank))
    # 2. a peer's watchdog found a rank silent (stopped, hung): that rank, whatever it did later
    verdicts = sorted((rec for rec in failed.values() if rec.kind == SILENT_PEER and rec.blames), key=lambda x: x.ended or 0)
    if verdicts:
        culprit, verdict = verdicts[0].blames[0], verdicts[0]
        reason = next((p for p in verdict.reason.split(" | ") if p.startswith(f"rank {culprit} ")), verdict.reason)
        reason = re.sub(rf"^rank {culprit} (on node \S+ )?", "", reason) + f" (noticed by rank {verdict.rank})"
        return Failure(culprit, node(culprit), "silent", reason, attempt, others(culprit))
    # 3. ranks with no final record: died (all processes gone, or heartbeat stale)
    quiet = [
        rec for r, rec in sorted(records.items())
        if rec.state == "running" and (ended or now - rec.beat > dead_after_s or r in blamed)
    ]
    if quiet and (failed or ended or collective_failed):
        first = min(quiet, key=lambda x: x.beat)
        how = exits.get(first.rank)
        if how and how.startswith("still running"):
            # alive but without a heartbeat while its peers ended: stopped or hung (a peer's
            # watchdog would have said so, had a loaded machine not let a timeout end it first)
            reason = (
                f"silent (no heartbeat for {now - first.beat:.0f} s; {how}): stopped or hung, "
                "not dead"
            )
            return Failure(first.rank, first.node, "silent", reason, attempt, others(first.rank))
        if how:
            reason = f"died ({how}) without an error of its own: killed, out of memory or its node lost"
        else:
            reason = (
                f"died without an error of its own (no heartbeat since {now - first.beat:.0f} s ago): "
                "killed, out of memory or its node lost"
            )
        return Failure(first.rank, first.node, "died", reason, attempt, others(first.rank))
    # 4. a rank that was signalled (SIGTERM to one rank); every rank: a job-wide stop
    signalled = sorted((rec for rec in failed.values() if rec.kind == SIGNALLED), key=lambda x: x.ended or 0)
    if signalled:
        if len(signalled) == world_size:
            return Failure(-1, "", "stopped", signalled[0].reason, attempt)
        first = signalled[0]
        return Failure(first.rank, first.node, "signal", first.reason, attempt, others(first.rank))
    # 5. a rank that never started (no record at all) while others failed or the job ended
    missing = [r for r in range(world_size) if r not in records]
    if missing and (failed or ended):
        r = missing[0]
        how = exits.get(r)
        reason = "never started (no record: it died before joining the job" + (f"; {how})" if how else ")")
        return Failure(r, "?", "not-started", reason, attempt, others(r))
    # 6. only peers' errors: the earliest names its culprit if it found one
    if failed:
        first = min(failed.values(), key=lambda x: x.ended or 0)
        if first.blames:
            culprit = first.blames[0]
            return Failure(culprit, node(culprit), "died", first.reason, attempt, others(culprit))
        return Failure(first.rank, first.node, first.kind or COMM, first.reason, attempt, others(first.rank))
    return None


class Heartbeat:
    """This rank's record and heartbeat thread, and the watchdog over its peers.

    Every HEARTBEAT_S the thread touches this rank's record; when a peer's record has not
    been touched for `timeout_s` and carries no final state (stopped, hung, dead), or when
    no record of a peer appeared `timeout_s` after start, it calls `on_silent(ranks,
    reason)` once: the job decides how to die (the main thread may be stuck in a
    collective that would wait for that peer forever)."""

    def __init__(
        self, folder: Path, rank: int, world_size: int, node: str, attempt: int, timeout_s: float,
        on_silent: Callable[[list[int], str], None] | None = None,
    ) -> None:
        self.dir = attempt_dir(folder, attempt)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"rank{rank}.json"
        self.world_size, self.timeout_s, self.on_silent = world_size, timeout_s, on_silent
        self.record = RankRecord(rank=rank, node=node, pid=os.getpid(), attempt=attempt, started=time.time())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ringctl-heartbeat", daemon=True)
        self.fired = False

    def start(self) -> Heartbeat:
        self.record.write(self.path)
        self._thread.start()
        return self

    def finish(self, state: str, kind: str = "", reason: str = "", blames: list[int] | None = None) -> None:
        """The final record (once): the beat stops, peers see why this rank ended."""
        self._stop.set()
        if self.record.state != "running":
            return
        self.record.state, self.record.kind, self.record.reason = state, kind, reason
        self.record.blames = list(blames or [])
        self.record.ended = time.time()
        try:
            self.record.write(self.path)
        except OSError:
            pass

    def silent_peers(self, now: float | None = None) -> tuple[list[int], str]:
        """Peers without a final record and without a heartbeat for `timeout_s`."""
        now = time.time() if now is None else now
        records = read_records(self.dir.parent.parent, self.record.attempt)
        silent, parts = [], []
        for r in range(self.world_size):
            if r == self.record.rank:
                continue
            rec = records.get(r)
            if rec is None:
                if now - self.record.started > self.timeout_s:
                    silent.append(r)
                    parts.append(f"rank {r} never started (no heartbeat {self.timeout_s:.0f} s after rank {self.record.rank} started)")
            elif rec.state == "running" and now - rec.beat > self.timeout_s:
                silent.append(r)
                parts.append(
                    f"rank {r} on node {rec.node} silent for {now - rec.beat:.0f} s "
                    f"(no heartbeat, timeout {self.timeout_s:.0f} s): stopped, hung or its node lost"
                )
        return silent, " | ".join(parts)

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass
            if self.fired or self.on_silent is None:
                continue
            try:
                silent, reason = self.silent_peers()
            except OSError:
                continue
            if silent:
                self.fired = True
                self.on_silent(silent, reason)


def record_attempt(folder: Path, entry: dict[str, Any]) -> None:
    """Append one line to attempts.jsonl (rank 0, at the start and end of each attempt)."""
    line = (json.dumps(entry, default=str) + "\n").encode()
    fd = os.open(folder / ATTEMPTS_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_attempts(folder: Path) -> list[dict[str, Any]]:
    path = folder / ATTEMPTS_NAME
    out = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a torn last line (the writer was killed): skip it
    return out


_SRUN_TASK = re.compile(r"srun: error: (\S+): tasks? ([0-9,\-]+): (.+)$")


def srun_exits(log_text: str) -> dict[int, str]:
    """rank -> how srun saw it end ("Killed", "Exited with exit code 1", ...), from the
    batch script's stderr (`srun: error: node2: task 3: Killed`)."""
    out: dict[int, str] = {}
    for line in log_text.splitlines():
        found = _SRUN_TASK.search(line.strip())
        if not found:
            continue
        for part in found.group(2).split(","):
            lo, _, hi = part.partition("-")
            for r in range(int(lo), int(hi or lo) + 1):
                out.setdefault(r, f"srun: {found.group(3)} on {found.group(1)}")
    return out
