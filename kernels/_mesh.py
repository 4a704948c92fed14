"""Running a Pallas kernel on a device mesh: shard_map over the batch axes, and over "tensor" for heads.

A pallas_call is opaque to XLA's SPMD partitioner: given sharded operands, it gathers them whole onto every
device and runs the whole kernel on each. Under shard_map each device runs the kernel on its own batch rows.
The mesh is the one a dispatch is given, else the one in effect (`jax.set_mesh`); the axis names are those of
gemstill.distill.sharding, which a kernel may not import. The XLA paths need none of this (SPMD splits them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from jax.sharding import AbstractMesh, Mesh

BATCH_AXES = ("data", "fsdp")  # examples (and their tokens) are split over these
HEADS_AXIS = "tensor"  # attention heads, when the kv heads divide evenly over it

AnyMesh = Mesh | AbstractMesh


class Split(NamedTuple):
    """How one kernel call is split: batch axes (None: rows whole) and the heads axis (None: heads whole)."""

    mesh: AnyMesh
    batch: tuple[str, ...] | None
    heads: str | None


def _size(mesh: AnyMesh, name: str) -> int:
    """Size of an axis a kernel may split over: 1 when absent or already manual (inside another shard_map)."""
    if name not in mesh.axis_names or name in mesh.manual_axes:
        return 1
    return mesh.shape[name]


def plan(mesh: AnyMesh | None, rows: int, kv_heads: int | None = None) -> Split | None:
    """The split of a kernel over `rows` batch rows (and `kv_heads` heads), or None to call it unsplit.

    Rows that the batch axes do not divide stay whole: the kernel then runs on every device on gathered
    operands (correct, only slower). Training never gets there: Placement refuses such micro-batches.
    """
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    axes = tuple(a for a in BATCH_AXES if _size(mesh, a) > 1)
    batch = axes if axes and rows % math.prod(_size(mesh, a) for a in axes) == 0 else None
    tensor = _size(mesh, HEADS_AXIS)
    heads = HEADS_AXIS if kv_heads is not None and tensor > 1 and kv_heads % tensor == 0 else None
    return None if batch is None and heads is None else Split(mesh, batch, heads)


def shard_mapped(fn: Callable[..., Any], split: Split, in_specs: Any, out_specs: Any) -> Callable[..., Any]:
    """`fn` under shard_map on the split's mesh.

    check_vma is off because pallas_call's output shapes carry no varying-axes annotation. shard_map's transpose
    then psums the cotangent of an operand passed whole (in_spec P(), e.g. the LM-head table) over the devices:
    the gradient summed over every device's rows (tests/test_kernels_mesh.py checks it on a 2 x 2 x 2 mesh).
    """
    return jax.shard_map(fn, mesh=split.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
