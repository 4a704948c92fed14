"""The packed-sequence parquet format every stage after data preparation reads.

One row per fixed-length sequence. `seq_index` orders a split (0..N-1) and `seq_id` is a stable content id
(sha256 of the row's tokens and masks), so consumers align by sequence, never by step number.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gemstill.errors import GemstillError

SPLITS = ("train", "validation")
SCHEMA = pa.schema(
    [
        ("seq_index", pa.int64()),
        ("seq_id", pa.string()),
        ("tokens", pa.list_(pa.int32())),  # padded with 0 (<pad>)
        ("positions", pa.list_(pa.int32())),  # restart at 0 for every packed document
        ("segment_ids", pa.list_(pa.int32())),  # 1, 2, ... per packed document; 0 on padding
        ("loss_mask", pa.list_(pa.int8())),  # 1 where token i is a prediction target (predicted from < i)
    ]
)


def sequence_id(tokens: np.ndarray, segment_ids: np.ndarray, loss_mask: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in (tokens, segment_ids, loss_mask):
        digest.update(np.ascontiguousarray(array, dtype=np.int32).tobytes())
    return digest.hexdigest()[:16]


def split_path(directory: Path, split: str) -> Path:
    return Path(directory) / f"{split}.parquet"


def read_split(directory: Path, split: str) -> dict[str, np.ndarray]:
    """A whole split as arrays: seq_index [N], seq_id [N], and [N, L] int32 tokens/positions/segment_ids/loss_mask."""
    path = split_path(directory, split)
    if not path.is_file():
        raise GemstillError(f"{path}: prepared data missing; run the prepare_data stage first")
    table = pq.read_table(path)
    if table.schema.remove_metadata() != SCHEMA:
        raise GemstillError(f"{path}: not gemstill's packed-sequence schema; re-run prepare_data")
    columns = {"seq_index": table["seq_index"].to_numpy(), "seq_id": np.asarray(table["seq_id"].to_pylist())}
    for name in ("tokens", "positions", "segment_ids", "loss_mask"):
        flat = table[name].combine_chunks().flatten().to_numpy()
        columns[name] = flat.reshape(len(table), -1).astype(np.int32)
    return columns


def iter_batches(directory: Path, split: str, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive batches of a split (the last one may be short)."""
    data = read_split(directory, split)
    for start in range(0, len(data["seq_index"]), batch_size):
        yield {name: values[start : start + batch_size] for name, values in data.items()}


def write_split(
    directory: Path,
    split: str,
    tokens: np.ndarray,
    positions: np.ndarray,
    segment_ids: np.ndarray,
    loss_mask: np.ndarray,
) -> Path:
    """Write one split ([N, L] arrays, rows already in their final order) atomically; returns the path."""
    rows = len(tokens)
    ids = [sequence_id(tokens[i], segment_ids[i], loss_mask[i]) for i in range(rows)]

    def lists(values: np.ndarray, dtype: pa.DataType) -> pa.Array:
        flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=dtype)
        offsets = pa.array(np.arange(0, rows * values.shape[1] + 1, values.shape[1], dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, flat)

    table = pa.table(
        {
            "seq_index": pa.array(np.arange(rows, dtype=np.int64)),
            "seq_id": pa.array(ids, type=pa.string()),
            "tokens": lists(tokens.astype(np.int32), pa.int32()),
            "positions": lists(positions.astype(np.int32), pa.int32()),
            "segment_ids": lists(segment_ids.astype(np.int32), pa.int32()),
            "loss_mask": lists(loss_mask.astype(np.int8), pa.int8()),
        },
        schema=SCHEMA,
    )
    path = split_path(directory, split)
    partial = path.with_name(f".{path.name}.partial")
    pq.write_table(table, partial, compression="zstd")
    partial.replace(path)
    return path
