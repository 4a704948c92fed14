"""`implementation="auto"`: Pallas only on TPU and only once the compiled kernel check has passed; XLA otherwise,
with the reason logged. The TPU cases fake the backend and the check; the check itself runs here interpreted."""

from __future__ import annotations

import logging

import pytest
from gemstill.kernels import auto
from gemstill.kernels.dispatch import resolve


@pytest.fixture(autouse=True)
def fresh_choice():
    """auto_choice is memoized per process: start and leave each test with no decision made."""
    auto.auto_choice.cache_clear()
    yield
    auto.auto_choice.cache_clear()


def test_auto_takes_xla_off_tpu_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gemstill.kernels"):
        assert resolve("auto") == (False, False)
        assert resolve("auto") == (False, False)
    reason = "XLA: the backend is cpu; the Pallas kernels are built for TPU"
    assert auto.describe_auto() == f"training.kernels auto -> {reason}"
    assert [r.getMessage() for r in caplog.records] == [auto.describe_auto()]  # logged once per process


@pytest.mark.parametrize(
    "failure", [auto.KernelCheckError("relative error above 0.02: lm_head 1.00e+00"), RuntimeError("Mosaic failed")]
)
def test_auto_takes_xla_when_the_check_fails_on_tpu(monkeypatch, caplog, failure: Exception) -> None:
    def check():
        raise failure

    monkeypatch.setattr(auto, "_backend", lambda: "tpu")
    monkeypatch.setattr(auto, "check_kernels", check)
    with caplog.at_level(logging.INFO, logger="gemstill.kernels"):
        assert resolve("auto") == (False, False)
    reason = auto.auto_choice().reason
    assert reason == f"XLA: the compiled kernel check failed on TPU: {type(failure).__name__}: {failure}"
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and reason in record.getMessage() and record.exc_info


def test_auto_takes_pallas_when_the_check_passes_on_tpu(monkeypatch) -> None:
    monkeypatch.setattr(auto, "_backend", lambda: "tpu")
    monkeypatch.setattr(auto, "check_kernels", lambda: {"lm_head": 1e-6, "attention_local": 3e-6})
    assert resolve("auto") == (True, False)
    assert "Pallas: the compiled kernel check passed on TPU (error 3.0e-06)" in auto.describe_auto()


def test_check_passes_with_interpreted_kernels() -> None:
    errors = auto.check_kernels(interpret=True)
    assert set(errors) == {"lm_head", "attention_global", "attention_local"}
    assert max(errors.values()) < 1e-4  # float32 on CPU: only the order of sums differs


def test_check_raises_on_a_mismatch(monkeypatch) -> None:
    monkeypatch.setattr(auto, "_errors", lambda interpret: {"lm_head": 1e-6, "attention_local": 0.5})
    with pytest.raises(auto.KernelCheckError, match=r"above 0.02: attention_local 5.00e-01$"):
        auto.check_kernels(interpret=True)
