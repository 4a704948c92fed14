"""Summary numbers of a teacher cache, computed by DuckDB from the shard files themselves plus the catalog."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb

from gemstill.errors import GemstillError
from gemstill.teacher_cache.catalog import CATALOG, SHARDS, connect_catalog

# Only catalogued (committed) shard files count: a glob alone would also see a file whose write was interrupted.
_QUERY = """
WITH committed AS (SELECT $prefix || path AS filename, bytes FROM shards WHERE split = $split),
rows AS (SELECT * FROM read_parquet($glob, filename = true) WHERE filename IN (SELECT filename FROM committed)),
tokens AS (SELECT unnest(tail_mass) AS tail, unnest(entropy) AS entropy FROM rows)
SELECT
    (SELECT count(*) FROM committed) AS shards,
    (SELECT count(*) FROM rows) AS sequences,
    (SELECT count(*) FROM tokens) AS tokens,
    (SELECT sum(bytes) FROM committed) AS bytes,
    (SELECT avg(1 - tail::DOUBLE) FROM tokens) AS mean_kept_mass,
    (SELECT avg(entropy::DOUBLE) FROM tokens) AS mean_entropy
"""


def cache_stats(out_dir: Path) -> list[dict[str, Any]]:
    """Per split: shards, sequences, tokens (stored positions), bytes, bytes_per_token, mean kept (top-k or
    sampled) probability mass and mean teacher entropy."""
    out_dir = Path(out_dir).resolve()
    if not (out_dir / CATALOG).is_file():
        raise GemstillError(f"{out_dir}: no teacher cache catalog; run the teacher_cache stage first")
    stats = []
    with connect_catalog(out_dir / CATALOG, read_only=True) as con:
        splits = [row[0] for row in con.execute("SELECT DISTINCT split FROM shards ORDER BY split").fetchall()]
        for split in splits:
            params = {"prefix": f"{out_dir}/", "split": split, "glob": f"{out_dir}/{SHARDS}/{split}/*.parquet"}
            try:
                cursor = con.execute(_QUERY, params)
            except (duckdb.IOException, duckdb.InvalidInputException) as err:
                problem = str(err).splitlines()[0]
                message = f"{out_dir}: {split} shards unreadable ({problem}); re-run the teacher_cache stage"
                raise GemstillError(message) from None
            row = dict(zip([d[0] for d in cursor.description], cursor.fetchone(), strict=True))
            row["bytes_per_token"] = row["bytes"] / max(row["tokens"], 1)
            stats.append({"split": split, **row})
    return stats
