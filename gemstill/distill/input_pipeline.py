"""Training input: the rows of every step, their labels and teacher targets, placed on the devices ahead of time.

The rows of step s are a function of (seed, s) alone (`batch_indices`), which is what makes a resumed run replay
the same steps. `StepBatches` reads and places them in a background thread, `depth` steps ahead of the one the
device computes, so the host's parquet reads, label shifts and transfers overlap the step instead of stalling it;
depth 0 does the same work on the caller's thread (the synchronous path tests compare against).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from gemstill.data.format import read_split
from gemstill.data.targets import next_token_targets
from gemstill.distill.placement import place_rows, process_rows
from gemstill.errors import GemstillError
from gemstill.read_ahead import read_ahead
from gemstill.teacher_cache.reader import TeacherCacheReader

COLUMNS = ("tokens", "positions", "segment_ids", "loss_mask")


def batch_indices(step: int, batch_size: int, rows: int, seed: int) -> np.ndarray:
    """Rows of step `step`: epochs are seeded permutations, so the order depends on (seed, step) only."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = np.divmod(positions, rows)
    return np.array(
        [np.random.default_rng([seed, int(e)]).permutation(rows)[o] for e, o in zip(epochs, offsets, strict=True)]
    )


class Batches:
    """The rows of a split with their labels, weights and (with a teacher cache) the teacher's targets."""

    def __init__(self, data_dir: Path, cache_dir: Path | None, split: str):
        self.split = split
        self.data = read_split(data_dir, split)
        self.rows = len(self.data["tokens"])
        self.seq_len = int(self.data["tokens"].shape[1]) if self.rows else 0
        if self.rows == 0:
            raise GemstillError(f"{data_dir}: the {split} split is empty; prepare more data (data.generated)")
        self.reader = TeacherCacheReader(cache_dir) if cache_dir is not None else None
        if self.reader is not None:
            self.reader.check_alignment(data_dir)

    def get(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        batch = {name: self.data[name][rows] for name in COLUMNS}
        batch["labels"], batch["weights"] = next_token_targets(batch["tokens"], batch["loss_mask"])
        if self.reader is not None:
            cached = self.reader.read(self.split, rows)
            if (cached["mask"] != (batch["weights"] > 0)).any():
                raise GemstillError(
                    f"teacher cache {self.reader.out_dir}: stored positions differ from the data's loss positions; "
                    "re-run the teacher_cache stage on this data"
                )
            batch.update(ids=cached["ids"], logprobs=cached["logprobs"], tail_mass=cached["tail_mass"])
        del batch["loss_mask"]
        return batch

    def weight(self, rows: np.ndarray) -> float:
        """The loss weight (tokens) of `rows`, from the data alone (no cache read), so every process can count a
        whole batch of which it reads only its own rows."""
        return float(next_token_targets(self.data["tokens"][rows], self.data["loss_mask"][rows])[1].sum())

    def step_rows(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        return batch_indices(step, batch_size, self.rows, seed)


class StepBatch(NamedTuple):
    step: int
    tokens: int  # loss tokens in the step (host-side, so counting them needs no device sync)
    positions: int  # token positions the step computes (batch x sequence length)
    arrays: dict[str, jax.Array]  # [grad_accum, micro, L] leaves, on the devices


class StepBatches:
    """The placed batches of steps start..stop-1 in order, made `depth` steps ahead by a background thread."""

    def __init__(
        self,
        batches: Batches,
        start: int,
        stop: int,
        batch_size: int,
        seed: int,
        accum: int,
        sharding: Any = None,
        depth: int = 2,
    ):
        self.batches, self.steps = batches, range(start, stop)
        self.batch_size, self.seed, self.accum, self.sharding, self.depth = batch_size, seed, accum, sharding, depth
        self.micro = batch_size // accum
        self.block = process_rows(sharding, self.micro, axis=1, rank=3)  # the micro-batch rows this process reads

    def _make(self, step: int) -> StepBatch:
        """The step's [accum, micro, L] arrays, of which this process reads only the micro-batch rows its devices
        hold (all of them in a one-process run)."""
        rows = self.batches.step_rows(step, self.batch_size, self.seed)
        grid = rows.reshape(self.accum, self.micro)[:, self.block]
        host = self.batches.get(grid.reshape(-1))
        local = {name: v.reshape(self.accum, grid.shape[1], *v.shape[1:]) for name, v in host.items()}
        tokens = int(self.batches.weight(rows))
        arrays = place_rows(local, self.sharding, self.micro, axis=1)
        return StepBatch(step, tokens, rows.size * self.batches.seq_len, arrays)

    def __iter__(self) -> Iterator[StepBatch]:
        return read_ahead((self._make(step) for step in self.steps), self.depth, "train-input-prefetch")
