"""Prefect flows over the DVC pipeline: `python -m flows.pipeline` runs dvc.yaml's stages as Prefect tasks."""
from components.errors import pause_collector_while_starting

pause_collector_while_starting()   # until the flow's imports are done (components.errors.cli)
