"""The package installs anywhere: a wheel built from the project, installed into a fresh
virtual environment (not editable), run from a directory outside the clone, composes its
packaged configs and runs `ringctl plan` and `ringctl launch` end to end.

How the fresh environment gets its dependencies. The honest full install,
`pip install -c constraints-cpu.txt dist/ringctl-*.whl` into a new venv (CPU torch 2.13.0
from the constraints file, no CUDA download), works but took 3 min 15 s on this 2-core
machine (load ~10), far too slow for every run of the suite. So the fresh venv installs
only the wheel (`--no-deps`, with the project venv's pip through `--python`), and then a
`.pth` file appends the project venv's site-packages for torch, hydra, submitit and the rest:
those were installed from the same pyproject dependency list by `make install`, and
`pip check` confirms that the wheel's declared requirements are met. A `.pth` line adds a
directory without running that directory's own `.pth` files, so the project's editable
finder never loads: the test asserts that `ringctl`, `ringctl.conf` and the Hydra plugin
all resolve inside the fresh venv, not the clone.

The wheel is built from a copy of the project's files (tracked and untracked, not ignored),
so the build leaves nothing in the clone and cannot pick up stale files from a `build/`
directory there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from zipfile import ZipFile

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str | Path], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    # no cluster, no key, no user config dir, no path into the clone: a new user's shell
    dropped = ("SLURM_CONF", "WANDB_API_KEY", "RINGCTL_MAX_RANKS_PER_NODE", "RINGCTL_CONFIG_DIR", "RINGCTL_RUNS",
               "PYTHONPATH", "VIRTUAL_ENV")
    environ = {k: v for k, v in os.environ.items() if k not in dropped}
    environ.update(WANDB_SILENT="true", **env)
    return subprocess.run([str(a) for a in args], check=False, cwd=cwd, capture_output=True, text=True, env=environ, timeout=timeout)


def project_files() -> list[str]:
    """The files a clone holds: tracked plus untracked-but-not-ignored (git's own view)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [name for name in out.split("\0") if name and (ROOT / name).is_file()]


def source_packages() -> set[str]:
    """Every package directory of the project, as the import name it must have in a wheel."""
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "ringctl").rglob("__init__.py")}
    found |= {".".join(p.parent.relative_to(ROOT / "kernels").parts) for p in (ROOT / "kernels").rglob("__init__.py")}
    found |= {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hydra_plugins").rglob("__init__.py")}
    return {name for name in found if "__pycache__" not in name} | {"ringctl.conf"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """(wheel, fresh venv, a working directory outside the clone)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist, venv, elsewhere = tmp / "src", tmp / "dist", tmp / "venv", tmp / "elsewhere"
    for name in project_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    elsewhere.mkdir()
    built = run([sys.executable, "-m", "pip", "wheel", ".", "-w", dist, "--no-deps", "-q"], cwd=src)
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = dist.glob("ringctl-*.whl")
    made = run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=elsewhere)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    done = run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel], cwd=elsewhere)
    assert done.returncode == 0, done.stdout + done.stderr
    fresh_site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=elsewhere)
    (Path(fresh_site.stdout.strip()) / "_ringctl_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return {"wheel": wheel, "venv": venv, "python": python, "elsewhere": elsewhere}


def test_wheel_holds_every_package_and_config(installed: dict[str, Path]) -> None:
    names = ZipFile(installed["wheel"]).namelist()
    packages = {".".join(Path(n).parent.parts) for n in names if n.endswith("/__init__.py")}
    packages |= {"hydra_plugins"}  # a namespace package: no __init__.py, by design
    assert packages == source_packages() | {"hydra_plugins"}, "pyproject.toml [tool.setuptools] packages is out of date"
    configs = {n.removeprefix("ringctl/conf/") for n in names if n.startswith("ringctl/conf/") and n.endswith(".yaml")}
    assert configs == {str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")}
    assert not [n for n in names if n.startswith(("tests/", "conf/", "bench/", "build/"))]


def test_imports_resolve_to_the_installed_wheel(installed: dict[str, Path]) -> None:
    probe = ("import ringctl, ringctl.config, hydra_plugins.ringctl_launcher as p; "
             "print(ringctl.__file__); print(ringctl.config.CONF_DIR); print(p.__file__)")
    done = run([installed["python"], "-c", probe], cwd=installed["elsewhere"])
    assert done.returncode == 0, done.stderr
    site = str(installed["venv"])
    for line in done.stdout.splitlines():
        assert line.startswith(site) and not line.startswith(str(ROOT)), line
    check = run([sys.executable, "-m", "pip", "--python", installed["python"], "check"], cwd=installed["elsewhere"])
    assert check.returncode == 0, check.stdout + check.stderr


def test_plan_from_the_wheel(installed: dict[str, Path]) -> None:
    done = run([installed["venv"] / "bin" / "ringctl", "plan", "+topology=2node", "--json"], cwd=installed["elsewhere"])
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["nodes"] == 2 and data["world_size"] == 16 and data["ring"] == "hierarchical"


def test_launch_from_the_wheel(installed: dict[str, Path]) -> None:
    """The local launcher end to end: submitit starts the ranks with the fresh venv's python
    (a small sequence: what is proven is where the job's code comes from, not its sizes)."""
    where = installed["elsewhere"]
    small = ["workload.seq_len=256", "workload.check_seq_len=64", "workload.warmup=0", "workload.iters=1"]
    done = run([installed["venv"] / "bin" / "ringctl", "launch", "+topology=2node", "launcher=local", *small], cwd=where,
               timeout=540, OMP_NUM_THREADS="1")
    assert done.returncode == 0, done.stdout + done.stderr
    [entry] = [json.loads(line) for line in (where / "runs" / "index.jsonl").read_text().splitlines()]
    results = json.loads((Path(entry["folder"]) / "results.json").read_text())
    assert results["check"]["passed"] and results["check"]["max_error"] <= 1e-9, results["check"]
    assert results["plan"]["nodes"] == 2 and results["plan"]["world_size"] == 4
