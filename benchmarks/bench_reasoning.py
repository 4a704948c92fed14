"""Tree-of-thought throughput: every level's proposals (and values) in one batched generate call, against the
one-prompt-at-a-time loop, side by side on the same model, puzzles and settings.

The model is the tiny profile's teacher (it speaks the Game-of-24 thought language: run `gemstill run tiny`
first) or any --model SPEC with --tokenizer. Each variant runs once untimed (JAX compilation), then --repeats
timed runs; the table shows the best, the JSON line all of them, and whether both found the same answers.

    python benchmarks/bench_reasoning.py [--store runs/tiny] [--puzzles 16] [--breadth 5] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def latest(store: Path, stage: str) -> Path:
    runs = [p for p in (store / stage).glob("*/manifest.json")]
    if not runs:
        raise SystemExit(f"no committed {stage} in {store}; run `gemstill run tiny --store {store}` first")
    return max(runs, key=lambda p: json.loads(p.read_text())["finished_at"]).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("runs/tiny"))
    parser.add_argument("--model", help="a model spec (default: the store's pretrained teacher)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.model (default: the store's prepared data)")
    parser.add_argument("--puzzles", type=int, default=16)
    parser.add_argument("--breadth", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from gemstill.reasoning.config import ToTConfig
    from gemstill.reasoning.problems import load_problems
    from gemstill.reasoning.suite import load_text_model
    from gemstill.reasoning.tot import tree_of_thought
    from gemstill.tokenizer import Tokenizer

    data = latest(args.store, "prepare_data")
    spec = args.model or f"orbax:{latest(args.store, 'pretrain_teacher') / 'model'}"
    tokenizer = Tokenizer.from_file(args.tokenizer or data / "tokenizer.model")
    puzzles = [p for p in load_problems(data / "heldout.jsonl") if p.kind == "game24"][: args.puzzles]
    model = load_text_model("teacher", spec, tokenizer)
    settings = ToTConfig()
    results: dict[str, dict] = {}
    for name, batched in (("batched levels", True), ("one at a time", False)):
        tree_of_thought(model, puzzles, args.breadth, settings, batched=batched)  # compile
        times, outcome = [], None
        for _ in range(args.repeats):
            began = time.perf_counter()
            outcome = tree_of_thought(model, puzzles, args.breadth, settings, batched=batched)
            times.append(time.perf_counter() - began)
        tokens = sum(r.tokens for r in outcome.records)
        results[name] = {
            "seconds": times,
            "tokens": tokens,
            "tokens_per_second": tokens / min(times),
            "answers": [r.answer for r in outcome.records],
            "solved": outcome.correct,
        }
    batched, single = results["batched levels"], results["one at a time"]
    same = sum(a == b for a, b in zip(batched["answers"], single["answers"], strict=True))
    print(f"ToT b={args.breadth}, {len(puzzles)} puzzles, {spec}")
    print(f"{'variant':<16}{'best s':>10}{'tokens':>10}{'tokens/s':>12}{'solved':>8}")
    for name, r in results.items():
        print(f"{name:<16}{min(r['seconds']):>10.2f}{r['tokens']:>10}{r['tokens_per_second']:>12.1f}{r['solved']:>8}")
    ratio = batched["tokens_per_second"] / single["tokens_per_second"]
    print(f"batched / one-at-a-time tokens/s: {ratio:.1f}x; same answers on {same}/{len(puzzles)} puzzles")
    print(json.dumps({"breadth": args.breadth, "puzzles": len(puzzles), "ratio": ratio, "results": results}))


if __name__ == "__main__":
    main()
