"""The teacher_cache stage: run the teacher over every sequence once and store what distillation needs, resumably.

Layout under out_dir: shards/<split>/<split>-<seq_start>-<seq_end>.parquet (one row per sequence, a contiguous
seq_index range per shard) and catalog.duckdb (table `shards`, one row per committed shard). A shard is written
to a temporary file, fsynced and renamed, and only then registered, so a catalog row always names a complete
file; on start every catalogued shard is verified by size and sha256, and anything uncatalogued is recomputed.
Shards are a function of (teacher, data, settings) alone, so a resumed run writes the same bytes as one that
was never interrupted.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from flax import nnx
from tqdm import tqdm

from gemstill import distributed
from gemstill.data.format import read_split
from gemstill.data.targets import prediction_mask
from gemstill.errors import GemstillError
from gemstill.fingerprint import bytes_fingerprint, file_sha256, model_fingerprint
from gemstill.fsutil import atomic_write_bytes
from gemstill.loading import LoadedModel
from gemstill.params import to_flat
from gemstill.teacher_cache.catalog import (
    CATALOG,
    CATALOG_DDL,
    ENCODING,
    IDENTITY,
    PART,
    PART_GLOB,
    SHARD_SCHEMA,
    SHARDS,
    VALUE_DTYPES,
    catalog_rows,
    connect_catalog,
    shard_path,
)
from gemstill.teacher_cache.compute import Summary, teacher_summary
from gemstill.teacher_cache.config import TeacherCacheConfig


def shard_table(
    seq_index: np.ndarray, seq_id: np.ndarray, mask: np.ndarray, summary: Summary, value_dtype: str
) -> tuple[pa.Table, dict[str, float]]:
    """Rows [B] of a shard from a summary [B, L, ...] kept where mask [B, L], and sums the catalog records."""
    rows, steps = mask.shape
    k = summary.ids.shape[-1]
    exact = summary.logprobs[mask]
    stored = exact.astype(VALUE_DTYPES[value_dtype])
    error = np.abs(stored.astype(np.float32) - exact)
    offsets = np.concatenate([[0], np.cumsum(mask.sum(axis=1))]).astype(np.int32)

    def ragged(values: np.ndarray, per_token: int, dtype: pa.DataType) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array(offsets * per_token), pa.array(values.reshape(-1), type=dtype))

    table = pa.table(
        {
            "seq_index": pa.array(seq_index.astype(np.int64)),
            "seq_id": pa.array(seq_id.tolist(), type=pa.string()),
            "mask": pa.ListArray.from_arrays(
                pa.array(np.arange(rows + 1, dtype=np.int32) * steps), pa.array(mask.reshape(-1))
            ),
            "ids": ragged(np.diff(summary.ids[mask], axis=-1, prepend=0), k, pa.int32()),
            "logprobs": ragged(stored.view(np.uint16), k, pa.uint16()),
            "lse": ragged(summary.lse[mask], 1, pa.float32()),
            "entropy": ragged(summary.entropy[mask], 1, pa.float32()),
            "tail_mass": ragged(summary.tail_mass[mask], 1, pa.float32()),
        },
        schema=SHARD_SCHEMA,
    )
    sums = {
        "tokens": int(mask.sum()),
        "kept_mass_sum": float(np.sum(1.0 - summary.tail_mass[mask], dtype=np.float64)),
        "entropy_sum": float(np.sum(summary.entropy[mask], dtype=np.float64)),
        "value_err_max": float(error.max(initial=0.0)),
        "value_err_sum": float(error.sum(dtype=np.float64)),
    }
    return table, sums


def parquet_bytes(table: pa.Table) -> bytes:
    """The shard file: one row group per sequence, so a reader decodes only the sequences it asks for."""
    buffer = io.BytesIO()
    pq.write_table(
        table,
        buffer,
        row_group_size=1,
        compression="zstd",
        compression_level=3,
        use_dictionary=False,
        column_encoding=ENCODING,
    )
    return buffer.getvalue()


def check_teacher(teacher: LoadedModel, data_dir: Path, k: int) -> str:
    """Refuse, before any compute, a teacher that cannot have produced the data's ids; returns the tokenizer fp."""
    data_tokenizer = Path(data_dir) / "tokenizer.model"
    if not data_tokenizer.is_file():
        raise GemstillError(f"{data_tokenizer}: missing; re-run prepare_data (it saves the tokenizer beside the data)")
    if teacher.tokenizer is None:
        raise GemstillError(
            f"teacher {teacher.spec} carries no tokenizer, so it cannot be checked against the data's; "
            "add the tokenizer.model it was trained with beside its weights"
        )
    data_bytes = data_tokenizer.read_bytes()
    if hashlib.sha256(data_bytes).digest() != hashlib.sha256(teacher.tokenizer.model_proto).digest():
        raise GemstillError(
            f"teacher {teacher.spec} uses a different tokenizer than the data in {data_dir}; "
            "prepare the data with the teacher's tokenizer (or pick the teacher the data was prepared for)"
        )
    vocab = teacher.tokenizer.vocab_size
    if teacher.config.vocab_size < vocab:
        raise GemstillError(
            f"teacher {teacher.spec} has vocab_size {teacher.config.vocab_size}, smaller than the data tokenizer's "
            f"{vocab}; use a teacher whose embedding covers the tokenizer"
        )
    if k > teacher.config.vocab_size:
        raise GemstillError(f"teacher_cache.k={k} exceeds the teacher's vocab_size {teacher.config.vocab_size}")
    return bytes_fingerprint(data_bytes)


class _Catalog:
    """The shard catalog of one cache directory (or one process's part of it), opened only for each read or
    commit."""

    def __init__(self, out_dir: Path, identity: dict[str, Any], log: Callable[[str], None], name: str = CATALOG):
        self.out_dir, self.path, self.identity, self.log = out_dir, out_dir / name, identity, log
        with connect_catalog(self.path) as con:
            con.execute(CATALOG_DDL)
        for row in catalog_rows(self.path):
            theirs = {name: row[name] for name in IDENTITY}
            if theirs != identity:
                changed = [n for n in IDENTITY if theirs[n] != identity[n]]
                diff = ", ".join(f"{n}={theirs[n]!r} (now {identity[n]!r})" for n in changed)
                raise GemstillError(
                    f"{self.path}: the cache was written with {diff}; give each teacher and cache setting its own "
                    "output directory (or delete this one)"
                )

    def verified(self, split: str, plan: set[tuple[int, int]], seq_ids: np.ndarray) -> set[tuple[int, int]]:
        """Ranges of this split whose catalogued shard is intact; drops every other shard (row, then file)."""
        good: set[tuple[int, int]] = set()
        for row in catalog_rows(self.path, "WHERE split = ?", (split,)):
            file, span = self.out_dir / row["path"], (row["seq_start"], row["seq_end"])
            problem = _shard_problem(file, row)
            if problem is None and span not in plan:
                problem = "its range does not match sequences_per_shard"
            if problem is None:
                if pq.read_table(file, columns=["seq_id"])["seq_id"].to_pylist() != seq_ids[span[0] : span[1]].tolist():
                    raise GemstillError(
                        f"{file}: built from other data (seq_id mismatch); use a fresh output directory for new data"
                    )
                good.add(span)
                continue
            self.log(f"teacher_cache: {row['path']}: {problem}; dropping it and recomputing")
            with connect_catalog(self.path) as con:
                con.execute("DELETE FROM shards WHERE path = ?", [row["path"]])
            file.unlink(missing_ok=True)
        keep = {shard_path(split, *span) for span in good}
        for file in sorted((self.out_dir / SHARDS / split).glob("*")):
            if f"{SHARDS}/{split}/{file.name}" not in keep:
                self.log(f"teacher_cache: {file.name}: not in the catalog (an interrupted write); removing it")
                file.unlink()
        return good

    def commit(self, split: str, span: tuple[int, int], table: pa.Table, sums: dict[str, float]) -> int:
        """Write a shard atomically, then register it; returns its size in bytes."""
        data = parquet_bytes(table)
        relative = shard_path(split, *span)
        atomic_write_bytes(self.out_dir / relative, data)
        values = {
            "split": split,
            "path": relative,
            "seq_start": span[0],
            "seq_end": span[1],
            "rows": table.num_rows,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            **self.identity,
            **sums,
            "created_at": datetime.datetime.now(datetime.UTC).replace(tzinfo=None),
        }
        with connect_catalog(self.path) as con:
            columns, marks = ", ".join(values), ", ".join("?" * len(values))
            con.execute(f"INSERT INTO shards ({columns}) VALUES ({marks})", list(values.values()))
        return len(data)

    def merge_parts(self) -> int:
        """Register the shards the processes of a multi-process run catalogued in their own parts, then delete
        the parts; the number of shards merged. Run by process 0 only (a part of a killed attempt included)."""
        merged = 0
        for part in sorted(self.out_dir.glob(PART_GLOB)):
            with connect_catalog(self.path) as con:
                con.execute(f"ATTACH '{part}' AS part (READ_ONLY)")
                merged += con.execute(
                    "INSERT INTO shards SELECT * FROM part.shards WHERE path NOT IN (SELECT path FROM shards)"
                ).fetchone()[0]
                con.execute("DETACH part")
            part.unlink()
        return merged


def _shard_problem(file: Path, row: dict[str, Any]) -> str | None:
    """Why a catalogued shard cannot be trusted, or None when it is intact."""
    if not file.is_file():
        return "file missing"
    if file.stat().st_size != row["bytes"]:
        return f"size {file.stat().st_size} != catalogued {row['bytes']} (truncated)"
    if file_sha256(file) != row["sha256"]:
        return "sha256 mismatch (corrupted)"
    return None


def build_teacher_cache(
    config: TeacherCacheConfig,
    data_dir: Path,
    teacher: LoadedModel,
    out_dir: Path,
    log: Callable[[str], None] = print,
    persist: Callable[[Path], None] = lambda path: None,
    report_progress: Callable[[float], None] = lambda fraction: None,
) -> dict[str, Any]:
    """Fill out_dir with the teacher cache of every configured split, resuming from its committed shards.

    In a multi-process run (gemstill.distributed) process 0 verifies what is cached, the shards left are dealt
    out to the processes in turn, each process catalogs its own in a part catalog, and process 0 merges the parts
    once all are written: the shards are the bytes a one-process run writes.

    persist: called with each committed shard and then the catalog, so a remote store holds them at once.
    """
    started = time.perf_counter()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    tokenizer_fingerprint = check_teacher(teacher, data_dir, config.k)
    identity = {
        "teacher_fingerprint": model_fingerprint(teacher.config, to_flat(teacher.model)),
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "k": config.k,
        "mode": config.mode,
        "temperature": config.temperature,
        "value_dtype": config.values,
        "seed": config.seed if config.mode == "sampled" else None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {split: read_split(data_dir, split) for split in config.splits}
    spans: list[tuple[str, int, int]] = []
    if distributed.is_leader():  # only process 0 touches the catalog before the work is split
        catalog = _Catalog(out_dir, identity, log)
        if merged := catalog.merge_parts():
            log(f"teacher_cache: {merged} shards of a killed multi-process attempt merged into the catalog")
        for split, data in splits.items():
            count, per_shard = len(data["seq_index"]), config.sequences_per_shard
            plan = {(lo, min(lo + per_shard, count)) for lo in range(0, count, per_shard)}
            done = catalog.verified(split, plan, data["seq_id"])
            spans += [(split, lo, hi) for lo, hi in sorted(plan - done)]
            log(f"teacher_cache: {split}: {len(done)} of {len(plan)} shards already cached")
    spans = [tuple(span) for span in json.loads(distributed.share("teacher_cache work", json.dumps(spans)))]
    processes, index = distributed.process_count(), distributed.process_index()
    mine = _Catalog(out_dir, identity, log, CATALOG if processes == 1 else PART.format(index=index))
    work = [(split, (lo, hi), splits[split]) for split, lo, hi in spans[index::processes]]
    if processes > 1:
        log(f"teacher_cache: process {index} computes {len(work)} of the {len(spans)} shards left")

    graphdef, state = nnx.split(teacher.model)
    devices = jax.local_devices()
    # each local device computes whole batches of the shape a one-device run uses: the same bytes, in parallel
    replicas = distributed.on_each_device(state)
    batches_sent = 0

    def dispatch(item: tuple[str, tuple[int, int], dict[str, np.ndarray]]) -> list[Summary]:
        """Queue every batch of a shard (JAX runs them asynchronously, each batch on the next local device);
        short batches repeat rows to keep one shape."""
        nonlocal batches_sent
        _, (lo, hi), data = item
        outs = []
        for start in range(lo, hi, config.batch_size):
            slot = batches_sent % len(devices)
            batches_sent += 1
            rows = np.resize(np.arange(start, min(start + config.batch_size, hi)), config.batch_size)
            columns = ("tokens", "positions", "segment_ids", "seq_index")
            outs.append(
                teacher_summary(
                    graphdef,
                    replicas[devices[slot]],
                    *(jax.device_put(data[name][rows], devices[slot]) for name in columns),
                    jax.device_put(np.asarray(config.seed), devices[slot]),
                    k=config.k,
                    temperature=config.temperature,
                    sampled=config.mode == "sampled",
                )
            )
        return outs

    total = sum(int(prediction_mask(data["loss_mask"][lo:hi]).sum()) for _, (lo, hi), data in work)
    computed = 0
    compute_started = time.perf_counter()
    ahead = len(devices)  # shards queued beyond the one being written: every local device stays busy
    with tqdm(total=total, desc="teacher cache", unit="tok", unit_scale=True) as progress:
        pending = [dispatch(item) for item in work[:ahead]]
        for i, (split, (lo, hi), data) in enumerate(work):
            outs = pending.pop(0)
            if i + ahead < len(work):
                pending.append(dispatch(work[i + ahead]))
            summary = Summary(*(np.concatenate(parts)[: hi - lo] for parts in zip(*jax.device_get(outs), strict=True)))
            mask = prediction_mask(data["loss_mask"][lo:hi])
            table, sums = shard_table(data["seq_index"][lo:hi], data["seq_id"][lo:hi], mask, summary, config.values)
            size = mine.commit(split, (lo, hi), table, sums)
            persist(out_dir / shard_path(split, lo, hi))
            persist(mine.path)
            computed += sums["tokens"]
            progress.update(sums["tokens"])
            report_progress(computed / total if total else 1.0)
            log(f"teacher_cache: {split} [{lo}, {hi}): {sums['tokens']} tokens, {size} bytes")
    distributed.barrier("teacher_cache shards written")
    if not distributed.is_leader():
        return {"computed_shards": len(work)}  # process 0 merges the catalog and reports the whole cache
    if processes > 1:
        _Catalog(out_dir, identity, log).merge_parts()
        persist(out_dir / CATALOG)
    computed = sum(int(prediction_mask(splits[sp]["loss_mask"][lo:hi]).sum()) for sp, lo, hi in spans)
    compute_seconds = time.perf_counter() - compute_started
    metrics = _totals(out_dir / CATALOG, config.splits)
    metrics.update(
        computed_shards=len(spans),  # by every process
        computed_tokens=computed,
        seconds=time.perf_counter() - started,
        compute_seconds=compute_seconds,  # the shard loop alone: without fingerprinting and verification
        tokens_per_second=computed / compute_seconds if computed else 0.0,
        teacher_fingerprint=identity["teacher_fingerprint"],
    )
    log(
        f"teacher_cache: {metrics['tokens']} tokens in {metrics['shards']} shards, "
        f"{metrics['bytes_per_token']:.1f} B/token, kept mass {metrics['mean_kept_mass']:.3f}, "
        f"value error max {metrics['value_abs_err_max']:.2e}"
    )
    return metrics


def _totals(catalog: Path, splits: list[str]) -> dict[str, Any]:
    """Whole-cache metrics from the catalog, so a resumed run reports every shard, not only those it wrote."""
    with connect_catalog(catalog, read_only=True) as con:
        shards, sequences, tokens, size, kept, entropy, err_max, err_sum, k = con.execute(
            "SELECT count(*), coalesce(sum(rows), 0), coalesce(sum(tokens), 0), coalesce(sum(bytes), 0), "
            "sum(kept_mass_sum), sum(entropy_sum), max(value_err_max), sum(value_err_sum), max(k) "
            "FROM shards WHERE list_contains(?, split)",
            [splits],
        ).fetchone()
    per_token = max(tokens, 1)
    return {
        "tokens": int(tokens),
        "sequences": int(sequences),
        "shards": int(shards),
        "bytes": int(size),
        "bytes_per_token": size / per_token,
        "mean_kept_mass": (kept or 0.0) / per_token,
        "mean_entropy": (entropy or 0.0) / per_token,
        "value_abs_err_max": err_max or 0.0,
        "value_abs_err_mean": (err_sum or 0.0) / (per_token * (k or 1)),
    }
