"""`ringctl launch`: compose conf/, validate, submit, then follow the job (ringctl.jobs).

    ringctl launch +topology=2node                     # local processes, or SLURM if sbatch is here
    ringctl launch +topology=2node launcher=slurm      # SLURM, one task per rank
    ringctl launch +topology=2node wait=false          # print job id and folder, return at once
    ringctl launch -m workload.seq_len=1024,2048 topology.ring=flat,hierarchical
                                                       # sweep: every point validated, one job array
    ringctl launch +topology=2node launcher=slurm --dry-run    # config + sbatch script, nothing submitted
    ringctl launch +topology=2node launcher=slurm --preflight  # + sbatch --test-only: accepted? starts when?
    ringctl launch --cfg job | --help                  # Hydra's own behaviour

Bad input (unknown group option or key, wrong type, a sequence the layout cannot split,
tasks that do not fit the topology, an sbatch value with a newline) prints one line
naming the key, the value and what is allowed, exits 2, and submits nothing.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from typing import Any

from ringctl.errors import ConfigError

# flags that are Hydra's own business: handed to Hydra's app runner untouched
HYDRA_FLAGS = {
    "--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--resolve",
    "--package", "-p", "--shell-completion", "-sc", "--version",
}
MULTIRUN_FLAGS = {"-m", "--multirun"}
DRY_RUN, PREFLIGHT = "--dry-run", "--preflight"
# how Hydra itself is set up for `ringctl launch`: our sweep launcher, no logs or output
# folders of Hydra's own (ringctl makes the job folders)
HYDRA_SETUP = [
    "hydra/launcher=ringctl",
    "hydra/job_logging=none",
    "hydra/hydra_logging=none",
    "hydra.output_subdir=null",
]


def main(command: str, argv: list[str]) -> int:
    """`--config-dir DIR` (else RINGCTL_CONFIG_DIR) adds the user's configs to the search
    path of every form: one job, a sweep, and Hydra's own flags (--help lists DIR's options)."""
    from ringctl.config import pop_config_dir, searchpath_overrides

    try:
        config_dir, argv = pop_config_dir(argv)
        # the Hydra override naming DIR; first, so Hydra's flags may follow the overrides
        search = searchpath_overrides(config_dir)
    except ConfigError as exc:
        print(f"ringctl launch: {exc}", file=sys.stderr)
        return 2
    # --dry-run: print the config and what would be submitted; --preflight: also ask
    # `sbatch --test-only` whether SLURM would take it and when it would start
    check = PREFLIGHT in argv
    dry = check or DRY_RUN in argv
    argv = [a for a in argv if a not in (DRY_RUN, PREFLIGHT)]
    if any(a.split("=")[0] in HYDRA_FLAGS for a in argv):
        return _hydra_app(search + argv)
    if any(a in MULTIRUN_FLAGS for a in argv):
        modes = ["hydra.launcher.dry_run=true"] * dry + ["hydra.launcher.preflight=true"] * check
        return sweep(search + [a for a in argv if a not in MULTIRUN_FLAGS] + modes)
    return launch_one(argv, config_dir, dry_run=dry, preflight=check)


def launch_one(
    overrides: list[str], config_dir: str | None = None, dry_run: bool = False, preflight: bool = False
) -> int:
    """One job: compose (with the user's `config_dir`), validate, submit, then follow it
    unless wait=false. `dry_run`: print the config and the sbatch script (or the local
    plan) instead of submitting; `preflight`: that, plus sbatch --test-only's verdict."""
    code, cfg, job = submit_one("launch", overrides, config_dir, dry_run=dry_run, preflight=preflight)
    if job is None:
        return code
    if not cfg.wait:
        print(f"follow it with: ringctl status {job.job_id}   ringctl logs {job.job_id} --follow")
        return 0
    from ringctl.jobs import follow

    return follow([job])


def submit_one(
    command: str, overrides: list[str], config_dir: str | None = None, *, dry_run: bool = False, preflight: bool = False
) -> tuple[int, Any, Any]:
    """Compose, validate and submit one job: (exit code, config, submitted job). The job is
    None when nothing was submitted: bad input (exit 2, one line naming the key), a refused
    submission (2 when the cause is the user's input, else 1), or a dry run."""
    from ringctl.config import compose
    from ringctl.launch import SubmissionError, make_launcher, show_dry_run, validate

    try:
        cfg = compose(overrides, config_dir)
        res = validate(cfg)
        launcher = make_launcher(res, cfg.launcher.get("root"))  # checks the runs root
        if dry_run:
            return show_dry_run(launcher, [(cfg, res)], str(cfg.name), [tuple(overrides)], check=preflight), cfg, None
    except ConfigError as exc:
        print(f"ringctl {command}: {exc}", file=sys.stderr)
        return 2, None, None
    try:
        [job] = launcher.submit([(cfg, res)], name=str(cfg.name), overrides=[tuple(overrides)])
    except SubmissionError as exc:
        print(f"ringctl {command}: {exc}", file=sys.stderr)
        return (2 if exc.user_input else 1), cfg, None
    print(f"submitted job {job.job_id} ({launcher.kind}); folder: {job.folder}")
    return 0, cfg, job


def sweep(overrides: list[str]) -> int:
    """A Hydra multirun through ringctl's launcher plugin (hydra_plugins/ringctl_launcher):
    every point composed and validated first, then all submitted as one job array."""
    if any(o.partition("=")[0] == "wait" and o.partition("=")[2].lower() == "true" for o in overrides):
        overrides = [o for o in overrides if o.partition("=")[0] != "wait"] + ["hydra.launcher.wait=true"]
    scratch = tempfile.mkdtemp(prefix="ringctl-sweep-")  # Hydra's own sweep dir: thrown away
    try:
        return _hydra_app(["--multirun", f"hydra.sweep.dir={scratch}", *overrides], user_overrides=overrides)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _hydra_app(argv: list[str], user_overrides: list[str] | None = None) -> int:
    """Run Hydra's public app entry (`hydra.main`) on `argv`: sweeps (`--multirun`), and
    --help, --cfg job, --info ... exactly as Hydra does them for an app.

    Outcomes: a composition error (unknown option or key, wrong type) reaches us as an
    exception because HYDRA_FULL_ERROR=1 (Hydra's documented switch) stops Hydra from
    printing a traceback and exiting 1 itself; it becomes one line and exit 2. The sweep
    plugin ends with SystemExit carrying the sweep's exit code (2: a bad point, nothing
    submitted; 1: a job failed): a Launcher's only other outcome in Hydra's API is a
    FAILED JobReturn, which Hydra reports as its own traceback with exit 1, losing the
    difference between bad input and a failed job. SystemExit is not an Exception, so
    hydra.main passes it through unchanged.
    """
    import os

    import hydra
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ringctl.config import CONF_PATH, CONFIG_NAME, config_error_from

    @hydra.main(config_path=CONF_PATH, config_name=CONFIG_NAME, version_base=None)
    def app(cfg: Any) -> None:  # reached only for flags that also run the app (--resolve)
        print("ringctl launch: add no Hydra flags to submit a job", file=sys.stderr)

    saved_argv, saved_env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    flags, rest = _flags_first(argv)
    sys.argv = ["ringctl launch", *flags, *HYDRA_SETUP, "hydra.run.dir=.", "hydra.help.app_name='ringctl launch'", *rest]
    os.environ["HYDRA_FULL_ERROR"] = "1"
    GlobalHydra.instance().clear()
    try:
        app()
    except SystemExit as exc:
        return int(exc.code or 0)
    except ConfigError as exc:
        print(f"ringctl launch: {exc}", file=sys.stderr)
        return 2
    except (HydraException, OmegaConfBaseException) as exc:  # composition: unknown option, key, type
        given = user_overrides if user_overrides is not None else argv
        print(f"ringctl launch: {config_error_from(exc, given)}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv
        if saved_env is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_env
        GlobalHydra.instance().clear()
    return 0


# Hydra flags that take a value as the next argument (`--cfg job`, `-p PACKAGE`, ...)
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--info", "-i", "--shell-completion", "-sc"}


def _flags_first(argv: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra's flags with their values, the overrides): Hydra's argparse takes the
    overrides as one positional list, so a flag after an override is refused; the user may
    write them in either order."""
    flags: list[str] = []
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        if not arg.startswith("-"):
            rest.append(arg)
            continue
        flags.append(arg)
        if arg in _VALUE_FLAGS:
            value = next(args, None)
            if value is not None and (value.startswith("-") or "=" in value):
                rest.append(value) if not value.startswith("-") else flags.append(value)
            elif value is not None:
                flags.append(value)
    return flags, rest
