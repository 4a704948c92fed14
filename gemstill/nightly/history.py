"""The nightly evaluation's memory: a DuckDB table of every night's metrics, the check of a night against the
previous one, the trend plot and the markdown comparison.

One row per (run time, model, model key, suite, metric, value). A night is written in one transaction, so a run
killed while writing leaves the nights before it and nothing of its own.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gemstill.errors import GemstillError

FIELDS = ("run_time", "model", "model_key", "suite", "metric", "value")
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS history (run_time TIMESTAMP, model VARCHAR, model_key VARCHAR, suite VARCHAR, "
    "metric VARCHAR, value DOUBLE)"
)
# metric families (the part of a metric name before the first '/'): which way is better
HIGHER_IS_BETTER = frozenset({"accuracy"})
FAMILIES = frozenset({"val_nll", "val_ppl", "kl_to_teacher", "tokens_per_problem", *HIGHER_IS_BETTER})


class RegressionError(GemstillError):
    """A metric worsened past its threshold since the previous night (the night is recorded all the same)."""


def family(metric: str) -> str:
    return metric.split("/", 1)[0]


def check_thresholds(thresholds: Mapping[str, float]) -> None:
    """Refuse a threshold keyed by no metric family: it would silently never fire."""
    unknown = sorted(set(thresholds) - FAMILIES)
    if unknown:
        raise GemstillError(
            f"nightly.max_regression: unknown metric family {', '.join(unknown)}; use {', '.join(sorted(FAMILIES))}"
        )


def utc(moment: dt.datetime) -> dt.datetime:
    """A timezone-aware UTC time (naive times are taken as UTC, which is how the table stores them)."""
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)


def _stored(moment: dt.datetime) -> dt.datetime:
    return utc(moment).replace(tzinfo=None)


def _connect(path: Path, read_only: bool = False):
    import duckdb

    try:
        return duckdb.connect(str(path), read_only=read_only)
    except duckdb.IOException as error:
        reason = str(error).splitlines()[0]
        raise GemstillError(
            f"{path}: cannot open the nightly history ({reason}); wait for the other nightly run to finish"
        ) from None


def append_night(path: Path, run_time: dt.datetime, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write one night's rows (model, model_key, suite, metric, value) in one transaction; writing the same
    night again (a retried task) replaces it instead of doubling it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    stamp = _stored(run_time)
    values = [(stamp, r["model"], r["model_key"], r["suite"], r["metric"], float(r["value"])) for r in rows]
    connection = _connect(path)
    try:
        connection.execute("BEGIN TRANSACTION")
        connection.execute(SCHEMA)
        connection.execute("DELETE FROM history WHERE run_time = ?", [stamp])
        if values:
            connection.executemany("INSERT INTO history VALUES (?, ?, ?, ?, ?, ?)", values)
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    finally:
        connection.close()


def read_history(path: Path) -> list[dict[str, Any]]:
    """Every row, oldest night first, as dicts of the six fields (run_time an ISO 8601 UTC string)."""
    if not Path(path).is_file():
        return []
    connection = _connect(path, read_only=True)
    try:
        fetched = connection.execute(
            f"SELECT {', '.join(FIELDS)} FROM history ORDER BY run_time, suite, model, metric"
        ).fetchall()
    finally:
        connection.close()
    return [dict(zip(FIELDS, (utc(r[0]).isoformat(), *r[1:]), strict=True)) for r in fetched]


def nights(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """The distinct run times of a history, oldest first."""
    return sorted({r["run_time"] for r in history}, key=dt.datetime.fromisoformat)


@dataclasses.dataclass(frozen=True)
class Change:
    """One metric of one model tonight against its latest earlier value (previous None: new tonight)."""

    model: str
    model_key: str
    suite: str
    metric: str
    previous: float | None
    current: float
    threshold: float | None
    previous_time: str | None = None
    previous_key: str | None = None

    @property
    def worsening(self) -> float | None:
        """How much worse tonight is, in the metric's units (negative: better); NaN when tonight is not finite."""
        if self.previous is None:
            return None
        if not math.isfinite(self.current):
            return math.nan
        delta = self.current - self.previous
        return -delta if family(self.metric) in HIGHER_IS_BETTER else delta

    @property
    def regressed(self) -> bool:
        worse = self.worsening
        if self.threshold is None or worse is None:
            return False
        return math.isnan(worse) or worse > self.threshold

    def describe(self) -> str:
        """`model suite metric previous → tonight (change, threshold)`, with the model keys when they differ."""
        model = (
            self.model
            if self.previous_key == self.model_key
            else f"{self.model} ({self.previous_key} → {self.model_key})"
        )
        return (
            f"{model} {self.suite} {self.metric} {self.previous:.4g} → {self.current:.4g} "
            f"({self.current - self.previous:+.4g}, threshold {self.threshold:g})"
        )


def compare(
    history: Sequence[Mapping[str, Any]], run_time: dt.datetime, thresholds: Mapping[str, float]
) -> tuple[str | None, list[Change]]:
    """(the night before run_time, every metric of the night at run_time against its latest earlier value).

    Per metric, not per night: a night that ran fewer suites does not hide the nights before it."""
    order = {t: i for i, t in enumerate(nights(history))}
    tonight = utc(run_time).isoformat()
    earlier = [t for t in order if dt.datetime.fromisoformat(t) < utc(run_time)]
    latest: dict[tuple[str, str, str], Mapping[str, Any]] = {}
    for r in sorted((r for r in history if r["run_time"] in earlier), key=lambda r: order[r["run_time"]]):
        latest[(r["model"], r["suite"], r["metric"])] = r
    changes = []
    for r in history:
        if r["run_time"] != tonight:
            continue
        before = latest.get((r["model"], r["suite"], r["metric"]), {})
        changes.append(
            Change(
                r["model"],
                r["model_key"],
                r["suite"],
                r["metric"],
                before.get("value"),
                r["value"],
                thresholds.get(family(r["metric"])),
                before.get("run_time"),
                before.get("model_key"),
            )
        )
    return (earlier[-1] if earlier else None), changes


def regression_message(regressed: Sequence[Change]) -> str:
    """One line naming every regressed metric, its model, previous → tonight's value, the change, the threshold."""
    by_night: dict[str | None, list[str]] = {}
    for change in regressed:
        by_night.setdefault(change.previous_time, []).append(change.describe())
    parts = [f"against the night of {night}: {'; '.join(items)}" for night, items in by_night.items()]
    return f"{len(regressed)} metric(s) regressed " + ", and ".join(parts)


def comparison_markdown(title: str, run_time: str, previous_time: str | None, changes: Sequence[Change], png: Path):
    """The night's table against each metric's previous value, regressions marked, with the trend plot."""
    against = f"the previous night: {previous_time}" if previous_time else "the first night: nothing to compare"
    lines = [
        f"# {title}",
        "",
        f"Night of {run_time} ({against}). Each metric against its latest earlier value; a threshold is the most "
        "it may worsen, in its own units.",
        "",
        "| model | model key | suite | metric | previous | tonight | change | threshold | check |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in changes:
        previous = "-" if c.previous is None else f"{c.previous:.4f}"
        delta = "-" if c.previous is None else f"{c.current - c.previous:+.4f}"
        threshold = "-" if c.threshold is None else f"{c.threshold:g}"
        check = "new" if c.previous is None else "**REGRESSED**" if c.regressed else "ok"
        lines.append(
            f"| {c.model} | {c.model_key} | {c.suite} | {c.metric} | {previous} | {c.current:.4f} | {delta} "
            f"| {threshold} | {check} |"
        )
    lines += ["", f"![trend]({png})", "", f"Trend plot: `{png}`", ""]
    return "\n".join(lines)


def save_trend(path: Path, history: Sequence[Mapping[str, Any]]) -> Path:
    """One panel per (suite, metric family), one line per model over the nights; a family of several metrics
    (accuracy per method and kind) is drawn as their mean, the panel title says over how many."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gemstill.plots import save_figure

    series: dict[tuple[str, str], dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(dict))
    metrics: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in history:
        panel = (r["suite"], family(r["metric"]))
        series[panel][r["model"]].setdefault(r["run_time"], []).append(r["value"])
        metrics[panel].add(r["metric"])
    panels = sorted(series) or [("", "no nights yet")]
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {m: palette[i % len(palette)] for i, m in enumerate(sorted({r["model"] for r in history}))}
    columns = min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.3 * rows), dpi=120, squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for model, by_night in series.get(panel, {}).items():
            times = sorted(by_night, key=dt.datetime.fromisoformat)
            ax.plot(
                [dt.datetime.fromisoformat(t) for t in times],
                [sum(by_night[t]) / len(by_night[t]) for t in times],
                marker="o",
                linewidth=1.2,
                label=model,
                color=colors[model],
            )
        count = len(metrics.get(panel, ()))
        ax.set_title(f"{panel[0]}: {panel[1]}" + (f" (mean of {count})" if count > 1 else ""), fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        if series.get(panel):
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    return save_figure(path, figure)
