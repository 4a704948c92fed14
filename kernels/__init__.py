"""Pallas kernels with pure-jnp references beside them; installed as `gemstill.kernels`."""
