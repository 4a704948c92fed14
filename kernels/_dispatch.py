"""How a kernel dispatch picks its path: the compiled Pallas kernel, an interpreter of it, or plain XLA.

Every dispatch in gemstill.kernels takes `implementation`:
  "auto"       the Pallas kernel on TPU once a compiled check has passed in this process (gemstill.kernels.auto),
               the XLA path elsewhere (CPU, and GPU until the Mosaic GPU ports land) or when the check fails
  "xla"        the XLA path (chunked or reference jnp code)
  "pallas"     the compiled Pallas kernel (TPU)
  "interpret"  the Pallas kernel run by Pallas' generic interpreter on any backend (tests, CPU)
  "interpret_tpu"  the Pallas kernel under TPU-semantics interpret mode (simulated VMEM/SMEM, DMAs, semaphores)
The kernels are written for Mosaic TPU (block specs, VMEM scratch, scalar prefetch); GPU runs the XLA path.
"""

from __future__ import annotations

from typing import Any

from jax.experimental.pallas import tpu as pltpu

IMPLEMENTATIONS = ("auto", "xla", "pallas", "interpret", "interpret_tpu")


def resolve(implementation: str) -> tuple[bool, Any]:
    """(use the Pallas kernel?, the `interpret` argument for pallas_call) for a dispatch's `implementation`."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: use one of {IMPLEMENTATIONS}")
    if implementation == "auto":
        from .auto import auto_choice  # imported here: the check runs the kernels, which import this module

        return auto_choice().pallas, False
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
