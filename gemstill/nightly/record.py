"""A night recorded: appended to the store's history, compared with the night before, drawn as a trend."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

from gemstill.fsutil import atomic_write_bytes
from gemstill.nightly.history import (
    Change,
    RegressionError,
    append_night,
    compare,
    comparison_markdown,
    read_history,
    regression_message,
    save_trend,
    utc,
)
from gemstill.pipeline.profile import Profile

HISTORY_FILE = "history.duckdb"
TREND_FILE = "trend.png"
REPORT_FILE = "latest.md"


@dataclasses.dataclass(frozen=True)
class NightRecord:
    """A night as written to the history, compared with the night before it."""

    run_time: str
    previous_time: str | None
    changes: list[Change]
    trend: Path
    report: Path
    markdown: str

    @property
    def regressed(self) -> list[Change]:
        return [c for c in self.changes if c.regressed]

    def raise_for_regressions(self) -> None:
        """Fail (after the night is recorded) naming every metric that worsened past its threshold."""
        if self.regressed:
            raise RegressionError(regression_message(self.regressed))


def record_night(directory: Path, profile: Profile, run_time: dt.datetime, rows: list[dict[str, Any]]) -> NightRecord:
    """Append the night to the history, then compare it with the previous night and draw the trend."""
    history_path = directory / HISTORY_FILE
    append_night(history_path, run_time, rows)
    history = read_history(history_path)
    previous_time, changes = compare(history, run_time, profile.nightly.max_regression)
    trend = save_trend(directory / TREND_FILE, history)
    tonight = utc(run_time).isoformat()
    title = f"gemstill nightly evaluation: {profile.name}"
    markdown = comparison_markdown(title, tonight, previous_time, changes, trend)
    report = atomic_write_bytes(directory / REPORT_FILE, markdown.encode())
    return NightRecord(tonight, previous_time, changes, trend, report, markdown)
