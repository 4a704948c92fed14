"""Held-out evaluation of teacher, students and baselines: NLL, perplexity and the exact KL to the teacher.

KL(teacher || model) is computed over the full vocabulary from both models' logits, a chunk of tokens at a time,
so it is the true divergence, not the sparse cache's lower bound. Positions are the loss targets of the split
(the tokens a student is trained to predict).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemstill import distributed
from gemstill.config import Gemma3Config
from gemstill.data.format import read_split
from gemstill.data.targets import next_token_targets
from gemstill.fsutil import atomic_write_bytes
from gemstill.model import Gemma3
from gemstill.params import count_params, from_flat
from gemstill.quant.packed import PackedWeight

EVAL_CHUNK = 256  # tokens per [chunk x vocab] tile: 256 x 262,144 float32 = 256 MiB per model


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str  # report row name: teacher, student, baseline, ...
    config: Gemma3Config
    params: Mapping[str, Any]
    weight_bytes: int | None = None  # bytes of the weights as deployed (default: as held in memory)


def _final_hidden(model: Gemma3, batch: dict[str, jax.Array]) -> jax.Array:
    seg = batch["segment_ids"]
    out = model(batch["tokens"], batch["positions"], mask=seg > 0, segment_ids=seg, return_logits=False)
    return out.final_hidden


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, hidden: jax.Array) -> jax.Array:
    """The LM head on one tile [EVAL_CHUNK, D]: one compilation per model architecture, not per model."""
    return nnx.merge(graphdef, state).logits(hidden[None])[0]


@jax.jit
def _teacher_tile(teacher_logits: jax.Array, labels: jax.Array, weights: jax.Array):
    """Once per tile: the teacher's probabilities, its sum of p log p per token, and its own weighted NLL."""
    log_t = jax.nn.log_softmax(teacher_logits, axis=-1)
    p_t = jnp.exp(log_t)
    nll = -jnp.take_along_axis(log_t, labels[:, None], axis=-1)[:, 0]
    return p_t, jnp.sum(p_t * log_t, axis=-1), (nll * weights).sum()


@jax.jit
def _tile_sums(p_t: jax.Array, neg_entropy: jax.Array, logits: jax.Array, labels: jax.Array, weights: jax.Array):
    """Weighted sums over one tile: NLL of the labels under the model, and KL(teacher || model).

    KL = sum p log p - sum p (z - lse(z)) = neg_entropy - (p . z - lse(z) * sum p): two passes over the model's
    [tile x vocab] logits (its logsumexp, and the dot with p), not a log-softmax and a product of arrays.
    """
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = lse - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    kl = neg_entropy - (jnp.sum(p_t * logits, axis=-1) - lse * jnp.sum(p_t, axis=-1))
    return (nll * weights).sum(), (kl * weights).sum()


def evaluate_models(
    teacher: Candidate,
    others: list[Candidate],
    data_dir: Path,
    split: str = "validation",
    batch_size: int = 4,
    max_sequences: int | None = None,
    progress: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """One row per model (teacher first): model, val_nll, val_ppl, kl_to_teacher, tokens, parameters.

    Data-parallel: the batches are dealt out to the processes of a multi-process run in turn, and each process
    computes its batches on its local devices in turn, each device whole batches of the shape a one-device run
    uses. The per-tile sums are then gathered and added in batch order, so the rows equal a one-device run's.
    """
    data = read_split(data_dir, split)
    rows = len(data["tokens"]) if max_sequences is None else min(max_sequences, len(data["tokens"]))
    models = [(c, from_flat(c.config, c.params, c.name)) for c in [teacher, *others]]
    graphs = [(*nnx.split(m), c.config.embed_dim) for c, m in models]
    # every model on every local device (a device computes whole batches)
    replicas = distributed.on_each_device([state for _, state, _ in graphs])
    starts = list(range(0, rows, batch_size))

    def compute(i: int, device: jax.Device):
        states = [(g, s, width) for (g, _, width), s in zip(graphs, replicas[device], strict=True)]
        return _batch_sums(states, device, data, starts[i], min(starts[i] + batch_size, rows))

    def done(batches: int) -> None:
        progress(f"evaluate: {batches}/{len(starts)} batches of {rows} sequences")

    sums = distributed.map_batches("evaluate sums", len(starts), compute, done)
    totals = np.zeros((len(models), 2))
    tokens = 0.0
    for count, tiles in sums:  # the order a one-device run adds them in
        for tile in tiles:
            totals[0, 0] += tile[0]  # and KL(teacher || teacher) = 0 exactly
            for i in range(1, len(models)):
                totals[i] += (tile[2 * i - 1], tile[2 * i])
        tokens += count
    results = []
    for (candidate, _), (nll, kl) in zip(models, totals, strict=True):
        mean_nll = nll / max(tokens, 1.0)
        results.append(
            {
                "model": candidate.name,
                "val_nll": float(mean_nll),
                "val_ppl": float(np.exp(mean_nll)),
                "kl_to_teacher": float(kl / max(tokens, 1.0)),
                "tokens": int(tokens),
                "parameters": count_params(candidate.config)["total"],
                "weight_bytes": candidate.weight_bytes or sum(_nbytes(v) for v in candidate.params.values()),
                "layers": candidate.config.num_layers,
            }
        )
    return results


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, batch: dict[str, jax.Array]) -> jax.Array:
    return _final_hidden(nnx.merge(graphdef, state), batch)


def _batch_sums(
    states: list, device: jax.Device, data: Mapping[str, np.ndarray], lo: int, hi: int
) -> tuple[int, list[list[jax.Array]]]:
    """Dispatch the sums of rows lo..hi on `device` (not waited for): the loss tokens, and per tile of EVAL_CHUNK
    tokens [teacher NLL, then NLL and KL(teacher || model) of each other model]. `states` holds (graphdef, state,
    embed_dim) per model, the teacher first."""
    sel = np.arange(lo, hi)
    batch = {k: jax.device_put(data[k][sel], device) for k in ("tokens", "positions", "segment_ids")}
    labels, weights = next_token_targets(data["tokens"][sel], data["loss_mask"][sel])
    labels = labels.reshape(-1)
    keep = np.flatnonzero(weights.reshape(-1))
    hiddens = [_forward(g, s, batch).reshape(-1, width)[keep] for g, s, width in states] if len(keep) else []
    tiles = []
    for start in range(0, len(keep), EVAL_CHUNK):
        # every tile is padded to EVAL_CHUNK rows (weight 0): one shape, so nothing recompiles per batch
        count = min(EVAL_CHUNK, len(keep) - start)
        y = jax.device_put(np.pad(labels[keep][start : start + count], (0, EVAL_CHUNK - count)), device)
        w = jax.device_put((np.arange(EVAL_CHUNK) < count).astype(np.float32), device)
        padded = [jnp.pad(h[start : start + count], ((0, EVAL_CHUNK - count), (0, 0))) for h in hiddens]
        p_t, neg_entropy, teacher_nll = _teacher_tile(_logits(*states[0][:2], padded[0]), y, w)
        tile = [teacher_nll]
        for (g, s, _), h in zip(states[1:], padded[1:], strict=True):
            tile.extend(_tile_sums(p_t, neg_entropy, _logits(g, s, h), y, w))
        tiles.append(tile)
    return len(keep), tiles


def _nbytes(value: Any) -> int:
    """Bytes a parameter takes in memory (a PackedWeight: its codes and scales)."""
    return value.nbytes if isinstance(value, PackedWeight) else int(np.asarray(value).nbytes)


def report_markdown(title: str, rows: list[dict[str, Any]], notes: list[str]) -> str:
    ood = any("ood_nll" in r for r in rows)  # evaluate.out_of_domain: two more columns
    lines = [
        f"# {title}",
        "",
        "| model | layers | parameters | weights (MiB) | val NLL | val PPL | KL to teacher |"
        + (" out-of-domain NLL | out-of-domain KL |" if ood else ""),
        "|---|---|---|---|---|---|---|" + ("---|---|" if ood else ""),
    ]
    for r in rows:
        extra = ""
        if ood:
            extra = " | ".join(f"{r[k]:.4f}" if k in r else "-" for k in ("ood_nll", "ood_kl_to_teacher")) + " |"
        lines.append(
            f"| {r['model']} | {r['layers']} | {r['parameters']:,} | {r['weight_bytes'] / 2**20:.1f} "
            f"| {r['val_nll']:.4f} | {r['val_ppl']:.3f} | {r['kl_to_teacher']:.4f} |" + (f" {extra}" if ood else "")
        )
    lines += ["", *notes, "", "![evaluation](evaluation.png)", "", "![training curves](training_curves.png)", ""]
    return "\n".join(lines)


def _figure_bytes(figure) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def save_evaluation_plot(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Bars of validation NLL and KL to the teacher per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    names = [r["model"] for r in rows]
    palette = ["#777777", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    colors = [palette[i % len(palette)] for i in range(len(rows))]
    for ax, key, label in (
        (axes[0], "val_nll", "validation NLL (nats/token)"),
        (axes[1], "kl_to_teacher", "KL to teacher"),
    ):
        values = [r[key] for r in rows]
        ax.bar(names, values, color=colors)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    return atomic_write_bytes(path, _figure_bytes(figure))


def save_training_curves(path: Path, histories: dict[str, list[dict[str, float]]]) -> Path:
    """Training cross-entropy (the term every run shares) and validation loss per run, on one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 3.5), dpi=120)
    for name, history in histories.items():
        axes.plot([h["step"] for h in history], [h["cross_entropy"] for h in history], label=f"{name} train CE", lw=1)
        val = [(h["step"], h["val_cross_entropy"]) for h in history if "val_cross_entropy" in h]
        if val:
            axes.plot(*zip(*val, strict=True), marker="o", lw=1, label=f"{name} val CE")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats/token)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return atomic_write_bytes(path, _figure_bytes(figure))


def read_history(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
