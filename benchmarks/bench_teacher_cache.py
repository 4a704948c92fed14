"""The teacher_cache stage side by side with the bare teacher forward pass, plus bytes per token and reader speed.

On the same packed sequences (docstrings of the Python standard library, tokenized with the teacher's tokenizer):
  - the bare forward pass, as a teacher would run without the cache (full [B, L, V] logits), and the least a
    chunked pass does (final hidden + LM head chunk by chunk, logsumexp only);
  - the teacher_cache stage end to end (compute, encode, write, checksum, catalog), timed after a warm-up build so
    JAX compilation is excluded; goal: under 10% over the bare pass;
  - bytes per stored token at --k (goal at k=64: at most 300);
  - reader throughput in a shuffled order (cold: first pass, shards checksummed; warm: second pass) against a
    training consumption rate: --train-tokens-per-s, else a measured fwd+bwd step of the teacher itself.

    python benchmarks/bench_teacher_cache.py [--tiny] [--sequences 32] [--seq-len 256] [--k 64] [--sampled]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
from flax import nnx

from gemstill.config import Gemma3Config
from gemstill.data.format import read_split, write_split
from gemstill.data.python_docs import stdlib_documents
from gemstill.loading import LoadedModel, load_model, load_tokenizer
from gemstill.model import build_model
from gemstill.teacher_cache.compute import CHUNK
from gemstill.teacher_cache.config import TeacherCacheConfig
from gemstill.teacher_cache.reader import TeacherCacheReader
from gemstill.teacher_cache.writer import build_teacher_cache
from gemstill.tokenizer import Tokenizer

# --tiny: a random small body with Gemma 3's real vocabulary, so the LM head and the cache do full-size work
TINY_BODY = Gemma3Config(
    num_layers=2, embed_dim=128, hidden_dim=256, num_heads=2, num_kv_heads=1, head_dim=64, sliding_window=64
)
BATCH_FIELDS = ("tokens", "positions", "segment_ids")


def packed_rows(tokenizer: Tokenizer, docs: list[str], rows: int, length: int) -> dict[str, np.ndarray]:
    """Documents (BOS ... EOS) packed end to end into rows; a document that does not fit continues in a new row."""
    out = {name: np.zeros((rows, length), np.int32) for name in (*BATCH_FIELDS, "loss_mask")}
    row, at, segment = 0, 0, 1
    for doc in docs:
        ids = [*tokenizer.encode(doc), tokenizer.eos_id]
        position = 0
        while ids and row < rows:
            take = ids[: length - at]
            span = slice(at, at + len(take))
            out["tokens"][row, span] = take
            out["positions"][row, span] = np.arange(position, position + len(take))
            out["segment_ids"][row, span] = segment
            out["loss_mask"][row, at + 1 : at + len(take)] = 1  # a row's first token of a segment: no context
            ids, position, at, segment = ids[len(take) :], position + len(take), at + len(take), segment + 1
            if at == length:
                row, at, segment = row + 1, 0, 1
        if row == rows:
            return out
    raise SystemExit(f"not enough text for {rows} rows of {length} tokens")


def alternating(candidates: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, float], dict[str, list]]:
    """Best wall time and every result of each candidate; the timed calls alternate between the candidates, so
    load from other processes on the machine falls on all of them alike."""
    seconds = dict.fromkeys(candidates, float("inf"))
    results: dict[str, list] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            results[name].append(jax.block_until_ready(fn()))
            seconds[name] = min(seconds[name], time.perf_counter() - start)
    return seconds, results


def forward_passes(teacher: LoadedModel, data: dict[str, np.ndarray], batch: int) -> dict[str, Callable[[], Any]]:
    """The two baselines, each over every batch of the data."""
    graphdef, state = nnx.split(teacher.model)

    @jax.jit
    def full_logits(state, tokens, positions, segment_ids):
        model = nnx.merge(graphdef, state)
        return model(tokens, positions, mask=segment_ids > 0, segment_ids=segment_ids).logits

    @jax.jit
    def chunked_lse(state, tokens, positions, segment_ids):
        model = nnx.merge(graphdef, state)
        hidden = model(tokens, positions, mask=segment_ids > 0, segment_ids=segment_ids, return_logits=False)
        chunks = hidden.final_hidden.reshape(-1, CHUNK, hidden.final_hidden.shape[-1])
        return jax.lax.map(lambda h: jax.nn.logsumexp(model.logits(h[None]), axis=-1), chunks)

    batches = [
        [jnp.asarray(data[name][start : start + batch]) for name in BATCH_FIELDS]
        for start in range(0, len(data["tokens"]), batch)
    ]

    def run(fn: Callable[..., Any]) -> None:
        for args in batches:
            jax.block_until_ready(fn(state, *args))  # nothing kept: full logits are 1 GiB per 1024 tokens

    return {
        "bare forward (full logits)": functools.partial(run, full_logits),
        "forward + chunked head (lse only)": functools.partial(run, chunked_lse),
    }


def fresh_builds(build: Callable[..., dict[str, Any]], config: TeacherCacheConfig, root: Path) -> Callable[[], Any]:
    """A whole stage run over the train split per call, each into a new directory (root/0, root/1, ...)."""
    runs = itertools.count()
    return lambda: build(config.model_copy(update={"splits": ["train"]}), out_dir=root / str(next(runs)))


def train_rate(teacher: LoadedModel, data: dict[str, np.ndarray], rows: int) -> float:
    """Tokens/s of a fwd+bwd cross-entropy step with the teacher standing in for the student (a real one is smaller)."""
    graphdef, state = nnx.split(teacher.model)

    def masked_cross_entropy(logits, tokens, loss_mask):  # from full logits: the unfused reference step
        logprobs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]
        weights = loss_mask[:, 1:].astype(jnp.float32)
        return -(picked * weights).sum() / jnp.maximum(weights.sum(), 1.0)

    def loss(state, tokens, positions, segment_ids, loss_mask):
        model = nnx.merge(graphdef, state)
        logits = model(tokens, positions, mask=segment_ids > 0, segment_ids=segment_ids).logits
        return masked_cross_entropy(logits, tokens, loss_mask)

    step = jax.jit(jax.value_and_grad(loss))
    args = [jnp.asarray(data[name][:rows]) for name in (*BATCH_FIELDS, "loss_mask")]
    jax.block_until_ready(step(state, *args))  # compile
    seconds, _ = alternating({"step": lambda: step(state, *args)}, 2)
    return args[0].size / seconds["step"]


def column_bytes(out_dir: Path, tokens: int) -> dict[str, float]:
    """Compressed bytes per stored token of each shard column (parquet metadata), to see where the bytes go."""
    sizes: dict[str, float] = {}
    for path in sorted(out_dir.glob("shards/*/*.parquet")):
        metadata = pq.read_metadata(path)
        for group in range(metadata.num_row_groups):
            for column in range(metadata.num_columns):
                chunk = metadata.row_group(group).column(column)
                name = chunk.path_in_schema.split(".")[0]
                sizes[name] = sizes.get(name, 0) + chunk.total_compressed_size / tokens
    return sizes


def reader_rates(out_dir: Path, rows: int, length: int, batch: int) -> tuple[float, float]:
    """Tokens/s (sequence tokens delivered) of a shuffled pass with a fresh reader (cold), then a second pass."""
    reader = TeacherCacheReader(out_dir)
    order = np.random.default_rng(0).permutation(rows)
    rates = []
    for _ in range(2):
        start = time.perf_counter()
        for _ in reader.batches("train", order, batch_size=batch):
            pass
        rates.append(rows * length / (time.perf_counter() - start))
    return rates[0], rates[1]


def load_teacher(tiny: bool) -> LoadedModel:
    if tiny:
        return LoadedModel("tiny (random)", TINY_BODY, build_model(TINY_BODY), load_tokenizer("gemma3-270m"))
    return load_model("gemma3-270m")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="random 2-layer body with the real vocab (quick)")
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--sampled", action="store_true", help="also time the stage in sampled (Gumbel-top-k) mode")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each (best is reported)")
    parser.add_argument("--train-tokens-per-s", type=float, default=None, help="default: measured (fwd+bwd)")
    args = parser.parse_args()
    # the tests' cache: the 270M is converted once per machine and shared (as benchmarks/bench_inference.py does)
    os.environ.setdefault("GEMSTILL_CACHE", str(Path.home() / ".cache" / "gemstill-tests" / "gemstill-cache"))

    teacher = load_teacher(args.tiny)
    tokenizer = teacher.require_tokenizer()
    work = Path(tempfile.mkdtemp(prefix="bench-teacher-cache-"))
    data_dir = work / "data"
    data_dir.mkdir()
    docs = stdlib_documents()
    train = packed_rows(tokenizer, docs, args.sequences, args.seq_len)
    write_split(data_dir, "train", **train)
    write_split(data_dir, "validation", **packed_rows(tokenizer, docs[::-1], args.batch, args.seq_len))
    tokenizer.save(data_dir)
    data = read_split(data_dir, "train")
    print(f"teacher: {teacher.spec}; {args.sequences} x {args.seq_len} tokens, batch {args.batch}, k={args.k}")
    print(f"machine: {platform.machine()} x{os.cpu_count()}, jax {jax.__version__} ({jax.devices()[0].platform})")

    candidates = forward_passes(teacher, data, args.batch)
    for fn in candidates.values():
        fn()  # compile
    modes = ("topk", "sampled") if args.sampled else ("topk",)
    for mode in modes:
        config = TeacherCacheConfig(k=args.k, mode=mode, batch_size=args.batch, sequences_per_shard=args.batch * 2)
        build = functools.partial(build_teacher_cache, data_dir=data_dir, teacher=teacher, log=lambda _: None)
        build(config.model_copy(update={"splits": ["validation"]}), out_dir=work / f"warmup-{mode}")  # compiles
        candidates[f"teacher_cache stage ({mode})"] = fresh_builds(build, config, work / mode)
    seconds, results = alternating(candidates, args.repeats)
    stages = {mode: results[f"teacher_cache stage ({mode})"][-1] for mode in modes}
    for mode in modes:  # fixed start-up (fingerprint, verification) is amortized on real data
        runs = results[f"teacher_cache stage ({mode})"]
        seconds[f"  shard loop only ({mode})"] = min(metrics["compute_seconds"] for metrics in runs)
    train_tok_s = args.train_tokens_per_s or train_rate(teacher, data, min(args.batch, 2))
    cold, warm = reader_rates(work / "topk" / "0", args.sequences, args.seq_len, args.batch)
    columns = column_bytes(work / "topk" / "0", stages["topk"]["tokens"])
    report(args, seconds, stages, columns, train_tok_s, cold, warm)
    shutil.rmtree(work)


def report(
    args: argparse.Namespace,
    seconds: dict[str, float],
    results: dict[str, Any],
    columns: dict[str, float],
    train_tok_s: float,
    cold: float,
    warm: float,
) -> None:
    tokens = args.sequences * args.seq_len
    bare = seconds["bare forward (full logits)"]
    floor = seconds["forward + chunked head (lse only)"]
    print()
    print(f"{'(tokens: all sequence positions)':<36} {'seconds':>8} {'tokens/s':>9} {'vs bare':>8} {'vs chunked':>11}")
    for name, spent in seconds.items():
        print(f"{name:<36} {spent:>8.2f} {tokens / spent:>9.1f} {spent / bare:>7.3f}x {spent / floor:>10.3f}x")
    print()
    for mode, metrics in results.items():
        print(
            f"{mode}: {metrics['bytes_per_token']:.1f} bytes/token at k={args.k} (goal <= 300); "
            f"{metrics['tokens']} stored tokens, {metrics['bytes']} bytes; kept mass {metrics['mean_kept_mass']:.4f}, "
            f"entropy {metrics['mean_entropy']:.3f}; stored log-prob error max {metrics['value_abs_err_max']:.2e} "
            f"mean {metrics['value_abs_err_mean']:.2e}"
        )
    print("topk bytes/token by column: " + ", ".join(f"{name} {size:.1f}" for name, size in columns.items()))
    print(
        f"reader (shuffled, batch {args.batch}): {cold:.0f} tokens/s cold (checksums), {warm:.0f} warm; "
        f"training consumes {train_tok_s:.0f} tokens/s: {cold / train_tok_s:.0f}x / {warm / train_tok_s:.0f}x headroom"
    )
    summary = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} x{os.cpu_count()} CPU",
        "teacher": "tiny" if args.tiny else "gemma3-270m",
        "sequences": args.sequences,
        "seq_len": args.seq_len,
        "k": args.k,
        "seconds": seconds,
        "stage_over_bare": {m: seconds[f"teacher_cache stage ({m})"] / bare for m in results},
        "shard_loop_over_bare": {m: seconds[f"  shard loop only ({m})"] / bare for m in results},
        "bytes_per_token": {m: r["bytes_per_token"] for m, r in results.items()},
        "topk_column_bytes_per_token": columns,
        "reader_tok_s": {"cold": cold, "warm": warm},
        "train_tok_s": train_tok_s,
    }
    print(json.dumps(summary, separators=(",", ":")))


if __name__ == "__main__":
    main()
