"""The processes of one multi-host run: who they are (read from the environment that started them), JAX's
multi-controller runtime started once, and the host-level agreements stages need (a barrier, process 0's value
for everyone).

Where the process group comes from, first match wins:
  GEMSTILL_COORDINATOR_ADDRESS, GEMSTILL_NUM_PROCESSES, GEMSTILL_PROCESS_ID
      set by `gemstill launch` and the deploy/ templates; in a Kubernetes Indexed Job or JobSet the pod's
      JOB_COMPLETION_INDEX stands for GEMSTILL_PROCESS_ID. GEMSTILL_LOCAL_DEVICE_IDS (comma list) optionally
      gives each process of a multi-GPU node its own accelerators.
  SLURM_NTASKS > 1 with SLURM_PROCID and SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST): srun; the first node
      coordinates on GEMSTILL_COORDINATOR_PORT (default 8476).
  TPU_WORKER_HOSTNAMES (more than one host) with TPU_WORKER_ID: a multi-host Cloud TPU VM slice.
With none of these set the run is one process: nothing is started and every helper here is a no-op.

Why not a home-made scheduler: the processes are placed by whatever started them (Kubernetes, SLURM, Prefect
workers, `gemstill launch`); this module only joins them through jax.distributed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from gemstill import wire
from gemstill.errors import GemstillError

DEFAULT_PORT = 8476
WAIT_MS = 7 * 24 * 3600 * 1000  # a barrier waits for the slowest process's stage (a dead one fails it sooner)


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """One process's place in a multi-process run."""

    coordinator: str  # host:port of process 0's coordination service
    count: int
    index: int
    local_device_ids: tuple[int, ...] | None  # None: every device the process sees
    source: str  # which environment named the group (for the log)


def _int(env: Mapping[str, str], name: str, source: str) -> int:
    text = env.get(name, "")
    if not text.strip().isdigit():
        raise GemstillError(f"{source}: {name}={text!r} is not a non-negative integer; set it to the process's number")
    return int(text)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("node[03-05,9],other" -> "node03")."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None or not match.group(1):
        raise GemstillError(f"SLURM node list {nodelist!r} is unreadable; set GEMSTILL_COORDINATOR_ADDRESS instead")
    prefix, ranges = match.group(1), match.group(2)
    return prefix if ranges is None else prefix + ranges.split(",")[0].split("-")[0]


def from_environment(env: Mapping[str, str]) -> ProcessGroup | None:
    """The process group the environment describes, or None for a one-process run; a half-set one is refused."""
    port = env.get("GEMSTILL_COORDINATOR_PORT") or str(DEFAULT_PORT)
    if env.get("GEMSTILL_COORDINATOR_ADDRESS") or env.get("GEMSTILL_NUM_PROCESSES"):
        source = "GEMSTILL_* environment"
        if not env.get("GEMSTILL_COORDINATOR_ADDRESS"):
            raise GemstillError(f"{source}: GEMSTILL_COORDINATOR_ADDRESS is not set; set it to process 0's host:port")
        count = _int(env, "GEMSTILL_NUM_PROCESSES", source)
        index_name = "GEMSTILL_PROCESS_ID" if env.get("GEMSTILL_PROCESS_ID") else "JOB_COMPLETION_INDEX"
        index = _int(env, index_name, source)
        coordinator = env["GEMSTILL_COORDINATOR_ADDRESS"]
    elif int(env.get("SLURM_NTASKS") or 1) > 1:
        source = "SLURM environment"
        count, index = _int(env, "SLURM_NTASKS", source), _int(env, "SLURM_PROCID", source)
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        coordinator = f"{first_host(nodes)}:{port}"
    elif len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        source = "TPU VM environment"
        hosts = [h.strip() for h in env["TPU_WORKER_HOSTNAMES"].split(",") if h.strip()]
        count, index = len(hosts), _int(env, "TPU_WORKER_ID", source)
        coordinator = f"{hosts[0]}:{port}"
    else:
        return None
    if count < 1 or index >= count:
        raise GemstillError(f"{source}: process {index} of {count} is out of range; each process needs an id below")
    if ":" not in coordinator:
        raise GemstillError(f"{source}: coordinator {coordinator!r} has no port; write it as host:port")
    devices = env.get("GEMSTILL_LOCAL_DEVICE_IDS", "").strip()
    try:
        local = tuple(int(d) for d in devices.split(",")) if devices else None
    except ValueError:
        raise GemstillError(f"GEMSTILL_LOCAL_DEVICE_IDS={devices!r}: write device numbers like 0,1") from None
    return ProcessGroup(coordinator, count, index, local, source)


def bind_address(coordinator: str, env: Mapping[str, str]) -> str:
    """Where process 0's coordination service listens: GEMSTILL_COORDINATOR_BIND_ADDRESS, else the address its
    own name resolves to (127.0.0.1 for `gemstill launch`; the pod's address on a slice), never every interface:
    the service has no authentication, so it listens only where the other processes reach it."""
    if chosen := env.get("GEMSTILL_COORDINATOR_BIND_ADDRESS"):
        return chosen
    host, _, port = coordinator.rpartition(":")
    host = host.strip("[]")
    try:
        address = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0][4][0]
    except (OSError, ValueError) as err:
        raise GemstillError(
            f"coordinator {coordinator}: its host does not resolve here ({err}); set GEMSTILL_COORDINATOR_BIND_ADDRESS "
            "to the address process 0 listens on"
        ) from None
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


_UNSET = object()
_joined: object = _UNSET  # the group this process joined (None: one process), once start() has run


def start(log: Callable[[str], None] = print) -> ProcessGroup | None:
    """Join the process group the environment names (once per process), before JAX picks its devices."""
    global _joined
    if _joined is not _UNSET:
        return _joined  # type: ignore[return-value]
    group = from_environment(os.environ)
    if group is None or group.count == 1:
        _joined = None
        return None
    import jax

    if not jax.distributed.is_initialized():
        try:
            jax.distributed.initialize(
                coordinator_address=group.coordinator,
                num_processes=group.count,
                process_id=group.index,
                local_device_ids=list(group.local_device_ids) if group.local_device_ids is not None else None,
                coordinator_bind_address=bind_address(group.coordinator, os.environ) if group.index == 0 else None,
            )
        except RuntimeError as err:
            raise GemstillError(
                f"jax.distributed: process {group.index} of {group.count} could not join {group.coordinator} "
                f"({' '.join(str(err).split())[:200]}); start every process with the same coordinator, before "
                "anything else uses JAX"
            ) from None
    log(
        f"process {jax.process_index()} of {jax.process_count()} ({group.source}): {jax.local_device_count()} "
        f"local of {jax.device_count()} {jax.default_backend()} devices"
    )
    _joined = group
    return group


_alone = 0  # > 0 while this process runs a stage by itself (the others wait for it)


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Run a block as if this were a one-process run: the stages only process 0 runs (data preparation, layer
    mapping, export) must not split work with, or wait for, processes that are not running them."""
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1


def process_count() -> int:
    """Processes sharing the current work (1 in a one-process run, and inside `alone`)."""
    group = start()
    return 1 if group is None or _alone else group.count


def process_index() -> int:
    group = start()
    return 0 if group is None or _alone else group.index


def is_leader() -> bool:
    """Whether this process writes what exactly one process must write (manifests, catalogs, models)."""
    return process_index() == 0


class _Sequence:
    """Names for barriers and shared values: every process makes the same calls in the same order, so the n-th
    call has the same name everywhere (the coordination service wants each name used once)."""

    def __init__(self) -> None:
        self.count = 0

    def name(self, label: str) -> str:
        self.count += 1
        return f"gemstill/{self.count}/{re.sub(r'[^A-Za-z0-9_.-]', '_', label)}"


_names = _Sequence()


def _client():
    from jax._src import distributed  # the coordination service's client: barriers and a key-value store

    return distributed.global_state.client


def barrier(label: str) -> None:
    """Wait until every process reaches the same barrier (a process that died fails it)."""
    if process_count() == 1:
        return
    _client().wait_at_barrier(_names.name(label), WAIT_MS)


def share(label: str, value: str) -> str:
    """Process 0's `value`, returned in every process (process 0 publishes it, the others wait for it)."""
    if process_count() == 1:
        return value
    name = _names.name(label)
    if is_leader():
        _client().key_value_set(name, value)
        return value
    return _client().blocking_key_value_get(name, WAIT_MS)


def agree(label: str, value: str, fix: str) -> None:
    """Refuse to go on, in every process alike, unless all processes hold the same `value`."""
    values = gather(label, value)
    other = next((i for i, v in enumerate(values) if v != values[0]), None)
    if other is not None:
        raise GemstillError(f"{label}: process {other} has {values[other]} but process 0 has {values[0]}; {fix}")


def gather(label: str, value: Any) -> list[Any]:
    """Every process's `value` (plain values and numpy arrays, in gemstill.wire's encoding: nothing read from the
    key-value store can run code), in process order: the parts of a result each process computed."""
    if process_count() == 1:
        return [value]
    name = _names.name(label)
    _client().key_value_set_bytes(f"{name}/{process_index()}", wire.dumps(value))
    return [wire.loads(_client().blocking_key_value_get_bytes(f"{name}/{i}", WAIT_MS)) for i in range(process_count())]


def on_each_device(tree: Any) -> dict[Any, Any]:
    """`tree` (a model's state) on every local device, by device; with one device, where it already is."""
    import jax

    devices = jax.local_devices()
    return {devices[0]: tree} if len(devices) == 1 else {d: jax.device_put(tree, d) for d in devices}


def map_batches(
    label: str, count: int, compute: Callable[[int, Any], Any], done: Callable[[int], None] = lambda n: None
) -> list[Any]:
    """compute(i, device) for every batch i < count, in every process, in batch order.

    The data-parallel pattern of the stages that reduce over batches (teacher-cache-like evaluation, CKA, width
    importance): batches are dealt out to the processes in turn and, within a process, to its local devices in
    turn; each device runs whole batches of the shape a one-device run uses, so every result is the one a
    one-device run computes, and reducing them in batch order gives its exact totals. `compute` dispatches on
    the device it is given; the results of a round (one batch per local device) are fetched together, and
    done(batches this process has finished) is called after each round."""
    import jax

    devices = jax.local_devices()
    mine = list(range(process_index(), count, process_count()))
    results: dict[int, Any] = {}
    for first in range(0, len(mine), len(devices)):
        launched = [(i, compute(i, d)) for i, d in zip(mine[first : first + len(devices)], devices, strict=False)]
        results.update({i: jax.device_get(out) for i, out in launched})
        done(len(results))
    for part in gather(label, results):
        results.update(part)
    return [results[i] for i in range(count)]
