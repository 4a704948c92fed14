"""Multi-process JAX on loopback: 2 processes x 4 CPU devices started by `gemstill launch`, checked against one
process. Training (the same losses and parameters as one process, a killed process relaunched to the same end,
checkpoints read back on 1 and 4 processes) runs the test train driver; the pipeline test runs the tiny
profile's teacher cache and student training (teacher-cache shards byte-identical to one process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from test_train import DRIVER, _params, _steps_saved, dirs  # noqa: F401  (dirs: the data and cache fixture)

from gemstill.distributed import ProcessGroup, first_host, from_environment
from gemstill.errors import GemstillError
from gemstill.launch import process_environment

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["--set", "steps=10", "--set", "checkpoint_every=2", "--set", "batch_size=8", "--set", "eval_batches=1"]
# the same 8-way data-parallel step on 1 process and on 2: only the order of the cross-device sums differs
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5


def _env() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


def launch(processes: int, devices: int, *command: str) -> subprocess.Popen:
    """`gemstill launch` of `command` (the train driver's arguments), output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "gemstill", "launch", "--processes", str(processes), "--devices-per-process",
         str(devices), "--", sys.executable, str(DRIVER), *command],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=REPO, start_new_session=True,
    )  # fmt: skip


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    output = process.communicate(timeout=timeout)[0]
    if os.environ.get("GEMSTILL_TEST_DUMP"):
        Path(os.environ["GEMSTILL_TEST_DUMP"]).write_text(output)
    assert process.returncode == 0, output[-4000:]
    return output


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---- the process group, read from the environment ----


def test_process_group_from_each_launcher_environment():
    assert from_environment({}) is None
    assert from_environment({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None  # one task: one process
    explicit = {"GEMSTILL_COORDINATOR_ADDRESS": "10.0.0.2:8476", "GEMSTILL_NUM_PROCESSES": "4"}
    assert from_environment({**explicit, "GEMSTILL_PROCESS_ID": "3"}) == ProcessGroup(
        "10.0.0.2:8476", 4, 3, None, "GEMSTILL_* environment"
    )
    jobset = from_environment({**explicit, "JOB_COMPLETION_INDEX": "2", "GEMSTILL_LOCAL_DEVICE_IDS": "4,5"})
    assert (jobset.index, jobset.local_device_ids) == (2, (4, 5))
    slurm = from_environment({"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_STEP_NODELIST": "gpu[07-08],x"})
    assert (slurm.coordinator, slurm.count, slurm.index) == ("gpu07:8476", 8, 5)
    assert first_host("node-a") == "node-a" and first_host("n[3,5-6]") == "n3"
    tpu = from_environment({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3", "TPU_WORKER_ID": "1"})
    assert (tpu.coordinator, tpu.count, tpu.index) == ("t0:8476", 4, 1)
    for bad, named in (
        ({"GEMSTILL_NUM_PROCESSES": "2", "GEMSTILL_PROCESS_ID": "0"}, "GEMSTILL_COORDINATOR_ADDRESS"),
        ({**explicit}, "JOB_COMPLETION_INDEX"),
        ({**explicit, "GEMSTILL_PROCESS_ID": "4"}, "out of range"),
        ({**explicit, "GEMSTILL_PROCESS_ID": "x"}, "GEMSTILL_PROCESS_ID"),
        ({**explicit, "GEMSTILL_PROCESS_ID": "0", "GEMSTILL_LOCAL_DEVICE_IDS": "a"}, "GEMSTILL_LOCAL_DEVICE_IDS"),
    ):
        with pytest.raises(GemstillError, match=named):
            from_environment(bad)


def test_launch_gives_each_process_its_coordinates_and_devices():
    env = process_environment({"XLA_FLAGS": "--xla_foo --xla_force_host_platform_device_count=8"}, 1, 2, 1234, 4)
    assert from_environment(env) == ProcessGroup("127.0.0.1:1234", 2, 1, (4, 5, 6, 7), "GEMSTILL_* environment")
    assert env["XLA_FLAGS"] == "--xla_foo --xla_force_host_platform_device_count=4"
    assert env["PREFECT_HOME"].endswith("process-1")  # its own embedded Prefect database
    assert "PREFECT_HOME" not in process_environment({}, 0, 2, 1234, None)


# ---- training on 2 processes x 4 devices ----


@pytest.fixture(scope="module")
def two_process_training(dirs, tmp_path_factory):  # noqa: F811
    """The same run on 1 process x 8 devices and on 2 processes x 4 devices (mesh data=8 both times)."""
    data, cache = dirs
    root = tmp_path_factory.mktemp("multihost")
    one = subprocess.Popen(
        [sys.executable, str(DRIVER), str(data), str(cache), str(root / "one"), "--devices", "8", "--mesh", "8,1,1",
         *SETTINGS],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
    )  # fmt: skip
    finish(one)
    output = finish(launch(2, 4, str(data), str(cache), str(root / "two"), "--mesh", "8,1,1", *SETTINGS))
    return data, cache, root, output


def test_two_processes_train_like_one(two_process_training):
    _, _, root, output = two_process_training
    assert "[0] process 0 of 2" in output and "[1] process 1 of 2" in output and "4 local of 8 cpu devices" in output
    one, two = history(root / "one"), history(root / "two")
    assert [h["step"] for h in two] == list(range(1, 11))
    for a, b in zip(one, two, strict=True):
        for name in ("loss", "distill", "cross_entropy", "val_loss"):
            if name in a:
                np.testing.assert_allclose(b[name], a[name], rtol=LOSS_RTOL, err_msg=f"{name} at step {a['step']}")
    want, got = _params(root / "one"), _params(root / "two")
    assert sorted(want) == sorted(got)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=PARAM_ATOL, err_msg=name)


def test_a_killed_process_relaunched_resumes_to_the_same_parameters(two_process_training):
    data, cache, root, _ = two_process_training
    out = root / "killed"
    command = (str(data), str(cache), str(out), "--mesh", "8,1,1", *SETTINGS)
    first = launch(2, 4, *command)
    deadline = time.time() + 600
    while max(_steps_saved(out), default=0) < 4 and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    victim = next(
        p for p in psutil.Process(first.pid).children(recursive=True) if p.environ().get("GEMSTILL_PROCESS_ID") == "1"
    )
    victim.send_signal(signal.SIGKILL)
    output = first.communicate(timeout=120)[0]
    assert first.returncode != 0 and "process 1 exited with -9; stopping the others" in output, output[-3000:]
    saved = _steps_saved(out)
    assert saved and max(saved) < 10, f"the kill came too late to test resuming: {saved}"
    assert not (out / "model").exists()

    resumed = finish(launch(2, 4, *command))
    assert "resuming from step" in resumed
    want, got = _params(root / "two"), _params(out)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert [h["step"] for h in history(out)] == list(range(1, 11))


def _restore(data: Path, cache: Path, out: Path, target: Path, processes: int) -> np.lib.npyio.NpzFile:
    """Process count 1: one device; more: 2 devices each, on a (data=processes, fsdp=2) mesh."""
    args = [str(data), str(cache), str(out), *SETTINGS, "--restore-to", str(target)]
    if processes == 1:
        process = subprocess.Popen(
            [sys.executable, str(DRIVER), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(),
        )
    else:
        process = launch(processes, 2, *args, "--mesh", f"{processes},2,1")
    assert f"restored step 10 on {processes} process(es)" in finish(process)
    return dict(np.load(target))


def test_a_checkpoint_written_by_two_processes_restores_on_one_and_on_four(two_process_training):
    """The 2-process run's latest checkpoint read back by 1 process, by 2 and by 4: identical parameters."""
    data, cache, root, _ = two_process_training
    restored = {n: _restore(data, cache, root / "two", root / f"restored-{n}.npz", n) for n in (2, 1, 4)}
    assert sorted(restored[2]) == sorted(_params(root / "two"))
    for count in (1, 4):
        for name, value in restored[2].items():
            np.testing.assert_array_equal(restored[count][name], value, err_msg=f"{name} on {count} process(es)")


def test_a_multi_process_run_refuses_a_store_its_processes_cannot_share(tmp_path):
    """A remote (fsspec) store is staged per process, where Orbax could not write one checkpoint from all."""
    command = [
        sys.executable,
        "-m",
        "gemstill",
        "run",
        "tiny",
        "--store",
        "memory://gemstill-test",
        "--only",
        "prepare_data",
    ]
    launched = subprocess.run(
        [sys.executable, "-m", "gemstill", "launch", "--processes", "2", "--", *command],
        capture_output=True, text=True, env={**_env(), "GEMSTILL_CACHE": str(tmp_path)}, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert launched.returncode != 0
    assert "needs a store every process sees as a directory" in launched.stdout, launched.stdout[-3000:]
