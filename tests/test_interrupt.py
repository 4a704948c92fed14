"""Ctrl-C and SIGTERM stop `gemstill run` within seconds, sent to its process group as a terminal does: at Prefect
start-up, inside a jitted training step and while a stage commits. Each exits 130 (143) with one line saying what
is committed, commits nothing it was interrupted in, leaves no Prefect server or lease behind, and a rerun
resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import MACHINERY_PROFILE, seed_store

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).parent
CHAIN = """
name: chain
stages:
  source: {task: "pipeline_stages:source", reads: [data.seed]}
  double: {task: "pipeline_stages:double", needs: [source]}
"""


def _start(args: list[str], env: dict[str, str], driver: bool = False) -> subprocess.Popen:
    command = [sys.executable, str(TESTS / "interrupt_driver.py")] if driver else [sys.executable, "-m", "gemstill"]
    return subprocess.Popen(
        [*command, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group: the signal goes to the group, as a terminal's Ctrl-C does
    )  # fmt: skip


def _wait_for_line(process: subprocess.Popen, needle: str, timeout: float = 300) -> list[str]:
    """stdout lines up to the first containing `needle` (the process must still be running then)."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"no line with {needle!r} in {seen[-20:]}; stderr: {process.stderr.read()[-2000:]}")


def _interrupt(process: subprocess.Popen, signum: int = signal.SIGINT) -> tuple[int, float, str]:
    """Signal the process group; (exit code, seconds it took to exit, stderr)."""
    family = [process.pid, *(c.pid for c in psutil.Process(process.pid).children(recursive=True))]
    began = time.monotonic()
    os.killpg(process.pid, signum)
    _, stderr = process.communicate(timeout=60)
    seconds = time.monotonic() - began
    time.sleep(0.5)
    left = [pid for pid in family if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left behind: {[psutil.Process(p).cmdline() for p in left]}"
    return process.returncode, seconds, stderr


@pytest.fixture
def machinery(tmp_path):
    (tmp_path / "pipe.yaml").write_text(CHAIN)
    (tmp_path / "profile.yaml").write_text(
        MACHINERY_PROFILE.format(pipeline=tmp_path / "pipe.yaml", store=tmp_path / "s")
    )
    env = {**os.environ, "GEMSTILL_TEST_LOG": str(tmp_path / "ran.log"), "PYTHONPATH": str(TESTS)}
    return tmp_path / "profile.yaml", tmp_path / "s", env


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_ctrl_c_at_prefect_start_up_and_while_committing(machinery):
    profile, store, env = machinery
    # at start-up: the temporary Prefect server is starting; it is stopped, nothing ran
    process = _start(["run", str(profile)], env)
    _wait_for_line(process, "gemstill run machinery")
    code, seconds, stderr = _interrupt(process)
    assert code == 130 and seconds < 10, (code, seconds, stderr[-2000:])
    assert _one_error_line(stderr).startswith("error: interrupted (SIGINT); 0 of 2 stages committed")
    assert not list(store.glob("*/*/manifest.json"))
    # while `double` commits: its files are checksummed, its manifest not written; SIGTERM this time
    process = _start(["run", str(profile)], {**env, "GEMSTILL_TEST_SLOW_COMMIT": "double"}, driver=True)
    lines = _wait_for_line(process, "COMMITTING")
    assert "stage source: ran in" in "".join(lines) and "/double/" in lines[-1], lines
    code, seconds, stderr = _interrupt(process, signal.SIGTERM)
    assert code == 143 and seconds < 10, (code, seconds, stderr[-2000:])
    assert _one_error_line(stderr) == (
        "error: interrupted (SIGTERM); 1 of 2 stages committed (source); the partial work of double is kept; rerun "
        "to resume from what is committed"
    )
    assert [p.parent.parent.name for p in store.glob("*/*/manifest.json")] == ["source"]
    assert not list(store.glob("*/*.lease"))  # let go at once, not left to expire
    rerun = subprocess.run([sys.executable, "-m", "gemstill", "run", str(profile)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "stage source: cached" in rerun.stdout and "stage double: ran in" in rerun.stdout


def test_ctrl_c_inside_a_jitted_training_step_keeps_the_checkpoint_and_resumes(tiny_teacher, tmp_path):
    """The teacher's pretraining (JAX steps in a Prefect worker thread) stopped after its first checkpoint: exit
    130 within seconds, nothing committed, and the rerun resumes from that checkpoint."""
    store = seed_store(tiny_teacher, tmp_path / "store")
    shorter = ["--set", "teacher.scratch.training.steps=30", "--set", "teacher.scratch.training.checkpoint_every=10"]
    args = ["run", "tiny", "--only", "pretrain_teacher", "--store", str(store), *shorter]
    process = _start(args, os.environ.copy())
    _wait_for_line(process, "gemstill run tiny")
    deadline = time.monotonic() + 600
    seeded = {p.parent for p in store.glob("pretrain_teacher/*/manifest.json")}  # the fixture's committed teacher
    while not [
        p for p in store.glob("pretrain_teacher/*/checkpoints/*") if p.name.isdigit() and p.parent.parent not in seeded
    ]:
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-3000:]
        time.sleep(0.1)
    time.sleep(1.0)  # inside the next steps
    code, seconds, stderr = _interrupt(process)
    assert code == 130 and seconds < 10, (code, seconds, stderr[-2000:])
    assert "the partial work of pretrain_teacher is kept" in _one_error_line(stderr)
    assert len(list(store.glob("pretrain_teacher/*/manifest.json"))) == 1  # the fixture's 700-step teacher only
    rerun = subprocess.run([sys.executable, "-m", "gemstill", *args], cwd=REPO, capture_output=True, text=True,
                           timeout=900)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    log = Path(rerun.stdout.split("; log ")[1].split()[0]).read_text()
    assert "resuming from step" in log
    assert len(list(store.glob("pretrain_teacher/*/manifest.json"))) == 2


def test_the_error_line_starts_a_line_of_its_own_after_an_open_progress_bar(capsys):
    """A bar redraws its line with a carriage return and never ends it: the message must not be glued to it."""
    from tqdm import tqdm

    from gemstill.interrupt import print_error

    with tqdm(total=3, desc="train") as bar:
        bar.update(1)
        print_error("interrupted (SIGINT)")
    assert "error: interrupted (SIGINT)" in capsys.readouterr().err.splitlines()
