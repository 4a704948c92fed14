"""Cache keys change exactly when what a stage computes from changes: a setting, a data file's content, the
teacher checkpoint's content, the code a stage can import, a numerics library; and never with paths or mtimes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY

from gemstill.checkpoints.native import save_native
from gemstill.model import build_model
from gemstill.params import to_flat
from gemstill.pipeline import code_version
from gemstill.pipeline.plan import make_plan, run_stage

ALL = {
    "prepare_data",
    "teacher_cache",
    "layer_map",
    "train_student",
    "train_baseline",
    "quantize",
    "qat",
    "evaluate",
    "evaluate_reasoning",
    "export",
}
PROFILE = """
name: keys
pipeline: distill
store: {root}/store
teacher: {{model: "orbax:{root}/teacher"}}
data:
  source: files
  files: {{paths: ["{root}/data/*.jsonl"]}}
  seq_len: 32
hardware: {{platform: cpu}}
student: {{architecture: {{num_layers: 3}}, init: teacher}}
"""


def _write_teacher(directory: Path, seed: int) -> None:
    save_native(directory, TINY, to_flat(build_model(TINY, seed=seed)), tokenizer_model=None)


def _workspace(root: Path) -> Path:
    _write_teacher(root / "teacher", seed=0)
    (root / "data").mkdir(parents=True)
    (root / "data" / "a.jsonl").write_text('{"text": "one two three"}\n{"text": "four five"}\n')
    (root / "profile.yaml").write_text(PROFILE.format(root=root))
    return root / "profile.yaml"


def _keys(profile: Path, **overrides: str) -> dict[str, str]:
    return {name: stage.key for name, stage in make_plan(str(profile), overrides=overrides or None).stages.items()}


def _changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {name for name in before if before[name] != after[name]}


@pytest.fixture
def profile(tmp_path) -> Path:
    return _workspace(tmp_path)


def test_a_setting_turns_its_stage_and_what_is_downstream_stale(profile):
    base = _keys(profile)
    assert _changed(base, _keys(profile, **{"qat.steps": "3"})) == {"qat", "evaluate", "evaluate_reasoning", "export"}
    assert _changed(base, _keys(profile, **{"reasoning.limit": "3"})) == {"evaluate_reasoning"}
    assert _changed(base, _keys(profile, **{"nightly.max_regression.nll": "0.5"})) == set()  # no stage reads it
    assert _changed(base, _keys(profile, name="renamed")) == {"export"}  # its model card names the profile
    assert _changed(base, _keys(profile, **{"hardware.concurrent_stages": "2"})) == set()  # where, not what


def test_data_files_count_by_content_not_by_path_or_mtime(profile):
    root = profile.parent
    base = _keys(profile)
    data = root / "data" / "a.jsonl"
    os.utime(data, ns=(1, 1))  # touched, same bytes
    assert _keys(profile) == base
    moved = root / "elsewhere"
    shutil.copytree(root / "data", moved)
    assert _keys(profile, **{"data.files.paths": json.dumps([f"{moved}/*.jsonl"])}) == base
    data.write_text(data.read_text() + '{"text": "six"}\n')
    assert _changed(base, _keys(profile)) == ALL  # every stage reads the data, directly or not


def test_an_out_of_domain_corpus_counts_by_content_for_evaluate_only(profile):
    root = profile.parent
    (root / "ood").mkdir()
    (root / "ood" / "b.jsonl").write_text('{"text": "seven eight"}\n')
    corpus = {"source": "files", "files": {"paths": [f"{root}/ood/*.jsonl"]}}
    base = _keys(profile)
    with_ood = _keys(profile, **{"evaluate.out_of_domain": json.dumps(corpus)})
    assert _changed(base, with_ood) == {"evaluate", "export"}  # the model cards carry the evaluation
    shutil.copytree(root / "ood", root / "ood2")
    moved = {"source": "files", "files": {"paths": [f"{root}/ood2/*.jsonl"]}}
    assert _keys(profile, **{"evaluate.out_of_domain": json.dumps(moved)}) == with_ood
    (root / "ood2" / "b.jsonl").write_text('{"text": "nine"}\n')
    edited = _keys(profile, **{"evaluate.out_of_domain": json.dumps(moved)})
    assert _changed(with_ood, edited) == {"evaluate", "export"}


def test_the_teacher_counts_by_content_not_by_path_or_mtime(profile):
    root = profile.parent
    base = _keys(profile)
    shutil.copytree(root / "teacher", root / "copy")
    for file in (root / "copy").rglob("*"):
        os.utime(file, ns=(2, 2))
    assert _keys(profile, **{"teacher.model": f"orbax:{root}/copy"}) == base
    _write_teacher(root / "teacher", seed=1)  # same architecture, other weights
    assert _changed(base, _keys(profile)) == ALL


def test_code_counts_through_the_import_graph(profile, monkeypatch):
    """Editing a module changes the keys of exactly the stages that can import it (and what is downstream)."""
    base = _keys(profile)
    real = code_version.read_source

    def edited(module: str):
        monkeypatch.setattr(code_version, "read_source", lambda name: real(name) + (b"#" if name == module else b""))
        changed = _changed(base, _keys(profile))
        monkeypatch.setattr(code_version, "read_source", real)
        return changed

    assert edited("gemstill.cli") == set()  # no stage imports the CLI
    assert edited("gemstill.nightly") == set()
    assert edited("gemstill.nightly.suites") == set()
    assert edited("gemstill.reasoning.tot") == {"evaluate_reasoning"}
    # the teacher's forward pass over the data: the cache and what trains on it, not the baseline or layer map
    downstream_of_cache = {"teacher_cache", "train_student", "quantize", "qat", "evaluate", "evaluate_reasoning"}
    assert edited("gemstill.teacher_cache.compute") == downstream_of_cache | {"export"}
    assert edited("gemstill.kernels._dispatch") == ALL  # the model's kernels: every stage that runs a model
    # the loss terms: every stage that trains (QAT is the same loop), and what is downstream of it
    assert edited("gemstill.distill.strategies") >= {"train_student", "train_baseline", "qat", "evaluate"}
    assert edited("gemstill.pretrain") == set()  # this profile's teacher is a checkpoint: nothing pretrains


def test_closure_holds_what_the_old_module_lists_missed():
    from gemstill.pipeline.stages import BUILTIN

    closure = set(code_version.module_closure((BUILTIN["train_student"].code_root,)))
    missed = {
        "gemstill.teacher_cache.reader",
        "gemstill.data.targets",
        "gemstill.data.format",
        "gemstill.kernels._dispatch",
    }
    assert missed | {"gemstill", "gemstill.distill"} <= closure
    assert not {"gemstill.cli", "gemstill.pipeline.stages", "gemstill.teacher_cache.compute"} & closure


def test_a_numerics_library_version_counts(profile, monkeypatch):
    base = _keys(profile)
    versions = {**code_version.dependency_versions(), "jax": "0.0.1"}
    monkeypatch.setattr(code_version, "dependency_versions", lambda: versions)
    assert _changed(base, _keys(profile)) == ALL


CHAIN = """
name: chain
stages:
  source: {task: "pipeline_stages:source", reads: [data, _data_identity, teacher, _teacher_identity]}
  double: {task: "pipeline_stages:double", needs: [source]}
"""


def test_a_copied_store_and_teacher_are_done_in_another_directory(tmp_path, monkeypatch):
    """Finish a pipeline, copy the store, the teacher and the data elsewhere: `gemstill status` there says done."""
    tests = Path(__file__).parent
    monkeypatch.setenv("GEMSTILL_TEST_LOG", str(tmp_path / "ran.log"))
    monkeypatch.syspath_prepend(str(tests))
    first = tmp_path / "machine-a"
    first.mkdir()
    profile = _workspace(first)
    (first / "chain.yaml").write_text(CHAIN)
    plan = make_plan(str(profile), pipeline=str(first / "chain.yaml"))
    for name in plan.stages:
        run_stage(plan, name)
    second = tmp_path / "machine-b"
    shutil.copytree(first, second)
    (second / "profile.yaml").write_text(PROFILE.format(root=second))
    env = {**os.environ, "PYTHONPATH": str(tests)}
    result = subprocess.run(
        [sys.executable, "-m", "gemstill", "status", "profile.yaml", "--pipeline", "chain.yaml", "--json"],
        cwd=second,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["stages"]
    assert [(row["stage"], row["state"]) for row in rows] == [("source", "done"), ("double", "done")]
    assert all(str(second / "store") in row["path"] for row in rows)
