"""Measures both directions of the dev cluster's emulated fabric, for every node pair and
for a ring of all nodes, with one srun task per node.

    srun -N3 --ntasks-per-node=1 python tests/direction_probe.py --dir SHARED_DIR --mb 2

Every task binds to its node's eth0 address (as gloo does) and serves on it; addresses and
barriers travel through SHARED_DIR (every node shares this machine's file system).

- pairs: one node pair at a time, each node of the pair sends ``--mb`` MB to the other at
  the same moment (both directions of the pair's path at once).
- one_way: every node at once sends ``--mb`` MB to the next node of the ring (node order).
- two_way: every node at once sends half of it to the next node and half to the previous
  one (a bidirectional ring's step: the same bytes per node, split over both directions).

Prints one JSON line per task: MB/s per direction for each pair it was in, and the seconds
of its one_way and two_way sends (each from a common barrier to the receiver's
acknowledgement of the last byte). On a switch (links=switch) a node's egress is shared by
its peers, so two_way takes as long as one_way; with a link per pair (links=mesh) two_way
uses the idle reverse direction of every ring link and takes about half as long.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fabric_probe import nic_address  # the probes run from tests/, beside it

CHUNK = 1 << 20


def read_exactly(sock: socket.socket, nbytes: int) -> bytes:
    parts, left = [], nbytes
    while left:
        data = sock.recv(min(CHUNK, left))
        if not data:
            raise ConnectionError(f"peer closed with {left} bytes left")
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


class Server:
    """Accepts connections on ``addr``; each sends an 8-byte length, then that many bytes,
    and gets one byte back once all of them arrived."""

    def __init__(self, addr: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((addr, 0))
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    @staticmethod
    def _one(conn: socket.socket) -> None:
        with conn:
            (nbytes,) = struct.unpack("!Q", read_exactly(conn, 8))
            left = nbytes
            while left:
                data = conn.recv(min(CHUNK, left))
                if not data:
                    return
                left -= len(data)
            conn.sendall(b"k")

    def close(self) -> None:
        self.sock.close()


def send(src: str, dst: tuple[str, int], nbytes: int, out: dict[str, float], key: str) -> None:
    """Seconds from the first byte to the receiver's acknowledgement, into out[key]."""
    payload = os.urandom(min(CHUNK, nbytes))
    with socket.create_connection(dst, timeout=120, source_address=(src, 0)) as sock:
        start = time.perf_counter()
        sock.sendall(struct.pack("!Q", nbytes))
        left = nbytes
        while left:
            n = min(len(payload), left)
            sock.sendall(payload[:n])
            left -= n
        if sock.recv(1) != b"k":
            raise ConnectionError("no acknowledgement")
        out[key] = time.perf_counter() - start


def sends(src: str, targets: list[tuple[tuple[str, int], int, str]]) -> dict[str, float]:
    """All ``(address, bytes, key)`` sends at once, each in its own thread."""
    out: dict[str, float] = {}
    threads = [threading.Thread(target=send, args=(src, dst, n, out, key)) for dst, n, key in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    missing = {key for _, _, key in targets} - set(out)
    if missing:
        raise RuntimeError(f"sends that did not finish: {sorted(missing)}")
    return out


class Rendezvous:
    """Files in the shared folder: every node's address, and named barriers."""

    def __init__(self, folder: Path, node: int, nodes: int) -> None:
        self.folder, self.node, self.nodes = folder, node, nodes

    def publish(self, addr: str, port: int) -> None:
        tmp = self.folder / f"addr-{self.node}.tmp"
        tmp.write_text(f"{addr} {port}")
        tmp.rename(self.folder / f"addr-{self.node}")

    def address(self, node: int, timeout_s: float = 60) -> tuple[str, int]:
        path = self.folder / f"addr-{node}"
        self._wait(path.exists, timeout_s, f"node {node}'s address")
        host, port = path.read_text().split()
        return host, int(port)

    def barrier(self, name: str, timeout_s: float = 120) -> None:
        (self.folder / f"barrier-{name}-{self.node}").touch()
        paths = [self.folder / f"barrier-{name}-{n}" for n in range(self.nodes)]
        self._wait(lambda: all(p.exists() for p in paths), timeout_s, f"barrier {name}")

    @staticmethod
    def _wait(ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        end = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > end:
                raise TimeoutError(f"{what}: not there after {timeout_s}s")
            time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="shared rendezvous folder")
    parser.add_argument("--mb", type=float, default=2.0, help="MB each node sends per measurement")
    args = parser.parse_args()
    nbytes = int(args.mb * 1e6)
    node, nodes = int(os.environ["SLURM_NODEID"]), int(os.environ["SLURM_NNODES"])
    addr = nic_address(os.environ.get("GLOO_SOCKET_IFNAME", "eth0"))
    server = Server(addr)
    meet = Rendezvous(args.dir, node, nodes)
    meet.publish(addr, server.sock.getsockname()[1])
    peers = {n: meet.address(n) for n in range(nodes)}
    record: dict[str, object] = {"node": node, "name": os.environ["SLURMD_NODENAME"], "addr": addr, "pairs": {}}
    pairs = [(a, b) for a in range(nodes) for b in range(a + 1, nodes)]
    for a, b in pairs:  # one pair at a time, both directions at once
        meet.barrier(f"pair-{a}-{b}")
        if node in (a, b):
            other = b if node == a else a
            took = sends(addr, [(peers[other], nbytes, "s")])["s"]
            record["pairs"][f"{node}->{other}"] = nbytes / took / 1e6  # type: ignore[index]
    if nodes > 1:
        after, before = (node + 1) % nodes, (node - 1) % nodes
        meet.barrier("one_way")
        start = time.perf_counter()
        sends(addr, [(peers[after], nbytes, "next")])
        record["one_way_s"] = time.perf_counter() - start
        meet.barrier("two_way")
        start = time.perf_counter()
        half = nbytes // 2
        sends(addr, [(peers[after], half, "next"), (peers[before], nbytes - half, "previous")])
        record["two_way_s"] = time.perf_counter() - start
    meet.barrier("done")
    server.close()
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
