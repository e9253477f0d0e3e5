"""`ringctl launch`: compose conf/, validate, submit, follow, summarise.

    ringctl launch +topology=2node                     # local processes, or SLURM if sbatch is here
    ringctl launch +topology=2node launcher=slurm      # SLURM, one task per rank
    ringctl launch +topology=2node wait=false          # print job id and folder, return at once
    ringctl launch -m workload.seq_len=1024,2048 topology.ring=flat,hierarchical
                                                       # sweep: every point validated, one job array
    ringctl launch --cfg job | --help                  # Hydra's own behaviour

Bad input (unknown group option or key, wrong type, a sequence the layout cannot split,
tasks that do not fit the topology, an sbatch value with a newline) prints one line
naming the key, the value and what is allowed, exits 2, and submits nothing.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ringctl.errors import ConfigError

# flags that are Hydra's own business: handed to Hydra's app runner untouched
HYDRA_FLAGS = {
    "--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--resolve",
    "--package", "-p", "--shell-completion", "-sc", "--version",
}
MULTIRUN_FLAGS = {"-m", "--multirun"}
# how Hydra itself is set up for `ringctl launch`: our sweep launcher, no logs or output
# folders of Hydra's own (ringctl makes the job folders)
HYDRA_SETUP = [
    "hydra/launcher=ringctl",
    "hydra/job_logging=none",
    "hydra/hydra_logging=none",
    "hydra.output_subdir=null",
]
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


def main(command: str, argv: list[str]) -> int:
    if any(a.split("=")[0] in HYDRA_FLAGS for a in argv):
        return _hydra_app(argv)
    if any(a in MULTIRUN_FLAGS for a in argv):
        return sweep([a for a in argv if a not in MULTIRUN_FLAGS])
    return launch_one(argv)


def launch_one(overrides: list[str]) -> int:
    """One job: compose, validate, submit, then follow it unless wait=false."""
    from ringctl.config import compose
    from ringctl.launch import SubmissionError, make_launcher, validate

    try:
        cfg = compose(overrides)
        validate(cfg)
    except ConfigError as exc:
        print(f"ringctl launch: {exc}", file=sys.stderr)
        return 2
    launcher = make_launcher(cfg)
    try:
        [job] = launcher.submit([cfg], name=str(cfg.name), overrides=[tuple(overrides)])
    except SubmissionError as exc:
        print(f"ringctl launch: {exc}", file=sys.stderr)
        return 1
    print(f"submitted job {job.job_id} ({launcher.kind}); folder: {job.folder}")
    if not cfg.wait:
        print(f"follow it with: ringctl status {job.job_id}   ringctl logs {job.job_id} --follow")
        return 0
    return follow([job])


def sweep(overrides: list[str]) -> int:
    """A Hydra multirun through ringctl's launcher plugin (hydra_plugins/ringctl_launcher):
    every point composed and validated first, then all submitted as one job array."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ringctl.config import CONF_DIR, config_error_from

    if any(o.partition("=")[0] == "wait" and o.partition("=")[2].lower() == "true" for o in overrides):
        overrides = [o for o in overrides if o.partition("=")[0] != "wait"] + ["hydra.launcher.wait=true"]
    scratch = tempfile.mkdtemp(prefix="ringctl-sweep-")  # Hydra's own sweep dir: thrown away
    args = HYDRA_SETUP + [f"hydra.sweep.dir={scratch}"] + overrides
    GlobalHydra.instance().clear()
    try:
        hydra = Hydra.create_main_hydra2(task_name="ringctl", config_search_path=create_config_search_path(str(CONF_DIR)))
        hydra.multirun(config_name="config", task_function=_not_called, overrides=args)
    except ConfigError as exc:
        print(f"ringctl launch: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # the plugin exits with the job outcome (1 when a job failed)
        return int(exc.code or 0)
    except (HydraException, OmegaConfBaseException) as exc:  # composition: unknown option, key, type
        print(f"ringctl launch: {config_error_from(exc, overrides)}", file=sys.stderr)
        return 2
    finally:
        GlobalHydra.instance().clear()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def _not_called(cfg: Any) -> None:
    raise RuntimeError("ringctl's launcher plugin submits jobs; Hydra's task function is never run")


def _hydra_app(argv: list[str]) -> int:
    """--help, --cfg job, --info ...: exactly what Hydra does for an app."""
    import hydra

    from ringctl.config import CONF_DIR

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def app(cfg: Any) -> None:  # reached only for flags that also run the app (--resolve)
        print("ringctl launch: add no Hydra flags to submit a job", file=sys.stderr)

    saved = sys.argv
    sys.argv = ["ringctl launch"] + HYDRA_SETUP + ["hydra.run.dir=.", "hydra.help.app_name='ringctl launch'"] + argv
    try:
        app()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = saved
    return 0


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
    from ringctl.commands.jobs import JobRef

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
