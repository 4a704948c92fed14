"""The reasoning report: a markdown table, a PNG of accuracy per model and method and of cost against accuracy,
and the per-problem records as JSON lines, so every number in the table can be recounted."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from gemstill.fsutil import atomic_write_bytes
from gemstill.reasoning.records import MethodResult


def report_markdown(title: str, rows: list[dict[str, Any]], notes: list[str]) -> str:
    lines = [
        f"# {title}",
        "",
        "| model | method | problems | correct | accuracy | of teacher | tokens / problem | s / problem |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fraction = r.get("fraction_of_teacher")
        accuracy = f"{r['accuracy']:.1%}" + _interval(r, "accuracy", ".0%")
        of_teacher = "-" if fraction is None else f"{fraction:.0%}" + _interval(r, "fraction_of_teacher", ".0%")
        lines.append(
            f"| {r['model']} | {r['method']} | {r['kind']} ({r['total']}) | {r['correct']} | {accuracy} "
            f"| {of_teacher} | {r['tokens_per_problem']:.0f} | {r['seconds_per_problem']:.3f} |"
        )
    if any("accuracy_low" in r for r in rows):
        notes = [*notes, "Brackets: 95% intervals, percentile bootstrap over problems (a model and the teacher on the "
                 "same resampled problems for the fraction)."]  # fmt: skip
    lines += ["", *notes, "", "![reasoning](reasoning.png)", ""]
    return "\n".join(lines)


def _interval(row: dict[str, Any], name: str, form: str) -> str:
    low, high = row.get(f"{name}_low"), row.get(f"{name}_high")
    return "" if low is None or high is None else f" [{low:{form}}, {high:{form}}]"


def save_records(directory: Path, model: str, result: MethodResult, kind: str) -> Path:
    """`<directory>/<model>/<method>-<kind>.jsonl`: one record per problem (prompt, output, answer, correct, ...)."""
    body = "".join(json.dumps(record) + "\n" for record in result.to_json()["records"])
    return atomic_write_bytes(directory / model / f"{result.method}-{kind}.jsonl", body.encode())


def save_reasoning_plot(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Left: accuracy per (method, kind), a bar per model. Right: tokens per problem against accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = list(dict.fromkeys(r["model"] for r in rows))
    groups = list(dict.fromkeys((r["method"], r["kind"]) for r in rows))
    lookup = {(r["model"], r["method"], r["kind"]): r for r in rows}
    figure, (bars, cost) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110)
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        heights = [lookup[(model, *g)]["accuracy"] if (model, *g) in lookup else 0.0 for g in groups]
        bars.bar(np.arange(len(groups)) + i * width, heights, width, label=model)
        points = [lookup[(model, *g)] for g in groups if (model, *g) in lookup]
        cost.scatter([p["tokens_per_problem"] for p in points], [p["accuracy"] for p in points], label=model)
        for p in points:
            cost.annotate(f"{p['method']}/{p['kind']}", (p["tokens_per_problem"], p["accuracy"]), fontsize=6)
    bars.set_xticks(np.arange(len(groups)) + width * (len(models) - 1) / 2)
    bars.set_xticklabels([f"{m}\n{k}" for m, k in groups], fontsize=8)
    bars.set_ylabel("accuracy")
    bars.set_ylim(0, 1)
    bars.set_title("accuracy per model and method")
    bars.legend(fontsize=7)
    cost.set_xscale("symlog")
    cost.set_xlabel("generated tokens per problem")
    cost.set_ylabel("accuracy")
    cost.set_ylim(-0.02, 1.02)
    cost.set_title("cost against accuracy")
    cost.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return atomic_write_bytes(Path(path), buffer.getvalue())
