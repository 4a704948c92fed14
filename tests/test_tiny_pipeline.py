"""The `tiny` profile end to end through the real CLI: a full run (distilled student vs baseline), cache hits,
status, cache stats, the report, and a run killed with SIGKILL in the middle of the teacher cache that resumes
to the same artifacts."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import seed_store

from gemstill.data.format import read_split
from gemstill.data.python_docs import stdlib_documents
from gemstill.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
EVERY_STAGE = (
    "prepare_data", "pretrain_teacher", "teacher_cache", "layer_map", "train_student", "train_baseline", "quantize",
    "qat", "evaluate", "evaluate_reasoning", "export",
)  # fmt: skip


def gemstill(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gemstill", *args], capture_output=True, text=True, timeout=900, cwd=REPO, **kwargs
    )


def stage_dir(store: Path, stage: str) -> Path:
    (key_dir,) = [p for p in (store / stage).iterdir() if (p / "manifest.json").is_file()]
    return key_dir


def file_digests(directory: Path, pattern: str) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.glob(pattern))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_teacher):
    """One uninterrupted run of the tiny profile from the session's pretrained teacher, timed."""
    store = seed_store(tiny_teacher, tmp_path_factory.mktemp("tiny") / "store")
    began = time.perf_counter()
    result = gemstill("run", "tiny", "--store", str(store))
    seconds = time.perf_counter() - began
    assert result.returncode == 0, result.stderr[-3000:]
    return store, seconds, result


def test_the_terminal_shows_one_line_per_stage_and_no_prefect_warnings(full_run):
    """`gemstill run` prints a line per stage as it ends, the progress bars and the report; Prefect's warnings
    about tags and worker-thread timeouts are gone at their cause: not on the terminal, nor in the run's log
    file, which holds the whole Prefect log."""
    _, _, result = full_run
    terminal = result.stdout + result.stderr
    for warning in ("workers available", "worker thread"):
        assert warning not in terminal
    stage_lines = [line for line in result.stdout.splitlines() if line.startswith("stage ")]
    assert sorted(line.split(":")[0] for line in stage_lines) == sorted(f"stage {name}" for name in EVERY_STAGE)
    assert all(re.fullmatch(r"stage \w+: (ran in [\d.]+ s|cached)", line) for line in stage_lines), stage_lines
    assert "Beginning flow run" not in terminal and "Starting temporary server" not in terminal
    log_file = Path(re.search(r"; log (\S+\.log)", result.stdout).group(1))
    log = log_file.read_text()
    assert "Beginning flow run" in log and "committed as" in log  # the Prefect log, there in full
    for warning in ("workers available", "worker thread"):
        assert warning not in log
    assert "report: tiny" in result.stdout


def test_full_run_then_all_cached(full_run):
    store, first_seconds, _ = full_run
    status = json.loads(gemstill("status", "tiny", "--store", str(store), "--json").stdout)
    assert (
        [(s["stage"], s["state"]) for s in status["stages"]]
        == [(name, "done") for name in EVERY_STAGE]
        == [
            ("prepare_data", "done"),
            ("pretrain_teacher", "done"),
            ("teacher_cache", "done"),
            ("layer_map", "done"),
            ("train_student", "done"),
            ("train_baseline", "done"),
            ("quantize", "done"),
            ("qat", "done"),
            ("evaluate", "done"),
            ("evaluate_reasoning", "done"),
            ("export", "done"),
        ]
    )
    manifests = {p.parent.parent.name: p.stat().st_mtime_ns for p in store.glob("*/*/manifest.json")}
    began = time.perf_counter()
    again = gemstill("run", "tiny", "--store", str(store))
    second_seconds = time.perf_counter() - began
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("cached") == 11
    assert {p.parent.parent.name: p.stat().st_mtime_ns for p in store.glob("*/*/manifest.json")} == manifests
    assert second_seconds < first_seconds / 2, (first_seconds, second_seconds)


def test_status_shows_stale_after_a_config_change(full_run):
    store, _, _ = full_run
    result = gemstill("status", "tiny", "--store", str(store), "--set", "teacher_cache.k=8", "--json")
    status = json.loads(result.stdout)
    states = {s["stage"]: s["state"] for s in status["stages"]}
    assert states == {
        "prepare_data": "done",
        "pretrain_teacher": "done",
        "teacher_cache": "stale",
        "layer_map": "done",  # reads no cache setting
        "train_student": "stale",
        "train_baseline": "done",  # cross-entropy only: independent of the teacher cache
        "quantize": "stale",
        "qat": "stale",
        "evaluate": "stale",
        "evaluate_reasoning": "stale",
        "export": "stale",
    }


def test_distilled_student_beats_the_baseline(full_run):
    """The proof of the tiny profile: on held-out data the distilled student has lower NLL and lower KL to the
    teacher than a same-size student trained on the same data and steps with cross-entropy only."""
    store, _, _ = full_run
    result = gemstill("report", "tiny", "--store", str(store), "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["model"]: row for row in json.loads(result.stdout)}
    assert list(rows) == ["teacher", "student", "baseline", "student-q8_0-ptq", "student-q4_0-ptq", "student-q4_0-qat"]
    assert rows["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert rows["student"]["val_nll"] < rows["baseline"]["val_nll"]
    assert rows["student"]["kl_to_teacher"] < rows["baseline"]["kl_to_teacher"]
    assert rows["student"]["parameters"] == rows["baseline"]["parameters"] < rows["teacher"]["parameters"]
    for row in rows.values():
        assert row["val_ppl"] == pytest.approx(2.718281828459045 ** row["val_nll"], rel=1e-9)
    evaluate = stage_dir(store, "evaluate")
    for name in ("report.md", "evaluation.png", "training_curves.png"):
        assert (evaluate / name).stat().st_size > 0
    # evaluate.out_of_domain: stdlib prose, far from the arithmetic every model trained on, scored beside it
    scored = [name for name, row in rows.items() if "ood_nll" in row]
    assert scored == ["teacher", "student", "baseline"]
    assert rows["teacher"]["ood_kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert all(rows[name]["ood_nll"] > rows[name]["val_nll"] + 1.0 for name in scored), rows
    ood = read_split(evaluate / "out_of_domain", "validation")
    tokenizer = Tokenizer.from_file(stage_dir(store, "prepare_data") / "tokenizer.model")
    first = tokenizer.decode(ood["tokens"][0][ood["segment_ids"][0] == 1].tolist())
    assert first.strip()[:20] in "\n".join(stdlib_documents(max_documents=12))
    report = (evaluate / "report.md").read_text()
    assert "out-of-domain NLL" in report and "baseline out of domain (python-docs" in report
    assert (stage_dir(store, "layer_map") / "layer_map.png").stat().st_size > 0
    assert (stage_dir(store, "train_student") / "loss_curve.png").stat().st_size > 0
    # layer_map.compare_init: every strategy's 2-block student scored at init on the same validation sequences
    layer_map = json.loads((stage_dir(store, "layer_map") / "manifest.json").read_text())["metrics"]
    candidates = {name: layer_map[f"init_nll_{name}"] for name in ("uniform", "last", "adaptive", "angular")}
    assert layer_map["student_init_nll"] == candidates["uniform"]  # the profile's strategy
    assert all(layer_map["teacher_nll"] < nll for nll in candidates.values()), layer_map
    init = json.loads((stage_dir(store, "layer_map") / "init_nll.json").read_text())
    assert init["angular"]["init_nll"] == candidates["angular"] and len(init["angular"]["pairs"]) == 2
    # the student's NLL at init travels with it: both training manifests and the evaluate report
    for stage in ("train_student", "train_baseline"):
        trained = json.loads((stage_dir(store, stage) / "manifest.json").read_text())["metrics"]
        assert trained["init_nll"] == layer_map["student_init_nll"], stage
    assert json.loads((evaluate / "report.json").read_text())["student_init"]["init_nll"] == candidates["uniform"]
    assert f"At init the student scored {candidates['uniform']:.4f} nats" in report


def _only_layer_map_with(store: Path, field: str) -> dict:
    """The one layer_map.json in `store` whose `field` (ffn_units, heads, channels) is set."""
    (layer_map,) = [m for p in store.glob("layer_map/*/layer_map.json") if (m := json.loads(p.read_text()))[field]]
    return layer_map


def test_width_pruned_students_start_from_the_units_that_matter(full_run, tiny_teacher, tmp_path):
    """student.projection: importance with half the teacher's FFN: the layer_map stage measures every unit, keeps
    each copied block's 192 most important of 384 (in layer_map.json, and scored at init by compare_init for every
    strategy), and the student trains from them. Kept by importance, the student starts nearer the teacher than
    one keeping the first 192 units (truncate) on the same validation sequences: for the profile's map, and on
    average over the strategies (measured 7.26 against 7.80 nats for uniform; for 'last' 9.67 against 9.51, a
    2-block student of the last two blocks starts far from the teacher either way)."""
    reference, _, _ = full_run
    store = seed_store(tiny_teacher, tmp_path / "store")
    half = ("--set", "student.architecture.hidden_dim=192")
    init = {}
    for projection in ("importance", "truncate"):
        args = ("run", "tiny", "--store", str(store), *half, "--set", f"student.projection={projection}")
        result = gemstill(*args, "--only", "layer_map")
        assert result.returncode == 0, result.stderr[-3000:]
        (manifest,) = [
            json.loads(p.read_text())
            for p in store.glob("layer_map/*/manifest.json")
            if json.loads(p.read_text())["settings"]["student"]["projection"] == projection
        ]
        init[projection] = manifest["metrics"]
    assert init["importance"]["ffn_units_kept"] == "192/384" and "ffn_units_kept" not in init["truncate"]
    assert init["importance"]["student_init_nll"] < init["truncate"]["student_init_nll"], init

    def mean_init(projection: str) -> float:
        return sum(init[projection][f"init_nll_{name}"] for name in ("uniform", "last", "adaptive", "angular")) / 4

    assert mean_init("importance") < mean_init("truncate"), init
    layer_map = _only_layer_map_with(store, "ffn_units")
    assert sorted(layer_map["ffn_units"]) == sorted(str(t) for _, t in layer_map["pairs"])
    assert all(len(units) == 192 == len(set(units)) for units in layer_map["ffn_units"].values())
    shutil.copytree(
        stage_dir(reference, "teacher_cache"), store / "teacher_cache" / stage_dir(reference, "teacher_cache").name
    )
    # the student trained also keeps 2 of the teacher's 4 query heads (one key/value head: any 2) and 64 of its 96
    # embedding channels, by importance; 2 heads of 24 dims make 48-value rows, which Q8_0 and Q4_0 blocks of 32
    # cannot hold, so this profile quantizes to int8 and exports HF only (it is refused otherwise)
    narrow = (
        *half, "--set", "student.architecture.num_heads=2", "--set", "student.architecture.embed_dim=64",
        "--set", "student.projection=importance", "--set", "quantize.formats=[int8]", "--set", "qat.formats=[int8]",
        "--set", "export=[{format: hf}]",
    )  # fmt: skip
    for stage in ("layer_map", "train_student"):
        result = gemstill("run", "tiny", "--store", str(store), *narrow, "--set", "training.steps=4", "--only", stage)
        assert result.returncode == 0, result.stderr[-3000:]
    layer_map = _only_layer_map_with(store, "heads")
    assert sorted(layer_map["heads"]) == sorted(str(t) for _, t in layer_map["pairs"])
    assert all(len(heads) == 2 == len(set(heads)) for heads in layer_map["heads"].values())
    assert len(layer_map["channels"]) == 64 == len(set(layer_map["channels"]))
    (metrics,) = [json.loads(p.read_text())["metrics"] for p in store.glob("train_student/*/manifest.json")]
    # embedding 512 x 64, two blocks of 9,216 attention (q and o 64 x 2 x 24, k and v 64 x 24) + 36,864 FFN
    # (3 x 64 x 192) + 304 norm weights (4 x 64, q and k norms 24 each), final norm
    assert metrics["student_parameters"] == 32_768 + 2 * (9_216 + 36_864 + 304) + 64


def test_cache_stats(full_run):
    store, _, _ = full_run
    result = gemstill("cache", "stats", "tiny", "--store", str(store), "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["split"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {"train", "validation"}
    assert all(row["tokens"] > 0 and 0 < row["mean_kept_mass"] <= 1 for row in rows.values())


def test_sigkill_mid_teacher_cache_resumes_to_identical_artifacts(full_run, tiny_teacher, tmp_path):
    reference_store, _, _ = full_run
    store = seed_store(tiny_teacher, tmp_path / "store")
    process = subprocess.Popen(
        [sys.executable, "-m", "gemstill", "run", "tiny", "--store", str(store), "--only", "teacher_cache"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 600
    while not list(store.glob("teacher_cache/*/shards/train/*.parquet")):
        assert process.poll() is None, "the run ended before the teacher cache wrote a shard"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not list(store.glob("teacher_cache/*/manifest.json")), "killed before finishing: not done"
    resumed = gemstill("run", "tiny", "--store", str(store), "--only", "teacher_cache")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ours, reference = stage_dir(store, "teacher_cache"), stage_dir(reference_store, "teacher_cache")
    assert ours.name == reference.name
    assert file_digests(ours, "shards/**/*") == file_digests(reference, "shards/**/*")


def test_qat_beats_ptq_at_q4_0(full_run):
    """Every quantized row is scored from the stored deployment file; QAT at q4_0 beats round-to-nearest on held-out
    NLL and KL and wins back at least 70% of what PTQ loses against the fp32 student; q8_0 PTQ is nearly free."""
    store, _, _ = full_run
    rows = {row["model"]: row for row in json.loads(gemstill("report", "tiny", "--store", str(store), "--json").stdout)}
    student, ptq, qat = rows["student"], rows["student-q4_0-ptq"], rows["student-q4_0-qat"]
    assert ptq["val_nll"] > student["val_nll"] and ptq["kl_to_teacher"] > student["kl_to_teacher"]
    assert qat["val_nll"] < ptq["val_nll"] and qat["kl_to_teacher"] < ptq["kl_to_teacher"]
    assert qat["qat_recovery_nll"] >= 0.7 and qat["qat_recovery_kl"] >= 0.7
    assert abs(rows["student-q8_0-ptq"]["val_nll"] - student["val_nll"]) < 0.1 * (ptq["val_nll"] - student["val_nll"])
    assert student["weight_bytes"] > 3.5 * rows["student-q8_0-ptq"]["weight_bytes"]
    assert rows["student-q8_0-ptq"]["weight_bytes"] > 1.8 * ptq["weight_bytes"] == 1.8 * qat["weight_bytes"]
    assert "QAT wins back" in (stage_dir(store, "evaluate") / "report.md").read_text()


def test_qat_beats_the_same_steps_without_the_quantizer(full_run, tmp_path):
    """The fair control: the fp32 student trained for QAT's extra steps on the same loss without the fake quantizer,
    then rounded to q4_0, is worse than the QAT student; the win is quantization-awareness, not extra training."""
    from gemstill.checkpoints.native import load_native
    from gemstill.distill.evaluate import Candidate, evaluate_models
    from gemstill.distill.train import train
    from gemstill.loading import load_checkpoint
    from gemstill.pipeline.plan import make_plan
    from gemstill.pipeline.quant_stages import qat_run, variant_spec
    from gemstill.quant.weights import quantized_params

    store, _, _ = full_run
    plan = make_plan("tiny", store=str(store))
    config, params = load_native(stage_dir(store, "train_student") / "model")
    data = stage_dir(store, "prepare_data")
    train(qat_run(plan.profile, config, params, stage_dir(store, "teacher_cache"), None), data, tmp_path, None)
    _, continued = load_native(tmp_path / "model")
    teacher_config, teacher, _ = load_checkpoint(f"orbax:{stage_dir(store, 'pretrain_teacher') / 'model'}")
    _, qat, _ = load_checkpoint(variant_spec(stage_dir(store, "qat") / "q4_0", "q4_0"))
    rows = evaluate_models(
        Candidate("teacher", teacher_config, teacher),
        [
            Candidate("control", config, quantized_params(config, continued, "q4_0", include_embedding=True)),
            Candidate("qat", config, qat),
        ],
        data,
    )
    control, quantization_aware = rows[1], rows[2]
    assert quantization_aware["val_nll"] < control["val_nll"]
    assert quantization_aware["kl_to_teacher"] < control["kl_to_teacher"]


def test_exports_load_in_transformers_and_hold_the_qat_weights(full_run):
    """The export stage wrote HF (fp32), GGUF q8_0 (round to nearest) and GGUF q4_0 (from QAT) with model cards:
    transformers loads the HF directory with no arguments (log-probs within 1e-4 of gemstill's, same token ids),
    and the q4_0 GGUF dequantizes to exactly the weights QAT trained (its master weights on the q4_0 grid)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemstill.checkpoints.gguf_file import load_gguf
    from gemstill.checkpoints.native import load_native
    from gemstill.loading import load_model
    from gemstill.quant.weights import quantized_params
    from gemstill.scoring import Scorer

    store, _, _ = full_run
    export = stage_dir(store, "export")
    assert sorted(p.name for p in export.iterdir() if p.is_dir()) == ["gguf-q4_0", "gguf-q8_0", "hf-f32"]
    reference = AutoModelForCausalLM.from_pretrained(export / "hf-f32").eval()
    reference_tokenizer = AutoTokenizer.from_pretrained(export / "hf-f32")
    ours = load_model(f"orbax:{stage_dir(store, 'train_student') / 'model'}")
    tokenizer = ours.require_tokenizer()
    for text in ["12 + 30 = 42", "Use 4 6 8 2 to make 24.", "<start_of_turn>user\n7 * 6?<end_of_turn>"]:
        ids = tokenizer.encode(text)
        assert reference_tokenizer(text)["input_ids"] == ids
        with torch.no_grad():
            logprobs = torch.log_softmax(reference(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
        expected = logprobs.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
        assert np.abs(Scorer(ours.model).logprobs([ids])[0] - expected).max() < 1e-4
    config, master = load_native(stage_dir(store, "qat") / "q4_0" / "model")
    _, student = load_native(stage_dir(store, "train_student") / "model")
    for fmt, weights in (("q4_0", master), ("q8_0", student)):
        _, exported, _ = load_gguf(export / f"gguf-{fmt}" / "model.gguf")
        for name, value in quantized_params(config, weights, fmt, include_embedding=True).items():
            if name.endswith(".scale"):  # GGUF stores norms as 1 + w: the model computes with the same 1 + w
                value, exported[name] = value + np.float32(1), exported[name] + np.float32(1)
            np.testing.assert_array_equal(exported[name], value, err_msg=name)
    card = (export / "gguf-q4_0" / "README.md").read_text()
    for needle in ("quantization-aware training", "stage key: qat", "student-q4_0-qat", "trained from scratch"):
        assert needle in card


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_llama_cpp_runs_the_tiny_exports(full_run, fmt):
    """llama.cpp computes the exported student as gemstill does, beyond the 64-token window (its local/global
    pattern of 2 reaches llama.cpp through gemma3.attention.sliding_window_pattern): median |delta log p| < 0.05,
    max < 0.5 (measured 0.007 / 0.066; llama.cpp quantizes activations to 8 bits in its quantized matmuls)."""
    import numpy as np
    from llama_cpp import Llama

    from gemstill.loading import load_model
    from gemstill.scoring import Scorer

    path = stage_dir(full_run[0], "export") / f"gguf-{fmt}" / "model.gguf"
    llm = Llama(model_path=str(path), logits_all=True, n_ctx=256, n_threads=os.cpu_count() or 1, verbose=False)
    ours = load_model(f"gguf:{path}", packed=True)
    ids = ours.require_tokenizer().encode("Use 4 6 8 2 to make 24: (8 - 6) * (4 + 8) = 24. 12 + 30 = 42. " * 4)
    assert len(ids) > 2 * 64
    llm.eval(ids)
    scores = np.asarray(llm.scores[: len(ids) - 1], np.float64)
    expected = (scores - np.logaddexp.reduce(scores, axis=-1, keepdims=True))[np.arange(len(ids) - 1), ids[1:]]
    delta = np.abs(Scorer(ours.model).logprobs([ids])[0] - expected)
    assert np.median(delta) < 0.05 and delta.max() < 0.5, (np.median(delta), delta.max())


def test_reasoning_stage_teacher_solves_its_heldout_problems(full_run):
    """The tiny teacher solves a clear share of its held-out basic problems by greedy CoT, far above the best
    constant answer; every model and method is measured; each row recounts from its per-problem records; and
    `gemstill eval reasoning --json` on the teacher reproduces the stage's CoT score."""
    import collections

    store, _, _ = full_run
    stage = stage_dir(store, "evaluate_reasoning")
    rows = json.loads((stage / "report.json").read_text())["rows"]
    by = {(r["model"], r["method"], r["kind"]): r for r in rows}
    models = ["teacher", "student", "baseline", "student-q8_0-ptq", "student-q4_0-ptq", "student-q4_0-qat"]
    assert list(dict.fromkeys(r["model"] for r in rows)) == models
    for model in models:
        assert {(m, k) for (name, m, k) in by if name == model} == {
            ("cot", "basic"),
            ("cot", "game24"),
            ("sc", "basic"),
            ("sc", "game24"),
            ("tot-b1", "game24"),
            ("tot-b5", "game24"),
        }
    heldout = [json.loads(line) for line in (stage_dir(store, "prepare_data") / "heldout.jsonl").open()]
    basic = [p for p in heldout if p["kind"] == "basic"][:48]
    constant = collections.Counter(p["answer"] for p in basic).most_common(1)[0][1] / len(basic)
    teacher = by[("teacher", "cot", "basic")]
    assert teacher["total"] == len(basic)
    assert teacher["accuracy"] >= max(0.3, 3 * constant), (teacher, constant)
    for row in rows:
        records = [
            json.loads(line)
            for line in (stage / "records" / row["model"] / f"{row['method']}-{row['kind']}.jsonl").open()
        ]
        assert (len(records), sum(r["correct"] for r in records)) == (row["total"], row["correct"])
        assert row["tokens_per_problem"] == pytest.approx(sum(r["tokens"] for r in records) / len(records))
    assert by[("student", "cot", "basic")]["fraction_of_teacher"] == pytest.approx(
        by[("student", "cot", "basic")]["accuracy"] / teacher["accuracy"]
    )
    for name in ("report.md", "reasoning.png"):
        assert (stage / name).stat().st_size > 0
    assert "tot-b5" in (stage / "report.md").read_text()
    teacher_spec = f"orbax:{stage_dir(store, 'pretrain_teacher') / 'model'}"
    problems = stage_dir(store, "prepare_data") / "heldout.jsonl"
    result = gemstill(
        "eval",
        "reasoning",
        "--model",
        teacher_spec,
        "--problems",
        str(problems),
        "--method",
        "cot",
        "--limit",
        "48",
        "--max-new-tokens",
        "64",
        "--json",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    basic_records = [r for r in report["records"] if r["id"].startswith("basic-")]
    assert sum(r["correct"] for r in basic_records) == teacher["correct"]
    assert report["correct"] == sum(r["correct"] for r in report["records"])


def test_cot_distillation_trains_on_the_teachers_verified_solutions(full_run, tiny_teacher, tmp_path):
    """The from-scratch-cot pipeline reuses the tiny run's data and teacher, lets the teacher write solutions to
    the training problems, keeps only those code verifies (every kept one is, every rejected one is not or was
    cut), packs them as the student's train split beside prepare_data's unchanged validation split, and distils
    and scores students on it: CoT accuracy of both students measured against the reference-data run's."""
    from gemstill.data.generated import basic_problems, game24_problems, verify

    reference, _, _ = full_run
    store = seed_store(tiny_teacher, tmp_path / "store")
    quick = ("--set", "reasoning.methods=[cot]", "--set", "evaluate.max_sequences=32")  # CoT is what is compared
    result = gemstill("run", "tiny", "--set", "pipeline=from-scratch-cot", *quick, "--store", str(store))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("cached") == 2  # prepare_data and pretrain_teacher: the same keys
    generated = stage_dir(store, "teacher_generate")
    stats = json.loads((generated / "data_stats.json").read_text())
    split = stats["teacher_generate"]
    records = [json.loads(line) for line in (generated / "generations.jsonl").open()]
    assert len(records) == split["samples"] == 4 * split["prompts"] > 0
    problems = {p["question"]: p for p in basic_problems(1500, 0) + game24_problems(200, 0)}
    for record in records:
        assert record["verified"] == verify(problems[record["question"]], record["output"].strip())
        assert not record["kept"] or (record["verified"] and record["finished"])
    assert sum(r["kept"] for r in records) == split["teacher_examples"] > 0
    assert stats["train"]["documents"] == split["teacher_examples"] + split["reference_examples"]
    data = stage_dir(store, "prepare_data")
    for name in ("validation.parquet", "heldout.jsonl", "tokenizer.model"):
        assert (generated / name).read_bytes() == (data / name).read_bytes()

    def cot_basic(store: Path) -> dict[str, dict]:
        rows = json.loads((stage_dir(store, "evaluate_reasoning") / "report.json").read_text())["rows"]
        return {r["model"]: r for r in rows if (r["method"], r["kind"]) == ("cot", "basic")}

    ours, theirs = cot_basic(store), cot_basic(reference)
    assert ours["teacher"]["correct"] == theirs["teacher"]["correct"]  # one teacher, one greedy decode
    print(
        "CoT on held-out basic problems, trained on the reference solutions vs the teacher's: "
        + ", ".join(f"{m} {theirs[m]['accuracy']:.1%} vs {ours[m]['accuracy']:.1%}" for m in ("student", "baseline"))
    )


TWO_PROCESSES = ["-m", "gemstill", "launch", "--processes", "2", "--devices-per-process", "4", "--"]
# the student trained on 1 device and data-parallel on 2 processes x 4 devices: the same rows, only the order of the
# cross-device sums differs, and Adam carries such differences through 40 steps (measured: 2.5e-7 and 2.4e-7)
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5


def test_two_processes_run_the_tiny_pipeline_like_one(full_run, tiny_teacher, tmp_path):
    """`gemstill launch` of 2 processes x 4 CPU devices on loopback: the teacher cache, the layer map (CKA and NLL at
    init), the student's training on a data=8 mesh, and a data-parallel evaluation, each against the one-process
    run."""
    from gemstill.checkpoints.native import load_native
    from gemstill.teacher_cache.catalog import catalog_rows

    reference, _, _ = full_run
    spec = yaml.safe_load((REPO / "pipelines" / "from-scratch.yaml").read_text())
    kept = ("prepare_data", "pretrain_teacher", "teacher_cache", "layer_map", "train_student")
    spec["stages"] = {name: spec["stages"][name] for name in kept}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(spec))
    store = seed_store(tiny_teacher, tmp_path / "store")
    run = ["-m", "gemstill", "run", "tiny", "--pipeline", str(tmp_path / "pipeline.yaml"), "--store", str(store)]
    launched = subprocess.run(
        [sys.executable, *TWO_PROCESSES, sys.executable, *run, "--set", "hardware.mesh.data=8"],
        cwd=REPO, capture_output=True, text=True, timeout=1200, env={**os.environ, "PREFECT_LOGGING_LEVEL": "INFO"},
    )  # fmt: skip
    assert launched.returncode == 0, (launched.stdout + launched.stderr)[-4000:]
    assert "[1] process 1 of 2 (GEMSTILL_* environment): 4 local of 8 cpu devices" in launched.stdout
    for process in (0, 1):  # the seeded stages are found committed, not run again (nor said to be)
        assert f"[{process}] stage pretrain_teacher: cached" in launched.stdout
        assert f"[{process}] 5 stages done, 3 of them computed now" in launched.stdout

    ours, theirs = stage_dir(store, "teacher_cache"), stage_dir(reference, "teacher_cache")
    assert ours.name == theirs.name  # the same key: the same settings, code and inputs
    logs = "".join(Path(p).read_text() for p in re.findall(r"; log (\S+)", launched.stdout))  # each process's log
    assert "process 1 computes" in logs  # each process wrote its own shards
    assert file_digests(ours, "shards/**/*") == file_digests(theirs, "shards/**/*")
    assert not list(ours.glob("catalog.process-*"))  # the part catalogs were merged
    strip = ("created_at",)
    ours_rows = [{k: v for k, v in r.items() if k not in strip} for r in catalog_rows(ours / "catalog.duckdb")]
    assert ours_rows == [
        {k: v for k, v in r.items() if k not in strip} for r in catalog_rows(theirs / "catalog.duckdb")
    ]

    # the layer map's CKA and every candidate's NLL at init, split over both processes: the one-process bytes
    ours, theirs = stage_dir(store, "layer_map"), stage_dir(reference, "layer_map")
    assert ours.name == theirs.name
    for name in ("layer_map.json", "init_nll.json"):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name

    one, two = stage_dir(reference, "train_student"), stage_dir(store, "train_student")
    history = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    assert [h["step"] for h in history[1]] == [h["step"] for h in history[0]]
    for a, b in zip(*history, strict=True):
        for name in ("loss", "distill", "cross_entropy", "val_loss"):
            if name in a:
                assert b[name] == pytest.approx(a[name], rel=LOSS_RTOL), (name, a["step"])
    want, got = load_native(one / "model")[1], load_native(two / "model")[1]
    for name in want:
        assert abs(got[name] - want[name]).max() <= PARAM_ATOL, name

    # the evaluation of the one-process run's models, again on 2 processes: data-parallel, the same rows
    copy = tmp_path / "reference"
    shutil.copytree(reference, copy)
    rows = json.loads((stage_dir(copy, "evaluate") / "report.json").read_text())["rows"]
    again = ["-m", "gemstill", "run", "tiny", "--store", str(copy), "--only", "evaluate", "--refresh", "evaluate"]
    relaunched = subprocess.run(
        [sys.executable, *TWO_PROCESSES, sys.executable, *again], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert relaunched.returncode == 0, (relaunched.stdout + relaunched.stderr)[-4000:]
    assert json.loads((stage_dir(copy, "evaluate") / "report.json").read_text())["rows"] == rows
