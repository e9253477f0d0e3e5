"""Read a W&B run file (`run-<id>.wandb`) back: the records wandb-core wrote, decoded with
wandb's own protobuf schema (`wandb.proto.wandb_internal_pb2.Record`).

wandb >= 0.2x no longer ships a Python reader, so the container format is read here: a
7-byte header (":W&B", magic 0xBEE1, version 0) then LevelDB-log style 32 KiB blocks of
chunks, each `crc32c u32 | length u16 | type u8 | payload` with type FULL=1, FIRST=2,
MIDDLE=3, LAST=4 (a block's tail shorter than a chunk header is zero padding).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

BLOCK = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> Iterator[bytes]:
    if data[:4] != b":W&B" or struct.unpack("<H", data[4:6])[0] != 0xBEE1:
        raise ValueError("not a W&B run file (bad header)")
    pos, pending = 7, b""
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if kind == 0 and length == 0:  # zero padding at the end of the file
            break
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        else:
            raise ValueError(f"bad chunk type {kind} at byte {pos}")


def records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in _payloads(Path(path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def _items(items: Any) -> dict[str, Any]:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def history(path: Path) -> list[dict[str, Any]]:
    """Every logged step, as {key: value} (with `_step`)."""
    return [_items(r.history.item) for r in records(path) if r.WhichOneof("record_type") == "history"]


def summary(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in records(path):
        if r.WhichOneof("record_type") == "summary":
            out.update(_items(r.summary.update))
    return out


def config(path: Path) -> dict[str, Any]:
    """The run's config (sent with the run record, updated by config records)."""
    out: dict[str, Any] = {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(_items(r.run.config.update))
        elif kind == "config":
            out.update(_items(r.config.update))
    return out


def run_group(path: Path) -> str:
    return next(r.run.run_group for r in records(path) if r.WhichOneof("record_type") == "run")
