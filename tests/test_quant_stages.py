"""The quantize, qat and export stages refuse missing inputs with one line naming what to run first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gemstill.errors import GemstillError
from gemstill.pipeline.context import StageContext
from gemstill.pipeline.profile import load_profile
from gemstill.pipeline.quant_stages import export_stage, qat_stage, quantize_stage

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stage", [qat_stage, quantize_stage, export_stage])
def test_a_stage_without_a_trained_student_is_refused(tmp_path, stage):
    profile, _ = load_profile("tiny")
    without = StageContext(stage="s", profile=profile, inputs={}, workdir=tmp_path)
    with pytest.raises(GemstillError, match="needs the output of a 'train_student' stage"):
        stage(without)
    empty = tmp_path / "train_student"
    empty.mkdir()
    unfinished = StageContext(stage="s", profile=profile, inputs={"train_student": empty}, workdir=tmp_path)
    with pytest.raises(GemstillError, match=r"no trained student.*run the train_student stage first"):
        stage(unfinished)


def test_qat_alone_on_an_empty_store_names_the_missing_stages(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gemstill", "run", "tiny", "--only", "qat", "--store", str(tmp_path / "store")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage qat needs prepare_data, teacher_cache, train_student"), last
    assert not list((tmp_path / "store").glob("qat/*/manifest.json"))
