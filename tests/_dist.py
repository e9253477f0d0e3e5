"""Run a function on W real gloo processes (spawned, 127.0.0.1) and collect what each returns.

Starting a process that imports torch costs seconds on a 2-core machine, so the processes
are a pool kept for the whole session: a call hands ``fn`` to the first W of them, each
joins a fresh gloo process group (new port), runs it, and leaves the group. Every call
gets a fresh group and the caller's environment; a worker restores the environment, the
default dtype and the global RNG after each call. What ``fn`` changes in modules (a
monkeypatched attribute) it must restore itself: the next call, maybe another test
module's, runs in the same process. After a failure, a timeout or a dead rank the pool is
discarded and the next call starts fresh processes. Tests still run many cases per call.
"""

from __future__ import annotations

import atexit
import itertools
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GLOO_TIMEOUT_S = 60
_PARENT_POLL_S = 5.0  # an idle worker checks this often that the session still runs


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_one(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple[Any, ...]) -> tuple[bool, Any]:
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=GLOO_TIMEOUT_S),
        )
        try:
            return True, fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
    except BaseException:  # report anything to the parent instead of dying silently  # noqa: BLE001
        return False, traceback.format_exc()


def _serve(tasks: Any, results: Any) -> None:
    """A pool worker: run calls until told to stop (None) or the session is gone."""
    parent = os.getppid()
    torch.set_num_threads(1)
    rng = torch.get_rng_state()
    try:
        while True:
            try:
                task = tasks.get(timeout=_PARENT_POLL_S)
            except queue.Empty:
                if os.getppid() != parent:  # the session died without stopping us
                    return
                continue
            if task is None:
                return
            call, fn, rank, world_size, port, args, env = task
            os.environ.clear()
            os.environ.update(env)
            os.environ.setdefault("RINGCTL_BLOCK_IMPL", "torch")
            try:
                ok, value = _run_one(fn, rank, world_size, port, args)
            finally:  # as a fresh process would start the next call
                os.environ.clear()
                os.environ.update(env)
                torch.set_default_dtype(torch.float32)
                torch.set_rng_state(rng)
                torch.set_grad_enabled(True)
                torch.set_num_threads(1)
            results.put((call, rank, ok, value))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the session reports it
        return


@dataclass
class _Pool:
    ctx: Any
    results: Any
    procs: list[Any] = field(default_factory=list)
    tasks: list[Any] = field(default_factory=list)

    def grow(self, size: int) -> None:
        started = []
        while len(self.procs) < size:
            tasks = self.ctx.Queue()
            proc = self.ctx.Process(target=_serve, args=(tasks, self.results), daemon=True)
            self.tasks.append(tasks)
            self.procs.append(proc)
            started.append(proc)
        for proc in started:
            proc.start()

    def close(self, kill: bool = False) -> None:
        if not kill:
            for tasks in self.tasks:
                tasks.put(None)
        for proc in self.procs:
            if proc.pid is None:
                continue
            if kill:
                proc.kill()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)


_POOL: list[_Pool] = []  # the session's pool, once started
_calls = itertools.count()


def _get_pool(size: int) -> _Pool:
    if not _POOL:
        ctx = mp.get_context("spawn")
        _POOL.append(_Pool(ctx, ctx.Queue()))
    _POOL[0].grow(size)
    return _POOL[0]


def _discard_pool() -> None:
    while _POOL:
        _POOL.pop().close(kill=True)


@atexit.register
def _stop_pool() -> None:
    while _POOL:
        _POOL.pop().close()


def run_workers(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 240
) -> list[Any]:
    """``[fn(rank, world_size, *args) for each rank]``, each on its own gloo process.

    ``fn`` must be importable (module level). A worker's exception fails the call with
    that worker's traceback.
    """
    pool = _get_pool(world_size)
    call = next(_calls)
    port = free_port()
    env = dict(os.environ)
    for rank in range(world_size):
        pool.tasks[rank].put((call, fn, rank, world_size, port, args, env))
    outcome: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout_s
    healthy = False
    try:
        while len(outcome) < world_size:
            try:
                got, rank, ok, value = pool.results.get(timeout=1)
                if got == call:
                    outcome[rank] = (ok, value)
                continue
            except queue.Empty:
                pass
            missing = sorted(set(range(world_size)) - set(outcome))
            # a rank that died without reporting (killed, or failed to start) never will
            if any(pool.procs[r].exitcode is not None for r in missing) and pool.results.empty():
                time.sleep(1)  # its report may still be in the pipe
                if pool.results.empty():
                    codes = {r: pool.procs[r].exitcode for r in missing}
                    raise RuntimeError(f"ranks exited without a result, exit codes {codes}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ranks {missing} of {world_size} gave no result in {timeout_s}s")
        healthy = all(ok for ok, _ in outcome.values())
    finally:
        if not healthy:  # a rank may still hang in a collective, or hold state we cannot trust
            _discard_pool()
    failures = [f"rank {r}:\n{v}" for r, (ok, v) in sorted(outcome.items()) if not ok]
    if failures:
        raise RuntimeError("worker failed\n" + "\n".join(failures))
    return [outcome[rank][1] for rank in range(world_size)]
