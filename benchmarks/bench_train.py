"""The training step, synchronous input against prefetched input, side by side in one run.

One student trained the same steps on the same packed data twice: with training.prefetch 0 (each step's rows
read from parquet, labelled and placed on the device on the loop's thread, and metrics fetched every step) and
with prefetch N (a thread reads and places N steps ahead; metrics leave the device every log_every steps).
Printed per variant, timed from the end of the first (compiled) step: loss tokens/s, model TFLOP/s (FLOPs from
the config, gemstill.distill.flops) and MFU where the device's peak is known (not on CPUs); then the ratio.
Both runs are checked to give the same losses before anything is reported.

    python benchmarks/bench_train.py [--layers 4] [--dim 256] [--seq-len 256] [--batch 16] [--steps 20]
        [--prefetch 2] [--vocab 32768]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from gemstill.config import Gemma3Config
from gemstill.data.format import write_split
from gemstill.distill.config import DistillConfig, TrainingConfig
from gemstill.distill.run import Run, Teacher
from gemstill.distill.train import train
from gemstill.model import build_model
from gemstill.params import to_flat


def packed_rows(rows: int, seq_len: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Random documents of 16..128 tokens packed end to end, loss on every token after a document's first."""
    rng = np.random.default_rng(seed)
    arrays = {name: np.zeros((rows, seq_len), np.int32) for name in ("tokens", "positions", "segment_ids", "loss_mask")}
    for row in range(rows):
        at, segment = 0, 1
        while at < seq_len:
            length = min(int(rng.integers(16, 129)), seq_len - at)
            span = slice(at, at + length)
            arrays["tokens"][row, span] = rng.integers(3, vocab, length)
            arrays["positions"][row, span] = np.arange(length)
            arrays["segment_ids"][row, span] = segment
            arrays["loss_mask"][row, at + 1 : at + length] = 1
            at, segment = at + length, segment + 1
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32_768)
    args = parser.parse_args()
    config = Gemma3Config(
        num_layers=args.layers,
        embed_dim=args.dim,
        hidden_dim=4 * args.dim,
        num_heads=4,
        num_kv_heads=1,
        head_dim=args.dim // 4,
        sliding_window=128,
        vocab_size=args.vocab,
        max_context=args.seq_len,
    )
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        for split, rows, seed in (("train", args.batch * args.steps, 1), ("validation", args.batch, 2)):
            write_split(data, split, **packed_rows(rows, args.seq_len, args.vocab, seed))
        results = {}
        for name, depth, log_every in (("synchronous", 0, 1), (f"prefetch {args.prefetch}", args.prefetch, 10)):
            training = TrainingConfig(
                steps=args.steps,
                batch_size=args.batch,
                eval_every=args.steps,
                checkpoint_every=args.steps,
                log_every=log_every,
                prefetch=depth,
                kernels="xla",
            )
            run = Run(
                student=config,
                init_params=to_flat(build_model(config, seed=0)),
                pairs=(),
                objective=DistillConfig(),
                training=training,
                teacher=Teacher(config, None, None),
                title=name,
            )
            out = Path(tmp) / name.replace(" ", "-")
            metrics = train(run, data, out, None, log=lambda _: None)
            history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            results[name] = (metrics, [h["loss"] for h in history])
    (sync, sync_losses), (fetched, fetched_losses) = results.values()
    assert sync_losses == fetched_losses, "prefetched input changed the losses"
    print(f"{'variant':<16}{'tok/s':>12}{'TFLOP/s':>10}{'MFU':>8}")
    for name, (metrics, _) in results.items():
        mfu = "-" if metrics["mfu"] is None else f"{metrics['mfu']:.1%}"
        print(f"{name:<16}{metrics['tokens_per_second']:>12.0f}{metrics['model_tflops_per_second']:>10.4f}{mfu:>8}")
    print(f"prefetched / synchronous tokens/s: {fetched['tokens_per_second'] / sync['tokens_per_second']:.3f}")


if __name__ == "__main__":
    main()
