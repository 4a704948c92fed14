"""How near its teacher a student starts, and how much distillation then pays: side by side, in one run.

Part 1, at init (no training). At the parameter budget of the profile's student, every way gemstill can cut the
teacher down, scored on the same validation sequences (NLL, nats per token):
- depth: as many full-width blocks as fit, chosen by each layer-map strategy (uniform, last, adaptive, angular);
- FFN width: deeper students (--depths) whose FFN is pruned to the budget, blocks by angular distance, units kept
  by measured importance (student.projection: importance) against the leading units (truncate);
- heads and embedding channels: every block, one query head fewer per key/value group, or a narrower residual
  stream (3/4 and 7/8 of the teacher's, multiples of 32), each pruned by importance, the FFN filling the rest.

Part 2, trained (`--trained`): `gemstill run PROFILE` in the store (cached stages are reused), then from its
artifacts: student against baseline at equal steps (NLL, KL to the teacher, share of the baseline-teacher gap
closed) and the first validation step at which the student reaches the baseline's final validation NLL (how many
of the baseline's training tokens distillation needs to match it).

    python benchmarks/distill_quality.py [PROFILE] [--store DIR] [--sequences 16] [--depths 18,14,12]
        [--trained [--skip-init]] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gemstill.config import Gemma3Config
from gemstill.data.format import read_split
from gemstill.distill.angular import angular_distances, kept_blocks
from gemstill.distill.cka import sample_batches, sampled_hidden_states
from gemstill.distill.evaluate import Candidate, evaluate_models
from gemstill.distill.init_nll import candidate_maps
from gemstill.distill.layer_map import LayerMap
from gemstill.distill.student_init import init_student_from_teacher
from gemstill.distill.width import WidthChoice, channel_importance, ffn_importance, head_importance
from gemstill.params import count_params, to_flat
from gemstill.pipeline.plan import make_plan


def _run(*args: str) -> None:
    command = [sys.executable, "-m", "gemstill", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def widest_ffn(config: Gemma3Config, budget: int, multiple: int = 32) -> int:
    """The largest FFN width at which `config` has at most `budget` parameters.

    The width is a multiple of `multiple`; 32 fits the Q8_0 and Q4_0 blocks.
    """
    per_unit = (
        count_params(config.replace(hidden_dim=2 * multiple))["total"]
        - count_params(config.replace(hidden_dim=multiple))["total"]
    )
    base = count_params(config.replace(hidden_dim=multiple))["total"] - per_unit
    return max(multiple, (budget - base) // per_unit * multiple)


def _stage_dir(plan, name: str) -> Path:
    """A local copy of a committed stage's directory (fetched and checksummed when the store is remote)."""
    return plan.store.fetch(name, plan.stages[name].key)


def _sets(overrides: dict[str, str]) -> list[str]:
    return [part for key, value in overrides.items() for part in ("--set", f"{key}={value}")]


def with_widest_ffn(config: Gemma3Config, budget: int, ceiling: int) -> Gemma3Config:
    """`config` with the widest FFN (up to `ceiling`, the teacher's) that keeps it within `budget` parameters."""
    return config.replace(hidden_dim=min(widest_ffn(config, budget), ceiling))


def deepest(config: Gemma3Config, budget: int) -> int:
    """The most full-width blocks of `config` that fit in `budget` parameters."""
    fits = [n for n in range(1, config.num_layers + 1) if count_params(config.replace(num_layers=n))["total"] <= budget]
    return max(fits, default=1)


def init_table(profile: str, store: str, sequences: int, depths: list[int], overrides: dict[str, str]) -> list[dict]:
    from gemstill.distill.layer_map import make_layer_map
    from gemstill.loading import load_model
    from gemstill.pipeline.student_stages import student_config

    plan = make_plan(profile, store=store, overrides=overrides)
    needed = ["prepare_data"] + (["pretrain_teacher"] if "pretrain_teacher" in plan.stages else [])
    for name in needed:
        if plan.state(name) != "done":
            _run("run", profile, "--store", store, "--only", name, *_sets(overrides))
    data_dir = _stage_dir(plan, "prepare_data")
    spec = plan.profile.teacher.model or f"orbax:{_stage_dir(plan, 'pretrain_teacher') / 'model'}"
    teacher = load_model(spec, param_dtype="float32", dtype="float32")
    full = teacher.config.replace(layer_types=None)
    budget = count_params(student_config(plan.profile, teacher.config))["total"]
    teacher_flat = to_flat(teacher.model)
    sample = read_split(data_dir, "train")
    settings = plan.profile.layer_map
    batches = sample_batches(sample, settings.sample_sequences)
    print(f"teacher {count_params(teacher.config)['total']:,} parameters; student budget {budget:,}", flush=True)
    # (name, config, layer map with the kept units / heads / channels, projection); params are built one at a time
    candidates: list[tuple[str, Gemma3Config, LayerMap, str]] = []
    depth = deepest(full, budget)
    uniform = make_layer_map(settings.model_copy(update={"strategy": "uniform", "pairs": None}), depth, full.num_layers)
    for name, layer_map in candidate_maps(settings, depth, teacher.model, sample, uniform).items():
        candidates.append((f"depth {depth}, {name}", full.replace(num_layers=depth), layer_map, "none"))
    distances = angular_distances(sampled_hidden_states(teacher.model, batches, settings.max_tokens))
    measured = WidthChoice(
        full,
        ffn=ffn_importance(teacher.model, batches),
        heads=head_importance(teacher.model, batches),
        channels=channel_importance(teacher.model, batches),
    )

    def pruned(config: Gemma3Config) -> LayerMap:
        """Every block of the teacher, or the `config.num_layers` nearest by angular distance, pruned to `config`'s
        widths by importance."""
        pairs = list(enumerate(kept_blocks(distances, config.num_layers)))
        chosen = LayerMap(strategy="explicit", pairs=pairs, student_layers=len(pairs), teacher_layers=full.num_layers)
        return measured.for_student(config, full).apply(chosen)

    for count in depths:  # FFN pruned to the budget, blocks by angular distance
        config = with_widest_ffn(full.replace(num_layers=count), budget, full.hidden_dim)
        chosen = pruned(config)
        candidates.append((f"depth {count}, FFN {config.hidden_dim}, importance", config, chosen, "importance"))
        plain = chosen.model_copy(update={"ffn_units": None})
        candidates.append((f"depth {count}, FFN {config.hidden_dim}, truncate", config, plain, "truncate"))
    # every block: fewer heads, or fewer embedding channels, the FFN filling the rest
    narrower = [full.replace(embed_dim=w) for w in sorted({full.embed_dim * k // 8 // 32 * 32 for k in (6, 7)})]
    if full.num_heads > full.num_kv_heads:
        narrower.insert(0, full.replace(num_heads=full.num_heads - full.num_kv_heads))
    for config in narrower:
        config = with_widest_ffn(config, budget, full.hidden_dim)
        if count_params(config)["total"] > budget:
            continue
        what = f"heads {config.num_heads}" if config.num_heads < full.num_heads else f"embed {config.embed_dim}"
        candidates.append((f"{what}, FFN {config.hidden_dim}, importance", config, pruned(config), "importance"))
    nll = {}
    for name, config, layer_map, projection in tqdm(candidates, desc="students at init"):
        init = init_student_from_teacher(
            config,
            teacher.config,
            teacher_flat,
            [tuple(pair) for pair in layer_map.pairs],
            0,
            projection,
            layer_map.ffn_units,
            layer_map.heads,
            layer_map.channels,
        )
        rows = evaluate_models(
            Candidate("teacher", teacher.config, teacher_flat),
            [Candidate(name, config, init.params)],
            data_dir,
            max_sequences=sequences,
            progress=lambda _: None,
        )
        nll |= {row["model"]: row["val_nll"] for row in rows}
    table = [{"student": "teacher", "parameters": count_params(teacher.config)["total"], "init_nll": nll["teacher"]}]
    for name, config, _, _ in candidates:
        table.append({"student": name, "parameters": count_params(config)["total"], "init_nll": nll[name]})
    return table


def _validation_curve(stage_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [(r["step"], r["val_cross_entropy"]) for r in records if "val_cross_entropy" in r]


def trained_table(profile: str, store: str, overrides: dict[str, str]) -> dict:
    _run("run", profile, "--store", store, *_sets(overrides))
    plan = make_plan(profile, store=store, overrides=overrides)
    report = json.loads((_stage_dir(plan, "evaluate") / "report.json").read_text())
    rows = {row["model"]: row for row in report["rows"]}
    teacher, student, baseline = rows["teacher"], rows["student"], rows["baseline"]

    def gap_closed(nll: str) -> float:
        """The share of the baseline's NLL gap to the teacher that the student closes."""
        return (baseline[nll] - student[nll]) / (baseline[nll] - teacher[nll])

    ours, theirs = (
        _validation_curve(_stage_dir(plan, "train_student")),
        _validation_curve(_stage_dir(plan, "train_baseline")),
    )
    target = min(value for _, value in theirs)
    reached = next((step for step, value in ours if value <= target), None)
    return {
        "teacher": teacher,
        "student": student,
        "baseline": baseline,
        "gap_closed": gap_closed("val_nll"),
        "ood_gap_closed": gap_closed("ood_nll") if "ood_nll" in student else None,
        "reached": reached,
        "steps": theirs[-1][0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", nargs="?", default="gemma3-270m")
    parser.add_argument("--store", default="runs/distill-quality")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--depths", default="18,14,12")
    parser.add_argument("--trained", action="store_true")
    parser.add_argument("--skip-init", action="store_true", help="part 2 only")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    overrides = dict(pair.split("=", 1) for pair in args.set)
    began = time.perf_counter()
    if not args.skip_init:
        depths = [int(d) for d in args.depths.split(",")]
        table = init_table(args.profile, args.store, args.sequences, depths, overrides)
        print(f"\nNLL at init on {args.sequences} validation sequences ({time.perf_counter() - began:.0f} s)")
        print(f"{'student':<38} {'parameters':>13} {'init NLL':>9}")
        for row in table:
            print(f"{row['student']:<38} {row['parameters']:>13,} {row['init_nll']:>9.3f}")
    if args.trained:
        result = trained_table(args.profile, args.store, overrides)
        print("\nafter training, equal steps and data")
        for name in ("teacher", "student", "baseline"):
            row = result[name]
            ood = (
                f"  out of domain: NLL {row['ood_nll']:.3f}  KL {row['ood_kl_to_teacher']:.3f}"
                if "ood_nll" in row
                else ""
            )
            print(f"{name:<10} val NLL {row['val_nll']:.3f}  KL {row['kl_to_teacher']:.3f}{ood}")
        print(
            f"gap closed: {result['gap_closed']:.1%}; the student reaches the baseline's best validation NLL at step "
            f"{result['reached']} of {result['steps']}"
        )
        if result["ood_gap_closed"] is not None:
            print(f"out of domain, gap closed: {result['ood_gap_closed']:.1%}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
