"""Declarative pipelines: specs, profiles, content-keyed artifact store, plans. Prefect lives in flows/ and tasks/."""
