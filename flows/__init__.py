"""Prefect flows over the DVC pipeline (not yet written: run the study with `dvc repro`)."""
