"""Training checkpoints on Orbax: the latest few for resuming, plus the best one by a validation metric.

One `ocp.CheckpointManager` keeps both: its preservation policy is "any of" the latest `keep` steps and the single
step with the lowest `best_metric`, so the best checkpoint survives however many later ones are written, and at
most keep + 1 step directories exist. A step is written as two items: `arrays` (every array leaf: parameters,
optimizer state, PRNG key data, through StandardSave, restorable onto any mesh) and `meta` (the JSON part: ints,
floats, strings and lists/dicts of them such as the loss history, and the metrics).

Writes are atomic: Orbax writes a step into a temporary directory and renames it into place only once complete,
and ignores unfinished ones, so a process killed mid-save leaves the previous checkpoints intact and readable.
With async_save the arrays are copied off the devices before `save` returns and written in the background, so
the training loop may update (or donate) them immediately; `close` waits for the last write.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from gemstill.errors import GemstillError

FORMAT = "gemstill-train-1"


def _is_json(value: Any) -> bool:
    """Plain Python data (no arrays anywhere), which goes to the JSON item instead of the array store."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if type(value) is list:  # not tuples: an optax EmptyState() must come back as itself, not as []
        return all(_is_json(v) for v in value)
    if type(value) is dict:
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False


def _short(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:200]}" if first else type(err).__name__


class TrainCheckpointer:
    """Save / resume a training state dict: {"params": ..., "opt_state": ..., "step": int, "history": [...], ...}.

    Top-level entries made of plain Python data (None, bools, ints, floats, strings, and lists and dicts of them)
    round-trip through JSON; every other entry is a pytree of arrays (tuples and namedtuples such as optax states
    included) and is restored with the structure, dtypes and shardings of the target given to `restore_latest` /
    `restore_best`, so a run can resume on a different mesh or slice. Python scalars inside such a pytree come
    back as 0-d numpy arrays.
    """

    def __init__(
        self, directory: str | Path, keep: int, best_metric: str | None = "val_loss", async_save: bool = True
    ) -> None:
        if keep < 1:
            raise GemstillError(f"checkpoints: keep={keep} must be at least 1 (the latest checkpoint resumes a run)")
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        kept: list[Any] = [policies.LatestN(n=keep)]
        best_fn = None
        if best_metric is not None:
            best_fn = self._metric_value
            # BestN sorts ascending and keeps the tail: reverse=True keeps the lowest metric
            kept.append(
                policies.BestN(get_metric_fn=best_fn, reverse=True, n=1, keep_checkpoints_without_metrics=False)
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(kept),
            best_fn=best_fn,
            best_mode="min",
            enable_async_checkpointing=async_save,
            create=True,
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except Exception as err:  # orbax raises many types on an unreadable directory
            raise GemstillError(
                f"checkpoints: cannot open {self.directory} ({_short(err)}); fix its permissions or move it aside"
            ) from None

    def _metric_value(self, metrics: Mapping[str, Any]) -> float:
        value = float(metrics[self.best_metric])
        return value if math.isfinite(value) else math.inf  # a NaN would break the ordering; it is never best

    def save(self, step: int, state: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> None:
        """Start writing `state` as step `step` (returns before the write ends when async); prune old steps."""
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise GemstillError(
                f"checkpoints: step {step} is not after the latest saved step {latest} in {self.directory}; "
                "save increasing steps (resume from restore_latest)"
            )
        if metrics is not None and self.best_metric is not None and self.best_metric not in metrics:
            raise GemstillError(
                f"checkpoints: metrics {sorted(metrics)} lack {self.best_metric!r}, which ranks the best checkpoint; "
                "include it, or pass metrics=None for a checkpoint without validation"
            )
        plain = {k: v for k, v in state.items() if _is_json(v)}
        arrays = {k: v for k, v in state.items() if k not in plain}
        meta_metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        meta = {"format": FORMAT, "plain": plain, "array_keys": sorted(arrays), "metrics": meta_metrics}
        meta = json.loads(json.dumps(meta))  # a snapshot: the caller may keep appending to its history
        ranked = meta_metrics if self.best_metric is not None else None
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)),
                metrics=ranked,
            )
        except Exception as err:
            raise GemstillError(
                f"checkpoints: saving step {step} to {self.directory} failed ({_short(err)}); check free disk space "
                "and that every non-JSON state entry is a tree of arrays"
            ) from None

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the lowest best_metric; None without a best_metric or before any validated save."""
        if self.best_metric is None:
            return None
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def metrics(self, step: int) -> dict[str, float] | None:
        """The metrics saved with `step` (None if it was saved without)."""
        return self._read_meta(step)["metrics"]

    def restore_latest(self, target: Mapping[str, Any]) -> dict[str, Any]:
        step = self.latest_step()
        if step is None:
            raise GemstillError(f"checkpoints: {self.directory} holds no checkpoint; start the run from scratch")
        return self.restore(step, target)

    def restore_best(self, target: Mapping[str, Any]) -> dict[str, Any]:
        step = self.best_step()
        if step is None:
            raise GemstillError(
                f"checkpoints: {self.directory} holds no checkpoint with {self.best_metric!r}; "
                "save with metrics to have a best one"
            )
        return self.restore(step, target)

    def restore(self, step: int, target: Mapping[str, Any]) -> dict[str, Any]:
        """State of `step`. `target` has the saved keys; its array entries (arrays or jax.ShapeDtypeStruct with
        shardings) fix the structure, dtypes and placement of the result; its plain entries are ignored."""
        meta = self._read_meta(step)
        saved = set(meta["plain"]) | set(meta["array_keys"])
        if saved != set(target):
            raise GemstillError(
                f"checkpoints: step {step} in {self.directory} holds {sorted(saved)} but the target has "
                f"{sorted(target)}; the checkpoint is from a different training setup, use a fresh directory"
            )
        arrays_target = {k: _abstract(target[k]) for k in meta["array_keys"]}
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(arrays_target))
            )
        except Exception as err:
            raise GemstillError(
                f"checkpoints: step {step} in {self.directory} does not restore ({_short(err)}); it is damaged or "
                "from a different model/optimizer: delete that step's directory to resume from an earlier one"
            ) from None
        return {**meta["plain"], **restored["arrays"]}

    def _read_meta(self, step: int) -> dict[str, Any]:
        self._manager.wait_until_finished()
        if step not in self._manager.all_steps():
            raise GemstillError(
                f"checkpoints: no step {step} in {self.directory} (kept: {self.all_steps()}); pick a kept step"
            )
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:
            raise GemstillError(
                f"checkpoints: step {step} in {self.directory} is unreadable ({_short(err)}); it is damaged: "
                "delete that step's directory to resume from an earlier one"
            ) from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise GemstillError(
                f"checkpoints: step {step} in {self.directory} is not a gemstill training checkpoint; "
                "point the run at its own checkpoint directory"
            )
        return meta

    def wait(self) -> None:
        """Block until the last asynchronous write is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for the last asynchronous write, then release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _abstract(tree: Any) -> Any:
    """Restore target leaves: ShapeDtypeStructs keep their sharding; arrays become ShapeDtypeStructs with theirs."""

    def leaf(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        x = np.asarray(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype)

    return jax.tree.map(leaf, tree)
