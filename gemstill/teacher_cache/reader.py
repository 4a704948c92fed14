"""Reading the teacher cache during distillation: batches aligned by seq_index, checked, prefetched.

Batches are keyed by the seq_index a trainer asks for, never by step number, so any sampling order (and any
resume point) gets the teacher outputs of exactly its sequences. Every shard is checked against its catalogued
sha256 the first time this reader touches it; a bad shard raises instead of feeding a trainer wrong targets.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gemstill.data.format import read_split
from gemstill.errors import GemstillError
from gemstill.fingerprint import file_sha256
from gemstill.read_ahead import read_ahead
from gemstill.teacher_cache.catalog import CATALOG, IDENTITY, VALUE_DTYPES, catalog_rows

_REBUILD = "re-run the teacher_cache stage (it rewrites bad shards)"


class TeacherCacheReader:
    """Random access by seq_index to the committed shards of one cache directory."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        if not (self.out_dir / CATALOG).is_file():
            raise GemstillError(f"{self.out_dir}: no teacher cache catalog; run the teacher_cache stage first")
        rows = catalog_rows(self.out_dir / CATALOG)
        if not rows:
            raise GemstillError(f"{self.out_dir}: the teacher cache has no shards yet; run the teacher_cache stage")
        first = rows[0]
        self.identity = {name: first[name] for name in IDENTITY}
        self.k: int = first["k"]
        self._value_dtype = VALUE_DTYPES[first["value_dtype"]]
        self._shards: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            self._shards.setdefault(row["split"], []).append(row)
        self._starts = {split: [row["seq_start"] for row in shards] for split, shards in self._shards.items()}
        self._checked: dict[str, pq.FileMetaData] = {}

    @property
    def splits(self) -> list[str]:
        return sorted(self._shards)

    def sequences(self, split: str) -> int:
        """How many sequences of the split are cached (seq_index 0 .. n-1 when the cache is complete)."""
        return sum(row["rows"] for row in self._split(split))

    def read(self, split: str, seq_indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Teacher outputs of these sequences, in this order.

        seq_index, seq_id [B]; mask [B, L] (where a distribution is stored: position i predicts token i+1, a loss
        target); ids [B, L, k] int32 (ascending per position) and logprobs [B, L, k] float32; lse, entropy and
        tail_mass [B, L] float32. Positions where mask is False hold zeros.
        """
        wanted = np.asarray(seq_indices, dtype=np.int64)
        shards = self._split(split)
        slots = np.searchsorted(self._starts[split], wanted, side="right") - 1
        parts = []
        for slot in np.unique(slots[slots >= 0]):
            rows = np.unique(wanted[slots == slot] - shards[slot]["seq_start"])
            if (rows < shards[slot]["rows"]).any():
                parts.append(self._decode(self._read_rows(shards[slot], rows[rows < shards[slot]["rows"]])))
        found = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]} if parts else {}
        absent = wanted[~np.isin(wanted, found.get("seq_index", []))]
        if len(absent):
            raise GemstillError(
                f"{split}: seq_index {absent[0]} ({len(absent)} of {len(wanted)} asked) is not in the teacher cache; "
                f"{_REBUILD}"
            )
        order = np.searchsorted(found["seq_index"], wanted)
        return {name: values[order] for name, values in found.items()}

    def batches(
        self, split: str, seq_indices: Sequence[int] | None = None, batch_size: int = 8, prefetch: int = 2
    ) -> Iterator[dict[str, np.ndarray]]:
        """`read` of consecutive groups of seq_indices (default: the whole split in order), read ahead by a thread."""
        order = np.arange(self.sequences(split)) if seq_indices is None else np.asarray(seq_indices, dtype=np.int64)
        groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        return read_ahead((self.read(split, group) for group in groups), max(prefetch, 1), "teacher-cache-prefetch")

    def check_alignment(self, data_dir: Path) -> None:
        """Refuse a cache whose sequences are not those of the prepared data (seq_id per seq_index)."""
        for split in self.splits:
            expected = read_split(data_dir, split)["seq_id"]
            cached = np.concatenate(
                [self._read_rows(shard, None, ["seq_id"])["seq_id"].to_numpy() for shard in self._split(split)]
            )
            if len(cached) != len(expected) or (cached != expected).any():
                mismatch = np.flatnonzero(cached[: len(expected)] != expected[: len(cached)])
                where = f"seq_index {mismatch[0]}" if len(mismatch) else f"{len(cached)} vs {len(expected)} sequences"
                raise GemstillError(
                    f"teacher cache {self.out_dir} does not match the data in {data_dir} ({split}: {where}); "
                    "re-run the teacher_cache stage on this data"
                )

    def _split(self, split: str) -> list[dict[str, Any]]:
        if split not in self._shards:
            raise GemstillError(f"{self.out_dir}: no teacher cache for split {split!r}; add it to teacher_cache.splits")
        return self._shards[split]

    def _read_rows(self, shard: dict[str, Any], rows: np.ndarray | None, columns: list[str] | None = None) -> pa.Table:
        """Rows (positions within the shard; None: all) of a shard, reading only their row groups."""
        path = self.out_dir / shard["path"]
        metadata = self._checked.get(shard["path"])
        if metadata is None:
            if not path.is_file() or path.stat().st_size != shard["bytes"] or file_sha256(path) != shard["sha256"]:
                raise GemstillError(f"teacher cache shard {path} is missing or corrupt (sha256 mismatch); {_REBUILD}")
            metadata = self._checked[shard["path"]] = pq.read_metadata(path)
        handle = pq.ParquetFile(path, metadata=metadata)
        if rows is None:
            return handle.read(columns=columns)
        ends = np.cumsum([metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)])
        groups = np.unique(np.searchsorted(ends, rows, side="right"))
        return handle.read_row_groups(groups.tolist(), columns=columns)

    def _decode(self, table: pa.Table) -> dict[str, np.ndarray]:
        """Dense arrays of shard rows: the per-position lists scattered back to [B, L] where mask is set."""
        mask = _flat(table["mask"]).reshape(table.num_rows, -1)
        kept = int(mask.sum())
        ids = np.cumsum(_flat(table["ids"]).reshape(kept, self.k), axis=-1, dtype=np.int32)
        logprobs = _flat(table["logprobs"]).view(self._value_dtype).astype(np.float32).reshape(kept, self.k)
        out = {
            "seq_index": table["seq_index"].to_numpy(),
            "seq_id": np.asarray(table["seq_id"].to_pylist()),
            "mask": mask,
            "ids": _scatter(mask, ids),
            "logprobs": _scatter(mask, logprobs),
        }
        for name in ("lse", "entropy", "tail_mass"):
            out[name] = _scatter(mask, _flat(table[name]))
        return out


def _flat(column: pa.ChunkedArray) -> np.ndarray:
    return column.combine_chunks().flatten().to_numpy(zero_copy_only=False)


def _scatter(mask: np.ndarray, values: np.ndarray) -> np.ndarray:
    dense = np.zeros(mask.shape + values.shape[1:], values.dtype)
    dense[mask] = values
    return dense
