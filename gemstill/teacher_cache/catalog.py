"""The teacher cache's layout on disk, shared by the writer and the reader: shard schema, DuckDB catalog, paths.

Its own module so that reading a cache (training, evaluation) never imports the code that computes one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import duckdb
import ml_dtypes
import numpy as np
import pyarrow as pa

from gemstill.errors import GemstillError

CATALOG = "catalog.duckdb"
PART = "catalog.process-{index}.duckdb"  # one process's shards in a multi-process run, until process 0 merges
PART_GLOB = "catalog.process-*.duckdb"
SHARDS = "shards"
VALUE_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
SHARD_SCHEMA = pa.schema(
    [
        ("seq_index", pa.int64()),
        ("seq_id", pa.string()),
        ("mask", pa.list_(pa.bool_())),  # [L]: position i holds the distribution of token i+1 (a loss target)
        ("ids", pa.list_(pa.int32())),  # [n * k]: per kept position, k ascending ids stored as deltas
        ("logprobs", pa.list_(pa.uint16())),  # [n * k]: raw float16 / bfloat16 bits, in id order
        ("lse", pa.list_(pa.float32())),  # [n] per kept position
        ("entropy", pa.list_(pa.float32())),
        ("tail_mass", pa.list_(pa.float32())),
    ]
)
# deltas of sorted ids and 16-bit values compress far better split into byte planes: their high bytes are near-constant
ENCODING = {"ids.list.element": "BYTE_STREAM_SPLIT", "logprobs.list.element": "BYTE_STREAM_SPLIT"}
CATALOG_DDL = """
CREATE TABLE IF NOT EXISTS shards (
    split VARCHAR, path VARCHAR PRIMARY KEY, seq_start BIGINT, seq_end BIGINT, rows BIGINT, tokens BIGINT,
    bytes BIGINT, sha256 VARCHAR, teacher_fingerprint VARCHAR, tokenizer_fingerprint VARCHAR, k INTEGER,
    mode VARCHAR, temperature DOUBLE, value_dtype VARCHAR, seed BIGINT, kept_mass_sum DOUBLE, entropy_sum DOUBLE,
    value_err_max DOUBLE, value_err_sum DOUBLE, created_at TIMESTAMP)
"""
# what a catalog row must share with this run (seed only matters, and is only stored, for sampled ids)
IDENTITY = ("teacher_fingerprint", "tokenizer_fingerprint", "k", "mode", "temperature", "value_dtype", "seed")


def connect_catalog(path: Path, read_only: bool = False, wait_s: float = 60.0) -> duckdb.DuckDBPyConnection:
    """Open the catalog, waiting while another process holds it (each holder keeps it open only briefly)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as err:
            reason = " ".join(str(err).split())[:200]
            if "lock" not in str(err):
                raise GemstillError(
                    f"{path}: not a readable DuckDB catalog ({reason}); the teacher cache is damaged: recompute it "
                    "with --refresh teacher_cache"
                ) from None
            if time.monotonic() > deadline:
                raise GemstillError(
                    f"{path}: locked by another process for over {wait_s:.0f} s ({reason}); wait for that run to "
                    "finish, or stop it"
                ) from None
            time.sleep(0.05)
        except duckdb.Error as err:
            raise GemstillError(
                f"{path}: not a readable DuckDB catalog ({type(err).__name__}); the teacher cache is damaged: "
                "recompute it with --refresh teacher_cache"
            ) from None


def catalog_rows(path: Path, where: str = "", params: tuple = ()) -> list[dict[str, Any]]:
    with connect_catalog(path, read_only=True) as con:
        cursor = con.execute(f"SELECT * FROM shards {where} ORDER BY split, seq_start", list(params))
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def shard_path(split: str, seq_start: int, seq_end: int) -> str:
    """A shard's path relative to out_dir."""
    return f"{SHARDS}/{split}/{split}-{seq_start:09d}-{seq_end:09d}.parquet"
