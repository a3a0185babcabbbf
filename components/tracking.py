"""MLflow helpers: one run per stage execution, in the study's experiment.

Default backend: `sqlite:///<project root>/mlflow.db` (no server; `mlflow ui --backend-store-uri
sqlite:///mlflow.db` browses it). `MLFLOW_TRACKING_URI` points it elsewhere, e.g. a server.
DVC outputs are written before anything is logged: MLflow mirrors them, it never owns them.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")   # off unless the user turns it on
os.environ.setdefault("DO_NOT_TRACK", "true")

import mlflow  # noqa: E402  imported once, in the main thread (concurrent first imports crash)

ROOT = Path(__file__).resolve().parent.parent
PARENT_RUN_ENV = "ARCHFLOW_PARENT_RUN_ID"   # a pipeline's MLflow run id: stage runs nest under it


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def flatten(d: dict, prefix: str = "") -> dict:
    """{'model': {'n_head': 4}} -> {'model.n_head': 4}: the same key names as params.yaml."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_commit() -> str:
    r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path.cwd())
    return r.stdout.strip() if r.returncode == 0 else "unknown"


@contextlib.contextmanager
def stage_run(experiment: str, stage: str, model: str | None = None, parents=(),
              params: dict | None = None, tags: dict | None = None):
    """Open one MLflow run for a stage execution; yields its run id."""
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    all_tags = {"stage": stage, "dvc_stage": os.environ.get("DVC_STAGE", ""), "git_commit": git_commit(),
                **({"model": model, "parents": ",".join(parents)} if model else {}), **(tags or {})}
    if parent := os.environ.get(PARENT_RUN_ENV):       # set by flows/pipeline.py: nest under its run
        all_tags |= {"mlflow.parentRunId": parent, "pipeline_run_id": parent}
    name = f"{stage}@{model}" if model else stage
    with mlflow.start_run(run_name=name, tags=all_tags) as run:
        if params:
            mlflow.log_params({k: ("" if v is None else v) for k, v in flatten(params).items()})
        yield run.info.run_id


def log_model_dir(path: str | Path, log_weights: bool = False) -> None:
    """Mirror a written model directory on the active run: config.json, meta.json, curve.csv with
    a plot of it, and the weights only if asked (DVC already stores them)."""
    path = Path(path)
    for name in ("config.json", "meta.json", "curve.csv"):
        if (path / name).exists():
            mlflow.log_artifact(str(path / name))
    if (path / "curve.csv").exists():
        mlflow.log_figure(curve_figure(path / "curve.csv", path.name), "curve.png")
    if log_weights:
        mlflow.log_artifact(str(path / "model.safetensors"))


def curve_figure(csv: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.read_csv(csv)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(df["tokens"], df["train_loss"], label="train loss")
    ax.plot(df["tokens"], df["val_loss"], label="val loss")
    ax.set(xlabel="training tokens", ylabel="loss", title=title)
    ax.legend()
    fig.tight_layout()
    plt.close(fig)
    return fig
