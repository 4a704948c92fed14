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
DOCUMENTS_PER_ROW = 1 << 16  # a document's id: its row times this, plus its segment id in that row


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
def _teacher_tile(teacher_logits: jax.Array, labels: jax.Array):
    """Once per tile: the teacher's probabilities, its sum of p log p per token, and its own NLL per token."""
    log_t = jax.nn.log_softmax(teacher_logits, axis=-1)
    p_t = jnp.exp(log_t)
    nll = -jnp.take_along_axis(log_t, labels[:, None], axis=-1)[:, 0]
    return p_t, jnp.sum(p_t * log_t, axis=-1), nll


@jax.jit
def _tile_losses(p_t: jax.Array, neg_entropy: jax.Array, logits: jax.Array, labels: jax.Array):
    """Per token of one tile: NLL of the label under the model, and KL(teacher || model).

    KL = sum p log p - sum p (z - lse(z)) = neg_entropy - (p . z - lse(z) * sum p): two passes over the model's
    [tile x vocab] logits (its logsumexp, and the dot with p), not a log-softmax and a product of arrays.
    """
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = lse - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    kl = neg_entropy - (jnp.sum(p_t * logits, axis=-1) - lse * jnp.sum(p_t, axis=-1))
    return nll, kl


@dataclasses.dataclass(frozen=True)
class DocumentScores:
    """Held-out losses summed per document (a packed sequence's segment: the unit an interval resamples).

    tokens [documents]: target tokens per document; nll, kl [models, documents]: summed per document (the
    teacher first; its KL is 0). Means per token are ratios of sums over documents."""

    models: tuple[Candidate, ...]
    tokens: np.ndarray
    nll: np.ndarray
    kl: np.ndarray

    def index(self, name: str) -> int:
        return [c.name for c in self.models].index(name)

    def rows(self) -> list[dict[str, Any]]:
        """One row per model (teacher first): model, val_nll, val_ppl, kl_to_teacher, tokens, parameters, ..."""
        tokens = float(self.tokens.sum())
        results = []
        for i, candidate in enumerate(self.models):
            mean_nll = self.nll[i].sum() / max(tokens, 1.0)
            results.append(
                {
                    "model": candidate.name,
                    "val_nll": float(mean_nll),
                    "val_ppl": float(np.exp(mean_nll)),
                    "kl_to_teacher": float(self.kl[i].sum() / max(tokens, 1.0)),
                    "tokens": int(tokens),
                    "documents": len(self.tokens),
                    "parameters": count_params(candidate.config)["total"],
                    "weight_bytes": candidate.weight_bytes or sum(_nbytes(v) for v in candidate.params.values()),
                    "layers": candidate.config.num_layers,
                }
            )
        return results


def evaluate_models(
    teacher: Candidate,
    others: list[Candidate],
    data_dir: Path,
    split: str = "validation",
    batch_size: int = 4,
    max_sequences: int | None = None,
    progress: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """One row per model (teacher first): model, val_nll, val_ppl, kl_to_teacher, tokens, parameters."""
    return score_documents(teacher, others, data_dir, split, batch_size, max_sequences, progress).rows()


def score_documents(
    teacher: Candidate,
    others: list[Candidate],
    data_dir: Path,
    split: str = "validation",
    batch_size: int = 4,
    max_sequences: int | None = None,
    progress: Callable[[str], None] = print,
) -> DocumentScores:
    """Every model's NLL and KL to the teacher per held-out document.

    Data-parallel: the batches are dealt out to the processes of a multi-process run in turn, and each process
    computes its batches on its local devices in turn, each device whole batches of the shape a one-device run
    uses. The per-token losses are then gathered and added in batch order, so the scores equal a one-device run's.
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
        return _batch_losses(states, device, data, starts[i], min(starts[i] + batch_size, rows))

    def done(batches: int) -> None:
        progress(f"evaluate: {batches}/{len(starts)} batches of {rows} sequences")

    per_batch = distributed.map_batches("evaluate losses", len(starts), compute, done)
    documents: list[int] = []
    columns: list[np.ndarray] = []
    for docs, losses in per_batch:  # the order a one-device run adds them in
        documents.extend(np.asarray(docs).tolist())
        columns.append(np.asarray(losses, np.float64).reshape(2 * len(models), -1))
    losses = np.concatenate(columns, axis=1) if columns else np.zeros((2 * len(models), 0))
    ids, position = np.unique(np.asarray(documents, np.int64), return_inverse=True)
    sums = np.zeros((2 * len(models), len(ids)))
    for row in range(2 * len(models)):
        sums[row] = np.bincount(position, weights=losses[row], minlength=len(ids))
    return DocumentScores(
        models=tuple(c for c, _ in models),
        tokens=np.bincount(position, minlength=len(ids)).astype(np.float64),
        nll=sums[0::2],
        kl=sums[1::2],
    )


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, batch: dict[str, jax.Array]) -> jax.Array:
    return _final_hidden(nnx.merge(graphdef, state), batch)


def _batch_losses(
    states: list, device: jax.Device, data: Mapping[str, np.ndarray], lo: int, hi: int
) -> tuple[np.ndarray, list[jax.Array]]:
    """Dispatch the losses of rows lo..hi on `device` (not waited for): the document of every target token, and per
    model [NLL, KL(teacher || model)] per target token (the teacher first; its KL is 0). `states` holds
    (graphdef, state, embed_dim) per model, the teacher first."""
    sel = np.arange(lo, hi)
    batch = {k: jax.device_put(data[k][sel], device) for k in ("tokens", "positions", "segment_ids")}
    labels, weights = next_token_targets(data["tokens"][sel], data["loss_mask"][sel])
    labels = labels.reshape(-1)
    keep = np.flatnonzero(weights.reshape(-1))
    rows = (lo + np.arange(len(sel)))[:, None] * DOCUMENTS_PER_ROW + np.asarray(data["segment_ids"][sel], np.int64)
    documents = rows.reshape(-1)[keep]
    hiddens = [_forward(g, s, batch).reshape(-1, width)[keep] for g, s, width in states] if len(keep) else []
    per_model: list[list[jax.Array]] = [[] for _ in range(2 * len(states))]
    for start in range(0, len(keep), EVAL_CHUNK):
        # every tile is padded to EVAL_CHUNK rows: one shape, so nothing recompiles per batch
        count = min(EVAL_CHUNK, len(keep) - start)
        y = jax.device_put(np.pad(labels[keep][start : start + count], (0, EVAL_CHUNK - count)), device)
        padded = [jnp.pad(h[start : start + count], ((0, EVAL_CHUNK - count), (0, 0))) for h in hiddens]
        p_t, neg_entropy, teacher_nll = _teacher_tile(_logits(*states[0][:2], padded[0]), y)
        per_model[0].append(teacher_nll[:count])
        per_model[1].append(jnp.zeros(count))
        for i, ((g, s, _), h) in enumerate(zip(states[1:], padded[1:], strict=True), start=1):
            nll, kl = _tile_losses(p_t, neg_entropy, _logits(g, s, h), y)
            per_model[2 * i].append(nll[:count])
            per_model[2 * i + 1].append(kl[:count])
    losses = (
        jnp.stack([jnp.concatenate(parts) for parts in per_model]) if len(keep) else jnp.zeros((2 * len(states), 0))
    )
    return documents, losses


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
