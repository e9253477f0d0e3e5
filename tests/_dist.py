"""Run a function on W real gloo processes (spawned, 127.0.0.1) and collect what each returns.

Tests start each world size once and run many cases inside that process group, because
starting W processes that import torch costs seconds on a 2-core machine.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GLOO_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    results: Any,
    args: tuple[Any, ...],
) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("RINGCTL_BLOCK_IMPL", "torch")
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=GLOO_TIMEOUT_S),
        )
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report anything to the parent instead of dying silently  # noqa: BLE001
        results.put((rank, False, traceback.format_exc()))


def run_workers(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 240
) -> list[Any]:
    """``[fn(rank, world_size, *args) for each rank]``, each on its own gloo process.

    ``fn`` must be importable (module level). A worker's exception fails the call with
    that worker's traceback.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, rank, world_size, port, results, args), daemon=True)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outcome: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outcome) < world_size:
            try:
                rank, ok, value = results.get(timeout=1)
                outcome[rank] = (ok, value)
                continue
            except queue.Empty:
                pass
            missing = sorted(set(range(world_size)) - set(outcome))
            # a rank that died without reporting (killed, or failed to start) never will
            if any(procs[r].exitcode is not None for r in missing) and results.empty():
                time.sleep(1)  # its report may still be in the pipe
                if results.empty():
                    codes = {r: procs[r].exitcode for r in missing}
                    raise RuntimeError(f"ranks exited without a result, exit codes {codes}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ranks {missing} of {world_size} gave no result in {timeout_s}s")
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    failures = [f"rank {r}:\n{v}" for r, (ok, v) in sorted(outcome.items()) if not ok]
    if failures:
        raise RuntimeError("worker failed\n" + "\n".join(failures))
    return [outcome[rank][1] for rank in range(world_size)]
