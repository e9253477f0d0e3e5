"""How a task process ends (ringctl.job._exit_if_saved_success): once submitit has saved a
successful result it leaves by os._exit(0), before the interpreter's teardown (where a
finished rank once aborted, and SLURM counted the task FAILED); any other ending is left
alone. Real processes, a real result pickle; only the job environment's paths are given."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import atexit, pathlib, sys, types
import submitit
from submitit.core.utils import cloudpickle_dump
import ringctl.job as job

folder = pathlib.Path(sys.argv[1])
outcome, code = sys.argv[2], int(sys.argv[3])
result = folder / "result.pkl"
if outcome != "none":
    cloudpickle_dump((outcome, {"ok": True}), result)
# registered first, so it runs after the hook (atexit is last in, first out): it only
# runs when the hook let the interpreter go on
atexit.register(lambda: (folder / "teardown_ran").write_text("yes"))
submitit.JobEnvironment = lambda: types.SimpleNamespace(paths=types.SimpleNamespace(result_pickle=result))
atexit.register(job._exit_if_saved_success)
print("task body done", flush=True)
sys.exit(code)
"""


@pytest.mark.parametrize(
    ("outcome", "code", "left_early", "exit_code"),
    [
        ("success", 0, True, 0),  # saved success: os._exit(0) before the teardown
        ("error", 1, False, 1),  # submitit saved the error and re-raised: exits as it would
        ("none", 1, False, 1),  # nothing saved (the save itself failed): the ordinary exit
    ],
)
def test_a_task_leaves_early_only_after_a_saved_success(tmp_path: Path, outcome: str, code: int, left_early: bool, exit_code: int) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), outcome, str(code)], capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == exit_code, done.stdout + done.stderr
    assert "task body done" in done.stdout  # stdout flushed before leaving
    assert (tmp_path / "teardown_ran").exists() is not left_early
