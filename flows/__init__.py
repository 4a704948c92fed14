"""Prefect flows that run declarative pipelines; installed as `gemstill.flows`."""
