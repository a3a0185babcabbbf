"""MLflow mirror of the study: one run per (stage, model), in the study's experiment.

Default backend: `sqlite:///<project root>/mlflow.db` with artifacts in `<project root>/mlartifacts`
(any sqlite backend keeps its artifacts in `mlartifacts/` next to the database file)
(no server; `mlflow ui --backend-store-uri sqlite:///mlflow.db` browses it). `MLFLOW_TRACKING_URI`
points it elsewhere, e.g. a team's `mlflow server`. DVC outputs are written before anything is
logged: MLflow mirrors them, it never owns them.

Each stage opens its run with `stage_run(study, stage, model, parents, params)`. A rerun of a stage
makes a new run tagged `current=true` and retags the previous one `current=false`, so "the run of
model X at stage S" is always well defined: `current_runs(study)` lists them. Runs are tagged
`dvc_exp` with their DVC experiment's name (`workspace` for `dvc repro` and the Prefect flow), and
"current" holds within each experiment.

    with tracking.stage_run(study, "evaluate", model="parallel", parents=[]) as run_id:
        tracking.log_metrics(metrics)
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")   # off unless the user turns it on
os.environ.setdefault("DO_NOT_TRACK", "true")
# A server that goes away mid-stage: by default MLflow's client retries each request 7 times with
# exponential backoff (about 4 minutes) and waits up to 120 s for each answer. Give up within seconds
# instead: the stage stops with one message and keeps its checkpoint, and its rerun resumes from it.
# Set these variables to wait longer.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

from components.errors import ParamsError, collector_paused  # noqa: E402

for _name in ("mlflow.store.db.utils", "alembic.runtime.migration"):   # "Creating initial MLflow database
    logging.getLogger(_name).setLevel(logging.WARNING)                 # tables...": noise, every new store


def __getattr__(name: str):
    """`tracking.mlflow`: MLflow (~3 s of imports and store set-up) is imported when a run is opened or
    queried, never by a stage that stops on bad input, by `--help`, or with tracking off. Imported in
    the main thread, once (concurrent first imports crash)."""
    if name == "mlflow":
        import mlflow
        return mlflow
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

PARENT_RUN_ENV = "ARCHFLOW_PARENT_RUN_ID"   # a pipeline's MLflow run id: stage runs nest under it
ARTIFACTS = "mlartifacts"                   # next to mlflow.db, for the default local backend
_warned = False


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the project's mlflow.db. The project root is DVC_ROOT when DVC runs the
    stage: `dvc exp run --temp` and queued experiments run in a copy under .dvc/tmp/exps/, whose own
    mlflow.db would be deleted with it."""
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd())
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def dvc_experiment() -> str:
    """The DVC experiment this stage runs in (`dvc exp run`, queued or --temp), else 'workspace'."""
    return os.environ.get("DVC_EXP_NAME") or "workspace"


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


def data_sha256() -> str:
    meta = Path("data/prepared/meta.json")
    return json.loads(meta.read_text())["sha256"] if meta.exists() else ""


# ---------------------------------------------------------------------------------------------
# the backend: reachable? local paths still right?


def check_backend(uri: str) -> str | None:
    """None if the backend answers, else why not. Servers: GET /health (5 s); sqlite: the folder."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                return None if r.status == 200 else f"/health answered HTTP {r.status}"
        except OSError as e:
            return f"{type(e).__name__}: {getattr(e, 'reason', e)}"
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        return None if folder.is_dir() else f"the folder {folder} does not exist"
    return None


def relocate(db: Path, root: Path) -> None:
    """MLflow stores artifact locations as absolute paths. If this project's mlflow.db was made
    at another path (the project was moved or copied), rewrite the stored prefix to this root."""
    if not db.exists():
        return
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        if not con.execute("select 1 from sqlite_master where name='experiments'").fetchone():
            return
        locations = [row[0] for row in con.execute("select artifact_location from experiments")]
        old = {loc.removeprefix("file://").rsplit(f"/{ARTIFACTS}", 1)[0] for loc in locations if f"/{ARTIFACTS}" in loc}
        for prefix in old - {str(root)}:
            for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                                  ("model_versions", "source"), ("model_versions", "storage_location")):
                con.execute(f"update {table} set {column} = replace({column}, ?, ?) where {column} like ?",
                            (prefix + "/", f"{root}/", f"%{prefix}/%"))


@contextlib.contextmanager
def first_use_lock(db: Path):
    """One process at a time sets up a sqlite store: MLflow's first use of a new database creates its
    schema, and two processes doing it at once crash ("table ... already exists"); two creating the
    study's experiment at once collide too. An flock on the database file itself (sqlite's own locks
    are fcntl locks, which flock does not touch); the kernel drops it if the process dies."""
    with open(db, "a") as f:                 # an empty file is a valid empty sqlite database
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def reachable(study) -> bool:
    """Whether the tracking backend answers, without importing MLflow. Unreachable: with
    tracking.required (default) raise a clear error before any work; else warn once, return False."""
    global _warned
    uri = tracking_uri()
    if problem := check_backend(uri):
        msg = (f"MLflow tracking backend {uri} is unreachable ({problem}). Start it (see README: MLflow), "
               f"unset MLFLOW_TRACKING_URI to use the local sqlite:///mlflow.db, or set "
               f"`tracking: {{required: false}}` in params.yaml to run without tracking")
        if study.tracking.required:
            raise ParamsError(msg)
        if not _warned:
            print(f"warning: {msg}; continuing without MLflow", file=sys.stderr)
            _warned = True
        return False
    return True


def connect(study) -> bool:
    """Point MLflow at the backend and the study's experiment (False: unreachable, see reachable)."""
    if not reachable(study):
        return False
    uri = tracking_uri()
    with collector_paused():                 # MLflow's import and its store's set-up: ~2 s of objects
        import mlflow
        mlflow.set_tracking_uri(uri)
        if uri.startswith("sqlite:///"):     # local: artifacts next to the database, both movable
            db = Path(uri.removeprefix("sqlite:///")).resolve()
            with first_use_lock(db):
                relocate(db, db.parent)
                if mlflow.get_experiment_by_name(study.experiment) is None:
                    mlflow.create_experiment(study.experiment, artifact_location=str(db.parent / ARTIFACTS))
        mlflow.set_experiment(study.experiment)
    return True


# ---------------------------------------------------------------------------------------------
# runs


@contextlib.contextmanager
def stage_run(study, stage: str, model: str | None = None, parents=(), params: dict | None = None,
              tags: dict | None = None, enabled: bool = True):
    """Open the MLflow run of one stage execution; yields its run id (None when tracking is off, or
    not `enabled`: a DDP rank other than 0, whose global rank 0 tracks)."""
    if not enabled or not connect(study):
        yield None
        return
    models = getattr(study, "models", None)            # the entry and seed: replicate seeds side by side
    made = models().get(model, {}) if models and model else {}
    all_tags = {"stage": stage, "dvc_stage": os.environ.get("DVC_STAGE", ""), "git_commit": git_commit(),
                "dvc_exp": dvc_experiment(),
                "data_sha256": data_sha256(), "study": study.study.name,
                **({"model": model, "parents": ",".join(parents)} if model else {}),
                **({"entry": made["entry"], "seed": str(made["seed"])} if made else {}), **(tags or {})}
    if parent := os.environ.get(PARENT_RUN_ENV):       # set by flows/pipeline.py: nest under its run
        all_tags |= {"mlflow.parentRunId": parent, "pipeline_run_id": parent}
    name = f"{stage}@{model}" if model else stage
    import mlflow
    import requests                                  # mlflow's HTTP client
    from mlflow.exceptions import MlflowException
    try:
        with mlflow.start_run(run_name=name, tags=all_tags) as run:
            if params:
                mlflow.log_params({k: ("" if v is None else v) for k, v in flatten(params).items()})
            yield run.info.run_id
            make_current(run.info.run_id, stage, model)
    except (MlflowException, requests.RequestException):
        if problem := lost_backend():
            raise ParamsError(f"MLflow tracking backend {tracking_uri()} stopped answering during {name} "
                              f"({problem}). The stage stopped; it wrote no partial outputs, and a training "
                              "stage keeps its checkpoint: start the server again (see README: MLflow) and rerun "
                              "the stage (`dvc repro`), which resumes from that checkpoint") from None
        raise


def lost_backend() -> str | None:
    """Why the tracking server no longer answers (None: it does, or the backend is local). Once it
    is gone, later calls (mlflow's end_run at exit) fail at once instead of retrying."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")) or not (problem := check_backend(uri)):
        return None
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    return problem


def make_current(run_id: str, stage: str, model: str | None) -> None:
    """Tag this run current=true and every earlier run of the same (stage, model) in the same DVC
    experiment ('workspace' outside one) current=false: an experiment leaves the workspace's runs current."""
    query = (f"tags.stage = '{stage}' and tags.current = 'true' and tags.dvc_exp = '{dvc_experiment()}'"
             + (f" and tags.model = '{model}'" if model else ""))
    import mlflow
    client = mlflow.MlflowClient()
    for old in mlflow.search_runs(filter_string=query, output_format="list"):
        if old.info.run_id != run_id:
            client.set_tag(old.info.run_id, "current", "false")
    client.set_tag(run_id, "current", "true")


def current_runs(experiment: str, stage: str | None = None, dvc_exp: str = "workspace") -> list:
    """The current run of every (stage, model) of the MLflow experiment in DVC experiment `dvc_exp`,
    newest first."""
    query = f"tags.current = 'true' and tags.dvc_exp = '{dvc_exp}'" + (f" and tags.stage = '{stage}'" if stage else "")
    import mlflow
    return mlflow.search_runs(experiment_names=[experiment], filter_string=query, output_format="list",
                              order_by=["attributes.start_time DESC"])


def active() -> bool:
    """A run is open (MLflow not imported yet: none is)."""
    return "mlflow" in sys.modules and sys.modules["mlflow"].active_run() is not None


def lightning_logger(run_id: str | None):
    """Lightning's logger into run `run_id` (the curve's rows, the losses of each step); False: none."""
    if run_id is None:
        return False
    from lightning.pytorch.loggers import MLFlowLogger   # here, not above: prepare and report need no Lightning

    return MLFlowLogger(tracking_uri=tracking_uri(), run_id=run_id)


def log_metrics(metrics: dict, step: int | None = None) -> None:
    if active():
        import mlflow
        mlflow.log_metrics(metrics, step=step)


def log_model_dir(path: str | Path, log_weights: bool = False, curve: bool = True) -> None:
    """Mirror a model directory on the active run: config.json, meta.json, curve.csv with a plot of it
    (`curve`: the training stages'; evaluate skips it, and matplotlib's second of start-up), and the
    weights only if asked (DVC already stores them)."""
    if not active():
        return
    import mlflow
    path = Path(path)
    for name in ("config.json", "meta.json", "curve.csv"):
        if (path / name).exists() and (curve or name != "curve.csv"):
            mlflow.log_artifact(str(path / name))
    if curve and (path / "curve.csv").exists():
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


# ---------------------------------------------------------------------------------------------
# model registry: one registered model per study, an alias per model name


def register_model_dir(study, model: str, path: str | Path, run_id: str) -> int:
    """Log the model directory under the run's `model/` and register it as a new version of the
    registered model `study.study.name`, alias `model` (moved to this version). Returns the version."""
    import mlflow
    mlflow.log_artifacts(str(path), "model")
    client = mlflow.MlflowClient()
    name = study.study.name
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description=f"archflow study {name}: one alias per model")
    version = client.create_model_version(name, source=f"{mlflow.get_run(run_id).info.artifact_uri}/model",
                                          run_id=run_id, tags={"model": model})
    client.set_registered_model_alias(name, model, version.version)
    return int(version.version)


def load_registered(study_name: str, model: str, dst: str | Path | None = None):
    """(model, meta) of `model` in the registry of study `study_name`, by alias:
    load_registered("archflow-smoke", "parallel")."""
    import mlflow
    from components.artifacts import load_model_dir

    path = mlflow.artifacts.download_artifacts(f"models:/{study_name}@{model}", dst_path=dst and str(dst))
    return load_model_dir(path)
