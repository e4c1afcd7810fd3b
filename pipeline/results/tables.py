"""Parquet and JSON I/O through fsspec: atomic writes, explicit schemas, local or s3://.

Only this module, `pipeline.data.listing`, `pipeline.data.decode` and `pipeline.models.checkpoint` touch storage.
A final table is written to a temporary name next to its destination and moved into place, so a reader never sees
half a table and a crashed run leaves no final output.

    write(catalog.TOPK, rows, out)          # rows conformed to the declaration -> <out>/stimuli/topk.parquet
    rows = read(catalog.TOPK, out)          # the table a job wrote under its --out
    write_table(table, "s3://bucket/out/x.parquet")       # any other URL
"""
from __future__ import annotations

import json
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.results.catalog import Table
from pipeline.results.urls import join

__all__ = ["join", "fs_path", "exists", "makedirs", "write", "read", "write_table", "read_table",
           "write_json", "read_json", "write_bytes", "read_bytes", "remove"]


def fs_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(url)


def exists(url: str) -> bool:
    fs, path = fs_path(url)
    return fs.exists(path)


def makedirs(url: str) -> None:
    fs, path = fs_path(url)
    fs.makedirs(path, exist_ok=True)


def _parent(fs: fsspec.AbstractFileSystem, path: str) -> None:
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)


def write_bytes(url: str, data: bytes) -> None:
    """Write `data` atomically: a temporary sibling first, then a move."""
    fs, path = fs_path(url)
    _parent(fs, path)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def read_bytes(url: str) -> bytes:
    fs, path = fs_path(url)
    with fs.open(path, "rb") as f:
        return f.read()


def write_table(table: pa.Table, url: str, schema: pa.Schema | None = None) -> None:
    if schema is not None:
        table = table.select(schema.names).cast(schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_bytes(url, sink.getvalue().to_pybytes())


def read_table(url: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = fs_path(url)
    return pq.read_table(path, filesystem=fs, columns=columns)


def write(table: Table, rows: pa.Table, out: str) -> str:
    """`rows` as the catalog declares `table` (its columns and types, rows in its order),
    written atomically to its path under a job's `out`; returns the URL."""
    url = table.at(out)
    write_table(table.conform(rows), url)
    return url


def read(table: Table, out: str, columns: list[str] | None = None) -> pa.Table:
    """The `table` a job wrote under its `out` (FileNotFoundError when there is none)."""
    return read_table(table.at(out), columns)


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def remove(url: str, recursive: bool = False) -> None:
    fs, path = fs_path(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)
