"""Prefect tasks: thin wrappers over `gemstill` stage functions; installed as `gemstill.tasks`."""
