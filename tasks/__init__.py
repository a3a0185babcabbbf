"""archflow's stages, a module each: `python -m tasks.<stage>` (dvc.yaml's commands, the flow's tasks)."""
from components.errors import pause_collector_while_starting

pause_collector_while_starting()   # until the stage's imports are done (components.errors.cli)
