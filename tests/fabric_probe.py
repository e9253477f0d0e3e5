"""Measures TCP throughput on the dev cluster's emulated fabric, one srun task per NIC.

    srun -N2 --ntasks-per-node=L python tests/fabric_probe.py --dir SHARED_DIR --mb 8

Every task binds to the address of its NIC (GLOO_SOCKET_IFNAME, which the fabric's
TaskProlog sets per local rank, as gloo would) and first times a transfer to itself: the
namespace's loopback (the record names the device the kernel routes it through). Then tasks on the first node serve and tasks on the second node send
to the server with the same local rank (same rail), all rails at once, and the server
sends the same amount back (both directions are throttled); the server's
address travels through SHARED_DIR (every node shares this machine's file system).
Prints one JSON line per task.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

CHUNK = 1 << 20


def nic_address(ifname: str) -> str:
    out = subprocess.run(
        ["ip", "-o", "-4", "addr", "show", "dev", ifname], check=True, capture_output=True, text=True
    ).stdout.split()
    return out[out.index("inet") + 1].split("/")[0]


def route_device(addr: str) -> str:
    """The device this namespace routes packets to addr through ("lo" for its own address)."""
    out = subprocess.run(["ip", "-o", "route", "get", addr], check=True, capture_output=True, text=True).stdout.split()
    return out[out.index("dev") + 1]


def read_exactly(sock: socket.socket, nbytes: int) -> None:
    left = nbytes
    while left:
        data = sock.recv(min(CHUNK, left))
        if not data:
            raise ConnectionError(f"peer closed with {left} bytes left")
        left -= len(data)


def write(sock: socket.socket, nbytes: int) -> None:
    payload = os.urandom(CHUNK)
    left = nbytes
    while left:
        n = min(CHUNK, left)
        sock.sendall(payload[:n])
        left -= n


def receive(listener: socket.socket, nbytes: int, echo: bool = False) -> None:
    """Accept one connection, read nbytes, answer one byte (the sender's clock stops there);
    with echo, then send nbytes back (the other direction)."""
    conn, _ = listener.accept()
    with conn:
        read_exactly(conn, nbytes)
        conn.sendall(b"k")
        if echo:
            write(conn, nbytes)


def send(src: str, dst: tuple[str, int], nbytes: int, echo: bool = False) -> tuple[float, float]:
    """Seconds from the first byte sent to the receiver's acknowledgement of nbytes; with
    echo, also the seconds to read nbytes back."""
    with socket.create_connection(dst, timeout=60, source_address=(src, 0)) as sock:
        start = time.perf_counter()
        write(sock, nbytes)
        if sock.recv(1) != b"k":
            raise ConnectionError("no acknowledgement")
        sent = time.perf_counter() - start
        if not echo:
            return sent, 0.0
        start = time.perf_counter()
        read_exactly(sock, nbytes)
        return sent, time.perf_counter() - start


def listen(addr: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((addr, 0))
    sock.listen(1)
    return sock


def loopback_seconds(addr: str, nbytes: int) -> float:
    with listen(addr) as listener:
        server = threading.Thread(target=receive, args=(listener, nbytes))
        server.start()
        seconds, _ = send(addr, listener.getsockname(), nbytes)
        server.join()
    return seconds


def wait_for_file(path: Path, timeout_s: float) -> str:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if path.exists():
            return path.read_text()
        time.sleep(0.05)
    raise TimeoutError(f"no server address in {path} after {timeout_s}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="shared rendezvous folder")
    parser.add_argument("--mb", type=float, default=8.0, help="MB sent per transfer")
    args = parser.parse_args()
    nbytes = int(args.mb * 1e6)
    node_id, local = int(os.environ["SLURM_NODEID"]), int(os.environ["SLURM_LOCALID"])
    ifname = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    addr = nic_address(ifname)
    record: dict[str, object] = {
        "node": os.environ["SLURMD_NODENAME"], "node_id": node_id, "local": local,
        "ifname": ifname, "addr": addr, "netns": os.readlink("/proc/self/ns/net"),
        "loop_dev": route_device(addr), "loop_MBps": nbytes / loopback_seconds(addr, nbytes) / 1e6,
    }
    rendezvous = args.dir / f"server-{local}"
    if node_id == 0:
        with listen(addr) as listener:
            tmp = rendezvous.with_suffix(".tmp")
            tmp.write_text(f"{addr} {listener.getsockname()[1]}")
            tmp.rename(rendezvous)
            listener.settimeout(60)
            receive(listener, nbytes, echo=True)
    elif node_id == 1:
        host, port = wait_for_file(rendezvous, 60).split()
        record["peer"] = host
        sent, received = send(addr, (host, int(port)), nbytes, echo=True)
        record["cross_MBps"] = nbytes / sent / 1e6  # second node -> first
        record["cross_back_MBps"] = nbytes / received / 1e6  # first node -> second
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
