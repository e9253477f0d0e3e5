"""Following ringctl jobs: find them, read their state, show progress and results.

Library code under both the CLI (`ringctl launch`, `status`, `logs`, `cancel`) and the Hydra
sweep plugin, so neither imports the other. A job is found through the index `ringctl launch`
keeps (<runs root>/index.jsonl: job id -> job folder) or given as its folder; its state
comes from SLURM (one `sacct` call for all the jobs asked about) or, for local jobs, from
the controller process (checked to be that job's by its start time) and the job folder.
A failed job's first cause comes from the ranks' records in the job folder
(ringctl.health): the rank that raised, died or went silent, and its node.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

# submitit/SLURM state -> what the progress display shows
STAGES = {
    "PENDING": "queued", "REQUEUED": "queued", "REQUEUE_HOLD": "queued", "REQUEUE_FED": "queued",
    "CONFIGURING": "queued", "UNKNOWN": "queued", "NO PROCESS AND NO RESULT": "queued",
    "RESIZING": "running", "SUSPENDED": "running", "SIGNALING": "running", "STAGE_OUT": "running",
    "RUNNING": "running", "COMPLETING": "running", "CANCELLING": "running",
    "COMPLETED": "done", "FINISHED": "done", "CANCELLED": "cancelled", "STOPPED": "cancelled",
}
COLORS = {"queued": "yellow", "running": "cyan", "done": "green", "failed": "red", "cancelled": "magenta"}
#: SLURM states after which the job will not run again (NODE_FAIL and PREEMPTED only when
#: they stay so: see REQUEUE_PASSAGE)
TERMINAL = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE", "REVOKED", "FINISHED", "STOPPED",
}
#: states a job submitted with --requeue (ringctl's are, unless told no_requeue) passes through on its way
#: back to PENDING after its node failed or it was preempted: sacct shows them while the old
#: allocation completes, then the requeued job; final only when they persist
REQUEUE_PASSAGE = ("PREEMPTED", "NODE_FAIL")
#: seconds a REQUEUE_PASSAGE state must persist before a follower takes it as final
PREEMPTED_FINAL_S = 60.0
#: seconds without an answer from SLURM (sacct) before `ringctl launch` stops following
LOST_CONTACT_S = 600.0


def console() -> Any:
    """Rich console; wide when output goes to a file or pipe (logs, CI), so paths stay whole."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


def stage(state: str) -> str:
    """queued | running | done | failed | cancelled, from any SLURM or local state."""
    state = state.upper()
    if state.startswith("CANCELLED"):
        return "cancelled"
    return STAGES.get(state.split()[0] if state else state, "failed")


def is_terminal(state: str) -> bool:
    return state.upper().split(" ")[0] in TERMINAL if state else False


CANCELLED_MARK = "ringctl_cancelled"  # written into a local job's folder by `ringctl cancel`


# ---- SLURM: one sacct call for many jobs --------------------------------------------------


class SlurmUnreachable(RuntimeError):
    """sacct gave no answer (slurmdbd or slurmctld down, no SLURM here): carries its text."""


def slurm_states(job_ids: list[str], timeout: float = 30, starts: dict[str, float] | None = None) -> dict[str, str]:
    """job id -> SLURM state for all of `job_ids` with ONE sacct call ("CANCELLED by 0" ->
    "CANCELLED"); an id sacct does not know yet is left out. Array tasks ("123_4") are asked
    by their array id and read from its rows ("123_[5-7]" while pending). `starts`, when
    given, receives the start (epoch s) of each job's latest allocation: after a requeue,
    files older than it are an earlier attempt's. A job sacct shows in a REQUEUE_PASSAGE
    state is asked of slurmctld too (one squeue call): sacct keeps a requeued job's
    NODE_FAIL until it starts again, squeue knows it is PENDING."""
    if not job_ids:
        return {}
    bases = sorted({j.split("_")[0] for j in job_ids})
    cmd = ["sacct", "-X", "-n", "-P", "-o", "JobID,State,Start", "-j", ",".join(bases)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmUnreachable(f"sacct: {exc}") from exc
    if done.returncode != 0:
        raise SlurmUnreachable(f"sacct: {(done.stderr or done.stdout).strip() or f'exit {done.returncode}'}")
    starts = {} if starts is None else starts
    states = _read_sacct(done.stdout, starts)
    passing = [j for j in job_ids if states.get(j, "").upper().startswith(REQUEUE_PASSAGE)]
    for job, (state, start) in _queued_again(passing, timeout).items():
        states[job] = state
        if start is not None:
            starts[job] = start
    return states


def _queued_again(job_ids: list[str], timeout: float) -> dict[str, tuple[str, float | None]]:
    """Of jobs sacct shows ended by a node failure or preemption, those slurmctld has back
    in its queue (or already running again): job id -> (squeue's state, its start: the
    expected one while pending, so every file of the attempt before is older)."""
    if not job_ids:
        return {}
    cmd = ["squeue", "-h", "-o", "%i|%T|%S", "-j", ",".join(job_ids)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return {}  # slurmctld unreachable: sacct's state stands (a follower waits PREEMPTED_FINAL_S)
    out: dict[str, tuple[str, float | None]] = {}
    for line in done.stdout.splitlines() if done.returncode == 0 else []:
        job, state, start = (line.split("|") + ["", ""])[:3]
        job, state = job.strip(), state.strip()
        if job in job_ids and STAGES.get(state) in ("queued", "running") and state not in ("COMPLETING", "CANCELLING"):
            out[job] = (state, _sacct_time(start))
    return out


def _read_sacct(text: str, starts: dict[str, float] | None = None) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        job, _, rest = line.partition("|")
        state, _, start = rest.partition("|")
        job, state = job.strip(), state.strip().split(" ")[0]
        if not job or "." in job or not state:
            continue
        if "_[" in job:  # pending array tasks: 123_[5-7%2] or 123_[1,3]
            base, _, rest = job.partition("_[")
            for part in rest.rstrip("]").split("%")[0].split(","):
                lo, _, hi = part.partition("-")
                if lo.isdigit():
                    for i in range(int(lo), int(hi or lo) + 1):
                        out[f"{base}_{i}"] = state
        else:
            out[job] = state
            when = _sacct_time(start)
            if starts is not None and when is not None:
                starts[job] = when
    return out


def _sacct_time(text: str) -> float | None:
    """sacct's local ISO time as epoch seconds; None for "Unknown"/"None" (not started)."""
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        return None


# ---- jobs on disk ----------------------------------------------------------------------------


@dataclass
class JobRef:
    """A job found on disk: its id, folder and backend (and a local controller's identity)."""

    job_id: str
    folder: Path
    kind: str  # slurm | local
    name: str = ""
    overrides: tuple[str, ...] = ()
    pid_start: int | None = None  # local: the controller's start time (ringctl.health.process_start_time)

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> JobRef:
        return cls(
            entry["job_id"], Path(entry["folder"]), entry["kind"], entry.get("name", ""),
            tuple(entry.get("overrides", ())), entry.get("pid_start"),
        )

    def submitit_job(self) -> Any:
        import submitit

        cls = submitit.SlurmJob if self.kind == "slurm" else submitit.LocalJob
        return cls(folder=self.folder, job_id=self.job_id)

    def task_outcome(self, task: int = 0, since: float | None = None) -> str | None:
        """'success' | 'error' from submitit's result pickle, None while there is none (or
        only one written before `since`: an earlier attempt's, e.g. before a node failure)."""
        path = self.folder / f"{self.job_id}_{task}_result.pkl"
        try:
            if since is not None and path.stat().st_mtime < since:
                return None
        except OSError:
            return None
        try:
            with open(path, "rb") as f:
                return str(pickle.load(f)[0])
        except (OSError, EOFError, pickle.UnpicklingError):
            return None

    def results(self) -> dict[str, Any] | None:
        try:
            data = json.loads((self.folder / "results.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def controller_alive(self) -> bool:
        """A local job's controller still runs: the pid exists, is no zombie, and is the
        same process that was recorded (its start time), not a later one reusing the pid."""
        if not self.job_id.isdigit():
            return False
        pid = int(self.job_id)
        if not _alive(pid):
            return False
        if self.pid_start is not None:
            from ringctl.health import process_start_time

            return process_start_time(pid) == self.pid_start
        return _cmdline_mentions(pid, str(self.folder.parent))

    def state(self, slurm_state: str | None = None, start: float | None = None) -> str:
        """SLURM's state (sacct; pass it, and its allocation's `start`, when already asked
        for many jobs at once) or, locally: RUNNING / COMPLETED / FAILED / CANCELLED."""
        if self.kind == "slurm":
            if slurm_state is None:
                starts: dict[str, float] = {}
                try:
                    slurm_state = slurm_states([self.job_id], starts=starts).get(self.job_id, "PENDING")
                except SlurmUnreachable:
                    slurm_state = "UNKNOWN"
                start = starts.get(self.job_id)
            # a result of an attempt before a requeue (a node failure's) is not this one's
            outcome = self.task_outcome(since=start)
            state = slurm_state
            if state.upper() in ("UNKNOWN", "", "RUNNING", "COMPLETING") and outcome is not None:
                # sacct lags behind the result file rank 0 writes as it ends
                return "COMPLETED" if outcome == "success" else "FAILED"
            return state
        outcome = self.task_outcome()
        alive = self.controller_alive()
        if (self.folder / CANCELLED_MARK).exists():
            return "CANCELLING" if alive else "CANCELLED"
        if alive:
            return "RUNNING"
        if outcome is not None:
            return "COMPLETED" if outcome == "success" else "FAILED"
        results = self.results() or {}
        return "STOPPED" if results.get("stopped") and not results.get("error") else "FAILED"

    def failure(self) -> Any:
        """The first cause of this job's latest attempt (ringctl.health.Failure), or None."""
        return job_failure(self.folder, self.job_id, self.kind)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (finished, parent not reaped yet) is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _cmdline_mentions(pid: int, text: str) -> bool:
    try:
        return text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def find(spec: str, root: Path) -> JobRef:
    """A job id from the index under `root` or the per-user index, or a job folder."""
    from ringctl.launch import known_jobs

    for entry in reversed(known_jobs(root)):
        if entry["job_id"] == spec:
            return JobRef.from_entry(entry)
    path = Path(spec)
    if path.is_dir():
        submitted = sorted(path.glob("*_submitted.pkl"))
        if submitted:
            job_id = submitted[0].name[: -len("_submitted.pkl")]
            kind = "slurm" if list(path.glob("*_submission.sh")) or not job_id.isdigit() else "local"
            for entry in known_jobs(root):
                if Path(entry["folder"]).resolve() == path.resolve():
                    return JobRef.from_entry(entry)
            return JobRef(job_id, path.resolve(), kind)
    raise LookupError(
        f"job {spec!r} not found: not a job id in {root / 'index.jsonl'} or the per-user index "
        "nor a job folder (set RINGCTL_RUNS to the runs root `ringctl launch` used)"
    )


# ---- the first cause of a failure ------------------------------------------------------------


def _world_size(folder: Path, attempt: int) -> int:
    from ringctl.health import read_records

    try:
        res = json.loads((folder / "results.json").read_text())["config"]["resources"]
        return int(res["nodes"]) * int(res["ranks_per_node"])
    except (OSError, ValueError, KeyError, TypeError):
        records = read_records(folder, attempt)
        return max(records) + 1 if records else 0


def _task_exits(folder: Path, job_id: str, kind: str, attempt: int) -> dict[int, str]:
    """How each task ended as the launcher saw it: the local controller's record, or srun's
    `task N: Killed` lines in the batch script's error log."""
    from ringctl.health import srun_exits

    if kind == "local":
        try:
            data = json.loads((folder / f"{job_id}_exits.json").read_text())
        except (OSError, ValueError):
            return {}
        if int(data.get("attempt", -1)) != attempt:
            return {}
        return {int(r): str(how) for r, how in data.get("exits", {}).items()}
    try:
        text = (folder / f"{job_id}_0_log.err").read_text(errors="replace")
    except OSError:
        return {}
    return srun_exits(_latest_attempt_lines(text) if attempt > 0 else text)


#: what SLURM writes into a job's log when it ends an allocation and requeues the job
REQUEUE_MARKERS = ("DUE TO JOB REQUEUE", "DUE TO NODE FAILURE", "DUE TO PREEMPTION")


def _latest_attempt_lines(text: str) -> str:
    """The latest attempt's part of a log SLURM appends every attempt to: from the first
    task start (submitit's "Starting with") after the last requeue marker; the lines
    between are the ended allocation's (srun's "Killed" lines after a node failure)."""
    marker = max(text.rfind(m) for m in REQUEUE_MARKERS)
    if marker < 0:
        return text
    begun = text.find("Starting with", marker)
    if begun < 0:
        return text[marker:]
    return text[text.rfind("\n", 0, begun) + 1 :]


def job_failure(folder: Path, job_id: str, kind: str) -> Any:
    """The first cause of the latest attempt of an ended job (ringctl.health.diagnose with
    every process gone), or None when the ranks left no records."""
    from ringctl.health import diagnose, latest_attempt

    attempt = latest_attempt(folder)
    if attempt is None:
        return None
    world = _world_size(folder, attempt)
    if world <= 0:
        return None
    return diagnose(folder, attempt, world, ended=True, exits=_task_exits(folder, job_id, kind, attempt))


def root_cause(folder: Path, job_id: str = "", kind: str = "slurm") -> str | None:
    """What `ringctl launch` prints for a failed job: the rank that failed first and its
    node (its traceback when its own code raised), then the ranks that failed after it."""
    failure = job_failure(folder, job_id or _job_id_of(folder), kind)
    if failure is None:
        return None
    if failure.rank < 0:
        return f"attempt {failure.attempt}: {failure.reason}"
    lines = [f"rank{failure.rank} failed first (node {failure.node}, attempt {failure.attempt}): {failure.reason}"]
    if failure.others:
        lines[0] += f" (then {', '.join(f'rank{r}' for r in failure.others)} failed too)"
    error = folder / f"rank{failure.rank}.error"
    if failure.kind == "error" and error.exists():
        lines.append(error.read_text().rstrip())
    return "\n".join(lines)


def _job_id_of(folder: Path) -> str:
    submitted = sorted(folder.glob("*_submitted.pkl"))
    return submitted[0].name[: -len("_submitted.pkl")] if submitted else ""


# ---- following jobs: live progress, then the result summary -------------------------------


class _Tracker:
    """The states of the followed jobs, asked for all at once (one sacct call per poll)."""

    def __init__(self, jobs: list[Any]) -> None:
        from ringctl.health import process_start_time

        self.jobs = jobs
        self.states: dict[str, str] = {}
        self.preempted_since: dict[str, float] = {}
        self.last_answer = time.monotonic()
        self.trouble = ""
        # a local controller's identity, taken while it surely is ours (just submitted)
        self.pid_start = {
            j.job_id: process_start_time(int(j.job_id)) for j in jobs if j.kind == "local" and str(j.job_id).isdigit()
        }

    def poll(self) -> None:
        slurm = [j.job_id for j in self.jobs if j.kind == "slurm"]
        answer: dict[str, str] | None = None
        starts: dict[str, float] = {}
        if slurm:
            try:
                answer = slurm_states(slurm, starts=starts)
                self.last_answer, self.trouble = time.monotonic(), ""
            except SlurmUnreachable as exc:
                self.trouble = str(exc)
        else:
            self.last_answer = time.monotonic()
        for item in self.jobs:
            ref = JobRef(item.job_id, item.folder, item.kind, pid_start=self.pid_start.get(item.job_id))
            if item.kind == "slurm":
                known = self.states.get(item.job_id, "PENDING")
                state = ref.state(answer.get(item.job_id, known) if answer is not None else "UNKNOWN", starts.get(item.job_id))
                if answer is None and not is_terminal(state):
                    state = known  # no answer: the job is where it was last seen
            else:
                state = ref.state()
            if state.upper().startswith(REQUEUE_PASSAGE):
                self.preempted_since.setdefault(item.job_id, time.monotonic())
            else:
                self.preempted_since.pop(item.job_id, None)
            self.states[item.job_id] = state

    def done(self, item: Any) -> bool:
        state = self.states.get(item.job_id, "")
        if item.job_id in self.preempted_since:
            return time.monotonic() - self.preempted_since[item.job_id] > PREEMPTED_FINAL_S
        if item.kind == "local":
            return state.upper() not in ("RUNNING", "CANCELLING")
        return is_terminal(state)

    def lost_for(self) -> float:
        return time.monotonic() - self.last_answer


def follow(jobs: list[Any], poll_s: float = 1.0, lost_contact_s: float = LOST_CONTACT_S) -> int:
    """Rich live table (queued -> running -> done per job; a requeued job goes back to
    queued), then each job's summary or its first cause. Returns 0 when all succeeded, 1
    otherwise, 3 when SLURM did not answer for `lost_contact_s` (the jobs may still run)."""
    from rich.live import Live

    out = console()
    started = time.time()
    tracker = _Tracker(jobs)
    tracker.poll()
    try:
        with Live(_progress_table(jobs, tracker, started), console=out, refresh_per_second=4, transient=False) as live:
            while not all(tracker.done(j) for j in jobs):
                if tracker.lost_for() > lost_contact_s:
                    live.update(_progress_table(jobs, tracker, started))
                    if not out.is_terminal:
                        out.line()
                    ids = " ".join(j.job_id for j in jobs)
                    out.print(
                        f"[red]lost contact with SLURM for {tracker.lost_for():.0f} s[/] ({tracker.trouble}); "
                        f"the jobs may still be running. Reattach with: ringctl status {ids}   "
                        f"ringctl logs {jobs[0].job_id} --follow"
                    )
                    return 3
                time.sleep(poll_s)
                tracker.poll()
                live.update(_progress_table(jobs, tracker, started))
        if not out.is_terminal:  # Live leaves its last frame unterminated on a pipe/file
            out.line()
    except KeyboardInterrupt:
        out.print("stopped following; the jobs keep running (ringctl status / ringctl cancel)")
        return 130
    failed = 0
    for item in jobs:
        failed += not _report(item, tracker.states.get(item.job_id, ""), out)
    return 1 if failed else 0


def _progress_table(jobs: list[Any], tracker: _Tracker, started: float) -> Any:
    from rich.table import Table

    title = f"ringctl jobs ({time.time() - started:.0f} s)"
    if tracker.trouble:
        title += f"  [yellow]no answer from SLURM for {tracker.lost_for():.0f} s: {tracker.trouble}[/]"
    table = Table(title=title, title_justify="left")
    for column in ("job", "stage", "state", "folder"):
        table.add_column(column)
    for item in jobs:
        state = tracker.states.get(item.job_id, "")
        name = stage(state)
        table.add_row(item.job_id, f"[{COLORS.get(name, 'white')}]{name}[/]", state, str(item.folder))
    return table


def _report(item: Any, state: str, console: Any) -> bool:
    """Print one ended job's result summary, its cancellation, or its first cause (rank,
    node, and the traceback when the rank's own code raised). True when it succeeded."""
    ref = JobRef(item.job_id, item.folder, item.kind)
    results = ref.results()
    name = stage(state)
    if name == "done" and results is not None and not results.get("error"):
        summarise(results, item.folder / "results.json", console)
        return True
    if name == "cancelled":
        where = f": {results['stopped']}" if results and results.get("stopped") else ""
        console.print(f"[magenta]job {item.job_id} was cancelled[/] ({state}){where} (folder {item.folder})")
        return False
    console.print(f"[red]job {item.job_id} failed[/] ({state or 'unknown state'}; folder {item.folder})")
    cause = root_cause(item.folder, item.job_id, item.kind)
    if cause is None and results is not None and results.get("error"):
        cause = str(results["error"])
    print(cause or f"no rank left a record; see the logs: ringctl logs {item.job_id}", file=sys.stderr)
    if results is not None and results.get("losses"):
        print(f"losses of the {len(results['losses'])} steps done are in {item.folder / 'results.json'}", file=sys.stderr)
    return False


def _custom_rows(results: dict[str, Any], table: Any) -> None:
    """A custom workload's return value (each key of a dict on its own row) and the
    attention shapes its ring_attention calls had (ringctl.workloads.custom)."""
    value = results["custom"]
    items = value.items() if isinstance(value, dict) else [("", value)]
    for key, item in items:
        text = item if isinstance(item, str) else json.dumps(item)
        table.add_row(f"returned {key}".rstrip(), text if len(text) <= 80 else text[:77] + "...")
    calls = results.get("attention_calls")
    if calls:
        for c in calls:
            table.add_row(
                "ring_attention calls",
                f"{c['calls']} x B {c['batch']}, S {c['seq_len']}, heads {c['heads']}/{c['kv_heads']} x {c['head_dim']}, "
                f"{c['dtype']}{', causal' if c['causal'] else ''}",
            )
    elif calls is not None:
        table.add_row("ring_attention calls", "none through ctx.ring_attention: the plan's predictions are unknown")


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
    if results.get("attempt"):
        starts = [a for a in results.get("attempts", []) if a.get("event") == "start"]
        table.add_row(
            "attempts",
            f"{results['attempt'] + 1} (requeued {results['attempt']}x; resumed from step "
            f"{results.get('resumed_from_step', '?')}; nodes of the last: {', '.join(dict.fromkeys(starts[-1]['node_names'])) if starts else '?'})",
        )
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
    if "tokens_match_reference" in results:
        match = results["tokens_match_reference"]
        verdict = "[green]identical[/]" if match else "[red]DIFFERENT[/]"
        table.add_row(
            "generated tokens vs one process",
            f"{verdict} (max logit difference {results['reference']['max_logit_error']:.1e})",
        )
    if "prefill_tokens_per_s" in results:
        table.add_row("prefill", f"{results['prefill_tokens_per_s']:,.0f} tokens/s")
    if "strategies" in results:
        counts = {m: results["strategies"].count(m) for m in dict.fromkeys(results["strategies"])}
        table.add_row("strategy per turn", ", ".join(f"{m} x{n}" for m, n in counts.items()))
    if "losses" in results:
        losses = results["losses"]
        table.add_row("loss", f"{losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
    if "custom" in results:
        _custom_rows(results, table)
    console.print(table)
    wandb = results.get("wandb", {})
    if wandb.get("sync_command"):
        print(f"W&B offline run; to upload: {wandb['sync_command']}")
    print(f"results: {path}")
