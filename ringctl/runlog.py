"""Reading a job's W&B run back from its files: history, summary and config, offline.

A ringctl job's W&B run lives in its job folder (`wandb/offline-run-*/run-<id>.wandb` when
offline). wandb >= 0.2x ships no Python reader for that file, so the container is read here
and each record decoded with wandb's own protobuf schema
(`wandb.proto.wandb_internal_pb2.Record`): a 7-byte header (":W&B", magic 0xBEE1, version 0),
then LevelDB-log style 32 KiB blocks of chunks `crc32c u32 | length u16 | type u8 | payload`,
type FULL=1, FIRST=2, MIDDLE=3, LAST=4 (a block's tail shorter than a chunk header is zero
padding). `ringctl metrics JOB` prints what this reads.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
#: keys wandb adds to every history row / summary that say nothing about the job
INTERNAL = ("_timestamp", "_runtime")


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


def records(path: Path | str) -> Iterator[Any]:
    """Every record of a run file, as wandb's protobuf Record messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in _payloads(Path(path).read_bytes()):
        record = pb.Record()  # type: ignore[attr-defined]  # generated protobuf class
        record.ParseFromString(payload)
        yield record


def _items(items: Any) -> dict[str, Any]:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def history(path: Path | str) -> list[dict[str, Any]]:
    """Every logged step, as {key: value} (with `_step`; media as their `key/...` fields)."""
    return [_items(r.history.item) for r in records(path) if r.WhichOneof("record_type") == "history"]


def summary(path: Path | str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in records(path):
        if r.WhichOneof("record_type") == "summary":
            out.update(_items(r.summary.update))
    return out


def config(path: Path | str) -> dict[str, Any]:
    """The run's config (sent with the run record, updated by config records)."""
    out: dict[str, Any] = {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(_items(r.run.config.update))
        elif kind == "config":
            out.update(_items(r.config.update))
    return out


def run_group(path: Path | str) -> str:
    return next(r.run.run_group for r in records(path) if r.WhichOneof("record_type") == "run")


# ---- a job's run, as `ringctl metrics` shows it ----------------------------------------------


def media_prefixes(row: dict[str, Any]) -> set[str]:
    """Keys of logged media (images, tables): wandb writes them as `key/_type`, `key/path`, ..."""
    return {k[: -len("/_type")] for k in row if k.endswith("/_type")}


def scalars(row: dict[str, Any], *, internal: bool = False) -> dict[str, Any]:
    """The metrics of a history row or summary: media and `_wandb/*` dropped, and wandb's
    `_timestamp`/`_runtime` unless `internal`."""
    media = media_prefixes(row)
    out = {}
    for key, value in row.items():
        if key.startswith("_wandb") or any(key == m or key.startswith(m + "/") for m in media):
            continue
        if not internal and key in INTERNAL:
            continue
        out[key] = value
    return out


def run_file(folder: Path, results: dict[str, Any] | None = None) -> Path:
    """The `.wandb` file of the job in `folder`: under folder/wandb, the run results.json
    names (else the newest); the run directory results.json names when the folder has none.
    LookupError when the job has no run file."""
    run_dir = ((results or {}).get("wandb") or {}).get("run_dir")
    found = [p for p in (folder / "wandb").glob("*run-*/run-*.wandb") if p.parent.name != "latest-run"]
    found.sort(key=lambda p: p.stat().st_mtime)
    named = [p for p in found if run_dir and p.parent.name == Path(run_dir).name]
    if named or found:
        return (named or found)[-1]
    elsewhere = sorted(Path(run_dir).glob("run-*.wandb")) if run_dir else []
    if elsewhere:
        return elsewhere[-1]
    mode = ((results or {}).get("config", {}).get("wandb") or {}).get("mode")
    why = f" (wandb.mode={mode})" if mode else ""
    raise LookupError(f"no W&B run file in {folder / 'wandb'}{why}")


@dataclass
class RunLog:
    """A run file read once: its history rows (metrics only) and summary."""

    path: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path | str, *, internal: bool = False) -> RunLog:
        rows: list[dict[str, Any]] = []
        last: dict[str, Any] = {}
        for r in records(path):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                row = scalars(_items(r.history.item), internal=internal)
                if set(row) - {"_step", *INTERNAL}:  # a step that logged media only: not a row
                    rows.append(row)
            elif kind == "summary":
                last.update(_items(r.summary.update))
        return cls(Path(path), rows, scalars(last, internal=internal))

    @property
    def columns(self) -> list[str]:
        """`_step` first, then every metric any row has, by name."""
        keys = sorted({k for row in self.history for k in row} - {"_step"})
        return ["_step", *keys]
