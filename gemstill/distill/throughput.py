"""Training throughput: loss tokens and positions per second, and the model FLOPs utilization they imply."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax

from gemstill.distill.flops import peak_flops


class Throughput:
    """Timed from the end of the run's first step (its compilation is not throughput); MFU against this
    platform's peak (gemstill.distill.flops)."""

    def __init__(self) -> None:
        self.tokens = self.positions = 0
        self.began: float | None = None

    def add(self, tokens: int, positions: int, first: bool, ready: Any) -> None:
        if first:  # the one sync outside the sync points: wait for the compiled first step, then start the clock
            jax.block_until_ready(ready)
            self.began = time.perf_counter()
            return
        self.tokens += tokens
        self.positions += positions

    def seconds(self) -> float:
        return time.perf_counter() - self.began if self.began is not None else 0.0

    def tokens_per_second(self) -> float:
        seconds = self.seconds()
        return self.tokens / seconds if seconds > 0 else 0.0

    def summary(self, flops_per_position: float, title: str, log: Callable[[str], None]) -> dict[str, Any]:
        seconds = self.seconds()
        if seconds <= 0 or not self.positions:
            return {"tokens_per_second": None, "model_tflops_per_second": None, "mfu": None}
        achieved = flops_per_position * self.positions / seconds
        devices = jax.devices()
        peak = peak_flops(devices[0].device_kind)
        mfu = achieved / (peak * len(devices)) if peak else None
        log(
            f"{title}: {self.tokens / seconds:.0f} loss tokens/s, {achieved / 1e12:.3f} model TFLOP/s"
            + (f", MFU {mfu:.1%}" if mfu is not None else f" (no peak known for {devices[0].device_kind}: no MFU)")
        )
        return {"tokens_per_second": self.tokens / seconds, "model_tflops_per_second": achieved / 1e12, "mfu": mfu}
