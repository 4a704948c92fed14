"""Hardening: the multi-process run listens on loopback only and sends no Python objects between processes; the
store serves only what matches its manifests and never moves what a reader looks at; bad input of every kind met
in the wild is one line and exit 1."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import TINY

from gemstill.errors import GemstillError

REPO = Path(__file__).resolve().parents[1]


def gemstill(*args: str, cwd: Path = REPO, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gemstill", *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env
    )


def one_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout[-1000:], result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- what crosses between processes


def test_nothing_in_gemstill_unpickles_or_imports_pickle():
    for path in (REPO / "gemstill").rglob("*.py"):
        assert "pickle" not in path.read_text(), path


def test_the_wire_encoding_round_trips_values_and_refuses_anything_else():
    from gemstill import wire

    value = {
        3: (np.arange(6, dtype=np.float32).reshape(2, 3), np.float32(1.5), [1, "a", None, True]),
        "x": {"nested": np.array([[1, 2]], np.int64), "nan": math.nan, "inf": -math.inf},
        "bf16": np.ones(4, dtype="bfloat16"),
    }
    back = wire.loads(wire.dumps(value))
    assert back[3][0].dtype == np.float32 and (back[3][0] == value[3][0]).all() and back[3][1] == np.float32(1.5)
    assert isinstance(back[3], tuple) and back[3][2] == [1, "a", None, True]
    assert (back["x"]["nested"] == value["x"]["nested"]).all() and math.isnan(back["x"]["nan"])
    assert back["x"]["inf"] == -math.inf and str(back["bf16"].dtype) == "bfloat16"
    with pytest.raises(wire.WireError, match="Path cannot cross between processes"):
        wire.dumps({"p": Path("/")})
    forged = json.dumps({"gemstill.wire": 1, "value": {"array": {"dtype": "object", "shape": [1], "data": ""}}})
    for bad in (b"\x80\x04\x95junk", forged.encode(), b'{"gemstill.wire": 1, "value": {"eval": "x"}}'):
        with pytest.raises(wire.WireError):
            wire.loads(bad)


JOIN = """
import time
from gemstill import distributed
group = distributed.start(lambda line: print(line, flush=True))
print("JOINED", distributed.gather("probe", {"i": distributed.process_index()}), flush=True)
time.sleep(30)
"""


def test_a_launched_run_listens_on_loopback_only(tmp_path):
    """The coordination service (an unauthenticated key-value store) binds 127.0.0.1, not every interface; every
    listening socket of every process of the launch is on loopback."""
    script = tmp_path / "join.py"
    script.write_text(JOIN)
    launch = subprocess.Popen(
        [sys.executable, "-m", "gemstill", "launch", "--processes", "2", "--devices-per-process", "1", "--",
         sys.executable, str(script)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        joined, deadline = 0, time.monotonic() + 180
        while joined < 2 and time.monotonic() < deadline:
            line = launch.stdout.readline()
            assert line, "the launch ended before both processes joined"
            joined += "JOINED" in line and "{'i': 0}" in line and "{'i': 1}" in line
        assert joined == 2
        family = [psutil.Process(launch.pid), *psutil.Process(launch.pid).children(recursive=True)]
        listening = [
            (proc.pid, conn.laddr.ip)
            for proc in family
            for conn in proc.net_connections(kind="inet")
            if conn.status == psutil.CONN_LISTEN
        ]
        loopback = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
        assert listening and all(ip in loopback for _, ip in listening), listening
    finally:
        os.killpg(launch.pid, 15)
        launch.wait(timeout=60)


# --- the store serves only what its manifests say


def _fake_commit(store_root: Path, stage: str, key: str, files: dict[str, bytes]) -> Path:
    from gemstill.pipeline.store import ArtifactStore

    store = ArtifactStore(str(store_root))
    workdir = store.prepare(stage, key, refresh=False)
    for name, data in files.items():
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_bytes(data)
    store.commit(stage, key, {"stage": stage, "key": key, "settings": {}, "inputs": {}, "metrics": {}})
    return workdir


def _status(store: Path) -> dict[str, dict]:
    result = gemstill("status", "tiny", "--store", str(store), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    return {row["stage"]: row for row in json.loads(result.stdout)["stages"]}


def test_edited_and_flipped_results_are_corrupt_never_served(tmp_path):
    """An edited report.json, a byte-flipped teacher-cache shard of the same size and a flipped checkpoint byte:
    `status` says corrupt (naming the file and the command that recomputes it), `report` and `cache stats`
    refuse in one line, a stage needing the result refuses it; the files stay as they are."""
    from gemstill.pipeline.plan import make_plan

    store = tmp_path / "store"
    plan = make_plan("tiny", store=str(store))
    keys = {name: plan.stages[name].key for name in plan.stages}
    rows = [{"model": "teacher", "layers": 2, "parameters": 1, "val_nll": 1.0, "val_ppl": math.e, "kl_to_teacher": 0}]
    evaluate = _fake_commit(store, "evaluate", keys["evaluate"], {"report.json": json.dumps({"rows": rows}).encode()})
    shard = bytes(range(256)) * 8
    cache = _fake_commit(store, "teacher_cache", keys["teacher_cache"], {"shards/train/0.parquet": shard})
    checkpoint_file = "model/params/ocdbt.process_0/d/0"  # where an Orbax checkpoint keeps its arrays
    student = _fake_commit(store, "train_student", keys["train_student"], {checkpoint_file: shard})
    assert gemstill("report", "tiny", "--store", str(store), "--json").returncode == 0
    assert _status(store)["evaluate"]["state"] == "done"

    (evaluate / "report.json").write_text(json.dumps({"rows": [{**rows[0], "val_nll": 0.5}]}))
    flipped = bytearray(shard)
    flipped[100] ^= 0xFF
    (cache / "shards/train/0.parquet").write_bytes(bytes(flipped))
    (student / checkpoint_file).write_bytes(bytes(flipped))
    status = _status(store)
    corrupted = (
        ("evaluate", "report.json"),
        ("teacher_cache", "shards/train/0.parquet"),
        ("train_student", checkpoint_file),
    )
    for stage, file in corrupted:
        assert status[stage]["state"] == "corrupt", status[stage]
        assert f"{stage}/{keys[stage]}/{file} has other bytes" in status[stage]["problem"]
        assert f"recompute it: gemstill run tiny --refresh {stage}" in status[stage]["problem"]
    one_line(gemstill("report", "tiny", "--store", str(store)), "report.json has other bytes", "--refresh evaluate")
    one_line(gemstill("cache", "stats", "tiny", "--store", str(store)), "0.parquet has other bytes")
    assert (cache / "shards/train/0.parquet").read_bytes() == bytes(flipped)  # reported, not touched

    from gemstill.pipeline.store import CorruptResult

    with pytest.raises(CorruptResult, match="stage teacher_cache is corrupt; recompute it"):
        plan.store.fetch("teacher_cache", keys["teacher_cache"])
    with pytest.raises(CorruptResult, match=r"model/params/ocdbt\.process_0/d/0 has other bytes"):
        plan.store.fetch("train_student", keys["train_student"])  # what qat, evaluate and export read it through


def test_status_never_moves_a_stray_refresh_into_place(tmp_path):
    """A `<key>.refresh/` left with a manifest but missing files: `status` and `report` leave the committed result
    byte for byte; the next run of that stage refuses to swap it in, naming it."""
    from gemstill.pipeline.plan import make_plan

    store = tmp_path / "store"
    key = make_plan("tiny", store=str(store)).stages["evaluate"].key
    rows = [{"model": "teacher", "layers": 2, "parameters": 1, "val_nll": 1.0, "val_ppl": math.e, "kl_to_teacher": 0}]
    committed = _fake_commit(store, "evaluate", key, {"report.json": json.dumps({"rows": rows}).encode()})
    stray = committed.with_name(f"{key}.refresh")
    stray.mkdir()
    manifest = json.loads((committed / "manifest.json").read_text())
    (stray / "manifest.json").write_text(
        json.dumps({**manifest, "files": [{"path": "gone.json", "bytes": 3, "sha256": "0"}]})
    )
    before = {p.name: p.read_bytes() for p in committed.iterdir()}
    assert _status(store)["evaluate"]["state"] == "done"
    assert gemstill("report", "tiny", "--store", str(store), "--json").returncode == 0
    assert {p.name: p.read_bytes() for p in committed.iterdir()} == before and stray.is_dir()
    with pytest.raises(GemstillError, match=r"refresh of evaluate/\w+ that was cut short does not match"):
        make_plan("tiny", store=str(store)).store.finish_refresh("evaluate", key)  # what the stage's next run does
    assert {p.name: p.read_bytes() for p in committed.iterdir()} == before


def test_weights_holding_nan_are_refused_naming_the_tensor(tmp_path):
    from gemstill.checkpoints.native import save_native
    from gemstill.model import build_model
    from gemstill.params import to_flat

    flat = {k: np.asarray(v) for k, v in to_flat(build_model(TINY)).items()}
    flat["layers.3.mlp.down"] = flat["layers.3.mlp.down"].copy()
    flat["layers.3.mlp.down"][0, 0] = np.nan
    directory = save_native(tmp_path / "model", TINY, flat, None)
    one_line(gemstill("score", "--model", f"orbax:{directory}", "--text", "x"), "tensor layers.3.mlp.down holds NaN")


# --- bad input: one line, exit 1


def test_bad_input_of_every_kind_is_one_line(tmp_path):
    from gemstill.pipeline.lease import acquire, lease_ttl
    from gemstill.pipeline.profile import load_profile
    from gemstill.reasoning.problems import load_problems
    from gemstill.teacher_cache.catalog import connect_catalog

    shipped = (REPO / "profiles" / "tiny.yaml").read_text()
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(shipped.replace("description: >", "description: caf\xe9 >").encode("latin-1"))
    one_line(gemstill("status", str(latin1)), "not UTF-8 text", "save it as UTF-8")
    twice = tmp_path / "twice.yaml"
    twice.write_text(shipped + "\nstore: runs/elsewhere\n")
    with pytest.raises(GemstillError, match=r"duplicate key 'store' \(first at line \d+\)"):
        load_profile(str(twice))
    one_line(gemstill("status", "tiny", "--store", str(REPO / "README.md")), "a file, not a directory")
    one_line(gemstill("info", "--model", "gemma3-27b", "--context", "-5"), "--context", "see")
    hf = tmp_path / "hf"
    hf.mkdir()
    config = {"model_type": "gemma3_text", "hidden_size": "640", "num_hidden_layers": 2, "intermediate_size": 8,
              "num_attention_heads": 1, "num_key_value_heads": 1}  # fmt: skip
    (hf / "config.json").write_text(json.dumps(config))
    one_line(gemstill("info", "--model", f"hf:{hf}"), "hidden_size = '640', not an integer")
    data = {"data.source": "files", "data.files": {"paths": [str(tmp_path / "none-*.jsonl")], "format": "json"}}
    with pytest.raises(GemstillError, match="no file matches"):
        from gemstill.pipeline.plan import make_plan

        make_plan("tiny", overrides=data)
    puzzles = tmp_path / "24.jsonl"
    puzzles.write_text('{"numbers": [4, 6, 8, 2]}\n{"numbers": [1, 1, 1, 1]}\n')
    with pytest.raises(GemstillError, match=r"line 2: \[1, 1, 1, 1\] cannot make 24"):
        load_problems(puzzles)
    started = time.monotonic()
    result = gemstill("run", "tiny", "--only", "nosuchstage", "--store", str(tmp_path / "s"))
    assert time.monotonic() - started < 30
    one_line(result, "no stage named 'nosuchstage'")

    zeroed = tmp_path / "catalog.duckdb"
    zeroed.write_bytes(bytes(4096))
    with pytest.raises(GemstillError, match="not a readable DuckDB catalog"):
        connect_catalog(zeroed)
    import fsspec

    fs = fsspec.filesystem("file")
    lease = tmp_path / "x.lease"
    lease.write_text("{}")
    with acquire(fs, str(lease), "stage x", log=lambda line: None):  # an unreadable lease is stale: taken over
        assert json.loads(lease.read_text())["owner"].startswith(os.uname().nodename)
    os.environ["GEMSTILL_LEASE_SECONDS"] = "abc"
    try:
        with pytest.raises(GemstillError, match="GEMSTILL_LEASE_SECONDS='abc' is not a positive number"):
            lease_ttl()
    finally:
        del os.environ["GEMSTILL_LEASE_SECONDS"]


HOLD = """
import sys, time, duckdb
connection = duckdb.connect(sys.argv[1])
connection.execute("CREATE TABLE IF NOT EXISTS shards (x INTEGER)")
print("HOLDING", flush=True)
time.sleep(60)
"""


def test_a_catalog_locked_past_the_wait_is_one_line(tmp_path):
    from gemstill.teacher_cache.catalog import connect_catalog

    path = tmp_path / "catalog.duckdb"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "HOLDING"
        with pytest.raises(GemstillError, match=r"locked by another process for over 1 s .*wait for that run"):
            connect_catalog(path, wait_s=1.0)
    finally:
        holder.kill()
        holder.wait()


def test_what_the_store_and_exports_write_is_readable_to_others(tmp_path):
    """Manifests and atomic files get 0666 less the umask, directories 0777 less it (0644 / 0755 by default)."""
    from gemstill.fsutil import atomic_dir, atomic_write_bytes, umask

    assert umask() == (lambda m: (os.umask(m), m)[1])(os.umask(0o022))
    path = atomic_write_bytes(tmp_path / "manifest.json", b"{}")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask()
    with atomic_dir(tmp_path / "export") as scratch:
        (scratch / "a").write_text("x")
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o777 & ~umask()
