"""The explicit kernel implementations and what each runs: the compiled Pallas kernel, an interpreter of it, or XLA.

  "xla"        the XLA path (chunked or reference jnp code)
  "pallas"     the compiled Pallas kernel (TPU)
  "interpret"  the Pallas kernel run by Pallas' generic interpreter on any backend (tests, CPU)
  "interpret_tpu"  the Pallas kernel under TPU-semantics interpret mode (simulated VMEM/SMEM, DMAs, semaphores)
The kernels are written for Mosaic TPU (block specs, VMEM scratch, scalar prefetch); GPU runs the XLA path.
The dispatches in gemstill.kernels.dispatch take one of these or "auto", which that module resolves (through
gemstill.kernels.auto) to an explicit choice. This module is the bottom layer of gemstill.kernels: the kernel
modules import it, and it imports none of them.
"""

from __future__ import annotations

from typing import Any

from jax.experimental.pallas import tpu as pltpu

EXPLICIT = ("xla", "pallas", "interpret", "interpret_tpu")


def resolve_explicit(implementation: str) -> tuple[bool, Any]:
    """(use the Pallas kernel?, the `interpret` argument for pallas_call) for one of the EXPLICIT implementations."""
    if implementation not in EXPLICIT:
        raise ValueError(f"implementation={implementation!r}: use one of {EXPLICIT}")
    if implementation == "xla":
        return False, False
    if implementation == "pallas":
        return True, False
    if implementation == "interpret":
        return True, True
    return True, pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)


def interpret_races_found() -> bool:
    """Whether the last TPU-semantics interpreted kernel (detect_races=True) reported a data race."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret

    return bool(tpu_interpret.races is not None and tpu_interpret.races.races_found)


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple
