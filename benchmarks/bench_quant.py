"""Quantized inference on the real Gemma 3 270M (CPU), measured side by side in one run.

- file bytes per parameter of every GGUF export type (f32, f16, bf16, q8_0, q4_0);
- peak memory (max RSS of a fresh process) and scoring tokens/s (--batch x --seq tokens) of gemstill with the
  weights in float32 against packed int8 (per channel, quantized on load), q8_0 and q4_0 (read packed from the
  GGUF exports): each variant runs in its own process, so one peak does not hide another;
- decode tokens/s at batch 1 (a 32-token prompt, then --new-tokens greedy steps) of gemstill against llama.cpp
  (llama-cpp-python, all cores) on the same f32, q8_0 and q4_0 files.

Every measured call runs once untimed first (JAX compilation), then --repeats timed calls; the table shows the
best, the JSON line all of them.

    python benchmarks/bench_quant.py [--batch 2] [--seq 256] [--new-tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

PROMPT_LEN = 32
VARIANTS = {  # name -> (GGUF export it reads, quantize on load)
    "fp32": ("f32", None),
    "int8": ("f32", "int8"),
    "q8_0": ("q8_0", None),
    "q4_0": ("q4_0", None),
}


def exports_dir() -> Path:
    """The 270M exported once per machine to every GGUF type (beside the tests' cache)."""
    from gemstill.export import export_model
    from gemstill.loading import load_checkpoint

    root = Path(os.environ.get("GEMSTILL_TEST_CACHE") or Path.home() / ".cache" / "gemstill-tests") / "bench-quant"
    missing = [q for q in ("f32", "f16", "bf16", "q8_0", "q4_0") if not (root / q / "model.gguf").is_file()]
    if missing:
        config, flat, tokenizer = load_checkpoint("gemma3-270m")
        for quant in missing:
            export_model(config, flat, tokenizer, "gguf", root / quant, quant, overwrite=True)
    return root


def _best(seconds: list[float]) -> float:
    return min(seconds)


def worker(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Load one variant and time scoring and batch-1 decoding (runs in its own process)."""
    from gemstill.loading import load_model
    from gemstill.quant.packed import PackedWeight
    from gemstill.sampler import Sampler, SamplingParams
    from gemstill.scoring import Scorer

    export, quantize = VARIANTS[variant]
    path = exports_dir() / export / "model.gguf"
    loaded = load_model(f"gguf:{path}", packed=True, quantize=quantize)
    params = [v.get_value() for v in _params(loaded.model)]
    weight_bytes = sum(p.nbytes if isinstance(p, PackedWeight) else p.size * p.dtype.itemsize for p in params)
    rng = np.random.default_rng(0)
    sequences = [[2, *rng.integers(10, 200_000, args.seq - 1).tolist()] for _ in range(args.batch)]
    scorer = Scorer(loaded.model)
    scorer.logprobs(sequences)
    score_seconds = []
    for _ in range(args.repeats):
        began = time.perf_counter()
        scorer.logprobs(sequences)
        score_seconds.append(time.perf_counter() - began)
    sampler = Sampler(loaded.model)
    prompt = sequences[0][:PROMPT_LEN]
    sampling = SamplingParams(max_new_tokens=args.new_tokens)
    tokens = sampler.generate([prompt], sampling, stop_ids=())[0]
    decode_seconds = []
    for _ in range(args.repeats):
        began = time.perf_counter()
        sampler.generate([prompt], sampling, stop_ids=())
        decode_seconds.append(time.perf_counter() - began)
    return {
        "variant": variant,
        "weight_bytes": int(weight_bytes),
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "score_tokens_per_s": args.batch * (args.seq - 1) / _best(score_seconds),
        "decode_tokens_per_s": args.new_tokens / _best(decode_seconds),
        "score_seconds": score_seconds,
        "decode_seconds": decode_seconds,
        "greedy_tokens": tokens,
    }


def _params(model):
    from flax import nnx

    return [v for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def llama_worker(export: str, args: argparse.Namespace) -> dict[str, Any]:
    """llama.cpp's batch-1 greedy decode of the same prompt on the same file."""
    from llama_cpp import Llama

    path = exports_dir() / export / "model.gguf"
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=os.cpu_count() or 1, verbose=False)
    rng = np.random.default_rng(0)
    prompt = [2, *rng.integers(10, 200_000, args.seq - 1).tolist()][:PROMPT_LEN]

    def decode() -> list[int]:
        llm.reset()
        out = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
            out.append(token)
            if len(out) == args.new_tokens:
                return out
        return out

    tokens = decode()
    seconds = []
    for _ in range(args.repeats):
        began = time.perf_counter()
        decode()
        seconds.append(time.perf_counter() - began)
    return {
        "variant": f"llama.cpp {export}",
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "decode_tokens_per_s": args.new_tokens / _best(seconds),
        "decode_seconds": seconds,
        "greedy_tokens": tokens,
    }


def _run(kind: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, f"--{kind}", name, "--batch", str(args.batch), "--seq", str(args.seq)]
    command += ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{kind} {name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=sorted(VARIANTS))
    parser.add_argument("--llama", choices=["f32", "q8_0", "q4_0"])
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    if args.llama:
        print(json.dumps(llama_worker(args.llama, args)))
        return

    from gemstill.loading import load_checkpoint_config
    from gemstill.params import count_params

    root = exports_dir()
    parameters = count_params(load_checkpoint_config(f"gguf:{root / 'f32' / 'model.gguf'}"))["total"]
    print(f"## file bytes per parameter ({parameters:,} parameters)\n")
    print("| GGUF type | bytes | bytes / parameter | vs f32 |\n|---|---:|---:|---:|")
    f32_bytes = (root / "f32" / "model.gguf").stat().st_size
    for quant in ("f32", "f16", "bf16", "q8_0", "q4_0"):
        size = (root / quant / "model.gguf").stat().st_size
        print(f"| {quant} | {size:,} | {size / parameters:.3f} | {f32_bytes / size:.2f}x smaller |")

    ours = {name: _run("worker", name, args) for name in VARIANTS}
    theirs = {quant: _run("llama", quant, args) for quant in ("f32", "q8_0", "q4_0")}
    base = ours["fp32"]
    print(f"\n## gemstill: packed weights against float32 (scoring {args.batch} x {args.seq} tokens)\n")
    print("| weights | weight bytes in memory | peak RSS | scoring tokens/s | vs fp32 |\n|---|---:|---:|---:|---:|")
    for name, row in ours.items():
        print(
            f"| {name} | {row['weight_bytes'] / 2**20:,.0f} MiB | {row['max_rss_bytes'] / 2**30:.2f} GiB "
            f"| {row['score_tokens_per_s']:.1f} | {row['score_tokens_per_s'] / base['score_tokens_per_s']:.2f}x |"
        )
    print(f"\n## decode at batch 1 ({PROMPT_LEN}-token prompt, {args.new_tokens} new tokens): gemstill vs llama.cpp\n")
    print("| file | gemstill tokens/s | llama.cpp tokens/s | gemstill / llama.cpp | same greedy tokens |")
    print("|---|---:|---:|---:|---:|")
    for quant, name in (("f32", "fp32"), ("q8_0", "q8_0"), ("q4_0", "q4_0")):
        a, b = ours[name], theirs[quant]
        pairs = zip(a["greedy_tokens"], b["greedy_tokens"], strict=True)
        same = next((i for i, (x, y) in enumerate(pairs) if x != y), None)
        agree = f"{args.new_tokens}/{args.new_tokens}" if same is None else f"first {same}"
        ratio = a["decode_tokens_per_s"] / b["decode_tokens_per_s"]
        print(f"| {quant} | {a['decode_tokens_per_s']:.1f} | {b['decode_tokens_per_s']:.1f} | {ratio:.2f}x | {agree} |")
    print("\n" + json.dumps({"gemstill": ours, "llama.cpp": theirs}))


if __name__ == "__main__":
    main()
