"""Prefect flows over the DVC pipeline: `python -m flows.pipeline` runs dvc.yaml's stages as Prefect tasks."""
