"""ringctl.health.diagnose on written rank records: which rank is named first, and how, when
the launcher's own account of the task exits is all that tells a stopped rank from a dead one
(a loaded machine can let a peer's collective time out before its watchdog speaks)."""

from __future__ import annotations

import time
from pathlib import Path

from ringctl.health import COMM, RankRecord, attempt_dir, diagnose


def _records(folder: Path, quiet: int, world: int = 4) -> None:
    """Every rank but `quiet` failed on a collective; `quiet` kept its first record only."""
    d = attempt_dir(folder, 0)
    d.mkdir(parents=True)
    now = time.time()
    for r in range(world):
        rec = RankRecord(rank=r, node="vm", pid=1000 + r, attempt=0, started=now - 60)
        if r != quiet:
            rec.state, rec.kind, rec.reason, rec.ended = "failed", COMM, "gloo: Connection closed by peer", now
        rec.write(d / f"rank{r}.json")


def test_a_rank_still_running_when_its_peers_ended_is_silent_not_dead(tmp_path: Path) -> None:
    _records(tmp_path, quiet=2)
    how = "still running 15 s after the first task ended: killed by the controller"
    failure = diagnose(tmp_path, 0, 4, ended=True, exits={2: how, 0: "exit 1", 1: "exit 1", 3: "exit 1"})
    assert failure is not None
    assert (failure.rank, failure.kind) == (2, "silent"), failure
    assert failure.reason.startswith("silent (no heartbeat for") and how in failure.reason


def test_a_rank_killed_without_a_word_died(tmp_path: Path) -> None:
    _records(tmp_path, quiet=1)
    failure = diagnose(tmp_path, 0, 4, ended=True, exits={1: "SIGKILL", 0: "exit 1", 2: "exit 1", 3: "exit 1"})
    assert failure is not None
    assert (failure.rank, failure.kind) == (1, "died"), failure
    assert failure.reason.startswith("died (SIGKILL) without an error of its own")
