"""A SLURM job's rendezvous port: rank 0 publishes a port the kernel reports free in the
job folder, the other ranks read it there (ringctl.job._rendezvous_port). The whole path
runs in test_launch_slurm's 16-rank job; here, its contract on threads and files."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from ringctl.job import _rendezvous_port


@pytest.fixture()
def slurm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_STEP_ID", "0")


def test_ranks_wait_for_the_port_rank0_publishes(tmp_path: Path, slurm_env: None) -> None:
    got: dict[int, int] = {}
    readers = [threading.Thread(target=lambda r=r: got.__setitem__(r, _rendezvous_port(tmp_path, r, 0, 30))) for r in (1, 2, 3)]
    for t in readers:  # they start before rank 0 has published anything
        t.start()
    port = _rendezvous_port(tmp_path, 0, 0, 30)
    for t in readers:
        t.join(timeout=30)
    assert got == {1: port, 2: port, 3: port}
    with socket.socket() as sock:  # free when published: the TCPStore can bind it
        sock.bind(("", port))
    assert (tmp_path / "4242_rendezvous_0_0.port").read_text().strip() == str(port)


def test_each_attempt_has_its_own_port_file(tmp_path: Path, slurm_env: None) -> None:
    """A requeued job's ranks must not meet on the port of the attempt before."""
    first = _rendezvous_port(tmp_path, 0, 0, 5)
    second = _rendezvous_port(tmp_path, 0, 1, 5)
    assert _rendezvous_port(tmp_path, 1, 0, 5) == first
    assert _rendezvous_port(tmp_path, 1, 1, 5) == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4242_rendezvous_0_0.port", "4242_rendezvous_1_0.port"]


def test_no_port_published_names_the_timeout_and_the_file(tmp_path: Path, slurm_env: None) -> None:
    with pytest.raises(TimeoutError, match=r"rank 2: .*4242_rendezvous_0_0\.port.*launcher\.init_timeout_s=0\.2 s"):
        _rendezvous_port(tmp_path, 2, 0, 0.2)
