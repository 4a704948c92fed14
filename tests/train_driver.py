"""A small distillation run over test data, importable by tests and runnable as a script (SIGKILL / 8-device tests).

python tests/train_driver.py DATA_DIR CACHE_DIR OUT_DIR [--mesh D,F,T] [--set key=json]...
python tests/train_driver.py DATA_DIR - OUT_DIR --pretrain [--set key=json]...   (the teacher, from scratch)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

if __name__ == "__main__" and "--devices" in sys.argv:  # must precede the jax import
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={sys.argv[sys.argv.index('--devices') + 1]}"

import jax
from conftest import TINY

from gemstill import distributed
from gemstill.distill.checkpointing import TrainCheckpointer
from gemstill.distill.config import DistillConfig, PretrainConfig, TrainingConfig
from gemstill.distill.placement import Placement
from gemstill.distill.run import Run, Teacher, initial_params
from gemstill.distill.student_init import init_student_from_teacher
from gemstill.distill.train import host_copy, train
from gemstill.model import build_model
from gemstill.params import to_flat
from gemstill.pretrain import pretrain

TEACHER = TINY.replace(num_layers=2)
STUDENT = TINY.replace(num_layers=1)


def build_run(cache_dir: Path | None, objective: dict[str, Any] | None = None, **training: Any) -> Run:
    """The teacher of the cache tests (seed 0), a one-layer student copied from its last block."""
    teacher = build_model(TEACHER, seed=0)
    teacher_flat = to_flat(teacher)
    init = init_student_from_teacher(STUDENT, TEACHER, teacher_flat, [(0, 1)], seed=0)
    settings = {"steps": 6, "batch_size": 4, "checkpoint_every": 2, "eval_every": 3, "eval_batches": 2, **training}
    settings.setdefault("optimizer", {"learning_rate": 3e-3, "warmup_steps": 1})
    objective = DistillConfig(**(objective or {"alpha": 0.5}))
    return Run(
        student=STUDENT,
        init_params=init.params,
        pairs=((0, 1),),
        objective=objective,
        training=TrainingConfig(**settings),
        teacher=Teacher(TEACHER, teacher_flat if objective.online_teacher else None, cache_dir, 1.0),
    )


def pretrain_settings(**training: Any) -> PretrainConfig:
    """A short pretraining of the driver's teacher architecture from its random init."""
    settings = {"steps": 6, "batch_size": 4, "checkpoint_every": 2, "eval_every": 2, "eval_batches": 2, **training}
    return PretrainConfig(**settings)


def restore_latest(run: Run, out_dir: Path, mesh, target: Path) -> None:
    """Restore the latest checkpoint of `out_dir` onto this run's mesh and processes; process 0 saves the
    parameters as .npz (a checkpoint written by one process count, read back by another)."""
    import numpy as np

    from gemstill.distill.optim import make_optimizer

    place = Placement(mesh, run.training)
    params, shardings = place.params(initial_params(run))
    opt_state, _ = place.optimizer_state(make_optimizer(run.training.optimizer, run.training.steps), params, shardings)
    with TrainCheckpointer(out_dir / "checkpoints", keep=run.training.keep_checkpoints) as checkpointer:
        restored = checkpointer.restore_latest({"params": params, "opt_state": opt_state, "history": []})
    values = host_copy(restored["params"])
    if distributed.is_leader():
        np.savez(target, **values)
    print(
        f"restored step {checkpointer.latest_step()} on {jax.process_count()} process(es), {jax.device_count()} devices"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("cache_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--mesh", default=None)
    parser.add_argument("--devices", default=None)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--pretrain", action="store_true")
    parser.add_argument("--restore-to", type=Path, default=None, help="restore OUT_DIR's latest checkpoint; save .npz")
    args = parser.parse_args()
    distributed.start()  # under gemstill launch: join the other processes before JAX picks devices
    training = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    if args.pretrain:
        metrics = pretrain(TEACHER, pretrain_settings(**training), args.data_dir, args.out_dir, log=print)
        print("METRICS " + json.dumps(metrics, default=float))
        return
    mesh = None
    if args.mesh:
        from gemstill.distill.sharding import make_mesh

        mesh = make_mesh(*(int(x) for x in args.mesh.split(",")))
    if args.restore_to is not None:
        restore_latest(build_run(args.cache_dir, **training), args.out_dir, mesh, args.restore_to)
        return
    metrics = train(build_run(args.cache_dir, **training), args.data_dir, args.out_dir, None, log=print, mesh=mesh)
    print("METRICS " + json.dumps(metrics, default=float))


if __name__ == "__main__":
    main()
