"""The device mesh a profile's compute stages run on (None on one device: nothing is sharded)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gemstill.pipeline.profile import Profile

if TYPE_CHECKING:
    from jax.sharding import Mesh


def profile_mesh(profile: Profile) -> Mesh | None:
    mesh = profile.hardware.mesh
    if mesh.devices == 1:
        return None
    from gemstill.distill.sharding import make_mesh

    return make_mesh(mesh.data, mesh.fsdp, mesh.tensor)
