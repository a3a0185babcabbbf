"""pipeline: the DVC pipeline (dvc.yaml) executed as a Prefect flow, one task run per stage.

    python -m flows.pipeline                                  # like `dvc repro`, independent stages 2 at a time
    python -m flows.pipeline evaluate@serial --max-parallel 3 # a stage (or a foreach group: `pretrain`) and its upstream
    python -m flows.pipeline --retries 1                      # rerun a failed stage once before giving up
    python -m flows.pipeline --task-runner dask --address tcp://host:8786   # stages on a Dask cluster
    python -m flows.pipeline serve --cron "0 3 * * *"         # a deployment the Prefect UI can trigger; SIGTERM stops it

dvc.yaml stays the only DAG and DVC alone decides what reruns: each task runs
`dvc repro --single-item <stage>` in its own process once its upstream stages are done, so
dvc.lock and every output end up as `dvc repro` leaves them, and a second run executes nothing.
Stages DVC reports up to date (with nothing stale upstream) finish at once as "Skipped".
Prefect adds concurrency, retries, live logs, schedules and the UI; its result caching is off.
Without PREFECT_API_URL the flow runs against a temporary local server (ephemeral mode), given
TEMP_SERVER_STARTUP_S to start. A server that stops answering mid-flow ends the flow with one message
once Prefect's client stops retrying; the stages keep running without it, and DVC records those that finish.
"""

import argparse
import collections
import contextlib
import csv
import difflib
import fcntl
import logging
import os
import queue
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import httpx
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.states import Completed

from components import tracking
from components.errors import ParamsError
from components.params import load_study

RETRY_DELAY_S = 2
# Prefect's temporary server took 11-15 s to start on a fresh PREFECT_HOME (database migrations) on
# 2 quiet cores, 17-20 s beside 2 busy processes, 51 s when other jobs loaded the machine too
# (load 6.7): Prefect's default of 20 s fails there. PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
# when set, wins over this.
TEMP_SERVER_STARTUP_S = 120
LOG_TAIL = 30                      # lines of a failed stage's log quoted in the flow's error
_holding = False                   # this process holds the project's flow lock (one_flow_per_project)


@dataclass
class Plan:
    order: list[str]               # the stages `dvc repro <targets>` would visit, in its order
    upstream: dict[str, list[str]] # stage -> the stages of the plan it depends on
    changed: set[str]              # stages whose own deps, params or outs DVC reports changed now
    lock_order: list[str]          # dvc.lock's entries before the run


@dataclass
class Outcome:
    status: Literal["ran", "restored", "skipped", "failed", "not run"]
    seconds: float = 0.0
    note: str = ""


class StageFailed(RuntimeError):
    """A stage's command failed; the message names it and quotes the end of its log."""


@flow(name="pipeline", persist_result=False)
def pipeline(targets: Optional[list[str]] = None, max_parallel: int = 2, retries: int = 0,
             task_runner: Literal["thread", "dask", "ray"] = "thread", address: Optional[str] = None) -> dict:
    """Reproduce dvc.yaml's stages (or `targets` and their upstream) as Prefect tasks."""
    with one_flow_per_project():
        return run_pipeline(targets or [], max_parallel, retries, task_runner, address)


def run_pipeline(targets: list[str], max_parallel: int, retries: int, task_runner: str, address: Optional[str]) -> dict:
    study, plan = preflight(targets)
    params = {"targets": " ".join(targets) or "all", "max_parallel": max_parallel, "retries": retries,
              "task_runner": task_runner}
    with tracking.stage_run(study, "pipeline", params=params, tags={"prefect_flow_run_id": flow_run_id()}) as parent_run:
        # every stage's MLflow run nests under this one (none: tracking is off, see tracking.required)
        env = {tracking.PARENT_RUN_ENV: parent_run, "MLFLOW_TRACKING_URI": tracking.tracking_uri()} if parent_run else {}
        with stage_runner(task_runner, address, max_parallel) as runner:
            outcomes = run_stages(runner, plan, max_parallel, retries, env)
        if any(o.status in ("ran", "restored") for o in outcomes.values()):
            keep_lock_order(plan)
        try:
            publish_artifacts(outcomes, study.experiment, parent_run)
        except httpx.TransportError as e:      # the server is gone: main() reports it once the flow ends
            get_run_logger().warning(f"no Prefect artifacts for this run ({type(e).__name__}: {e})")
        raise_if_failed(outcomes)              # inside the MLflow run: it ends FAILED
    return {name: o.status for name, o in outcomes.items()}


@contextlib.contextmanager
def one_flow_per_project():
    """Hold the project's flow lock (.dvc/tmp/archflow-flow.lock) while the flow runs. A second flow
    started meanwhile would plan the same stale stages and collide with the first on DVC's output
    locks: it stops at once instead, naming the one running. The kernel drops the lock if the process dies.
    main() takes it before Prefect starts (a refused flow costs no server start-up); a deployment's flow
    run, in a process of its own, takes it in the flow body."""
    global _holding
    if _holding:                               # main() took it: the flow body runs in the same process
        yield
        return
    path = Path(".dvc/tmp/archflow-flow.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise ParamsError(f"another flow is running in this project ({f.read().strip() or 'unknown process'}): "
                              "wait for it to finish or stop it, then run again (it reruns only what is "
                              "still stale)") from None
        f.truncate(0)
        f.write(f"PID {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        _holding = True
        try:
            yield
        finally:
            _holding = False
            fcntl.flock(f, fcntl.LOCK_UN)


@task(cache_policy=NONE, persist_result=False)
def run_stage(name: str, root: str, stale: bool, env: dict[str, str]):
    """One DVC stage in its own process, its output streamed line by line into the task's log."""
    log = get_run_logger()
    if not stale:
        log.info("skipped: up to date")
        return Completed(name="Skipped", message="skipped: up to date", data="skipped")
    # --wait-for-lock: parallel `dvc repro` processes queue for the repo lock instead of failing.
    cmd = [sys.executable, "-m", "dvc", "--wait-for-lock", "repro", "--single-item", name]
    # Stage commands call `python`: make it the interpreter running this flow (as an activated venv would).
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **env, "PATH": path, "PYTHONUNBUFFERED": "1"})
    tail, outcome = collections.deque(maxlen=LOG_TAIL), "ran"
    for line in proc.stdout:                   # text mode: '\r' progress updates also end a line
        line = line.rstrip()
        if line:
            log.info(line)
            tail.append(line)
        if line == f"Stage '{name}' didn't change, skipping":    # its upstream reran to identical outputs
            outcome = "skipped"
        elif line.startswith(f"Stage '{name}' is cached - skipping run"):
            outcome = "restored"
    if proc.wait():
        raise StageFailed(f"stage '{name}' failed (dvc exit code {proc.returncode}); the end of its log:\n"
                          + "\n".join(tail))
    if outcome == "skipped":
        return Completed(name="Skipped", message="skipped: up to date", data="skipped")
    if outcome == "restored":
        return Completed(message="restored from DVC's run cache", data="restored")
    return "ran"


def preflight(targets: list[str]):
    """(study, plan), or a ParamsError naming what is wrong, before any stage runs."""
    check_dvc_project()
    study = load_study()                       # lists every problem of params.yaml with its fix
    plan = plan_stages(targets)
    tracking.connect(study)                    # an unreachable MLflow backend (tracking.required: true)
    return study, plan


def plan_stages(targets: list[str]) -> Plan:
    """What `dvc repro <targets>` would visit, in its order, and which stages may need a rerun."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.repo.reproduce import get_active_graph, plan_repro

    with Repo(".") as repo:
        try:
            graph = get_active_graph(repo.index.graph)       # nx.DiGraph, edge A -> B: A depends on B
        except DvcException as e:
            raise ParamsError(f"dvc.yaml can't be read: {e}{f' ({e.__cause__})' if e.__cause__ else ''}") from None
        stages = plan_repro(graph, [s for t in targets or ["dvc.yaml"] for s in collect_target(repo, graph, t)])
        changed = set(repo.status(targets=[s.addressing for s in stages]))
    order = [s.addressing for s in stages]
    upstream = {s.addressing: [u.addressing for u in graph.successors(s) if u.addressing in order] for s in stages}
    return Plan(order, upstream, {name for name in order if name in changed}, lock_entries())


def collect_target(repo, graph, target: str) -> list:
    from dvc.exceptions import DvcException
    from dvc.repo.reproduce import collect_stages

    try:
        return collect_stages(repo, [target])
    except DvcException:
        names = [s.addressing for s in graph]
        groups = sorted({n.split("@")[0] for n in names if "@" in n})
        hint = difflib.get_close_matches(target, names + groups, n=1, cutoff=0.5)
        raise ParamsError(f"unknown stage '{target}' in dvc.yaml; "
                          + (f"did you mean '{hint[0]}'?" if hint else f"stages are: {', '.join(names)}")
                          + " (`dvc stage list` shows them all)") from None


def check_dvc_project() -> None:
    here = Path.cwd()
    if not (here / ".dvc").is_dir():
        raise ParamsError(f"{here} is not a DVC project (no .dvc/ directory): run from the project root, "
                          "or start one with `git init && dvc init`")
    if not (here / "dvc.yaml").is_file():
        raise ParamsError(f"no dvc.yaml in {here}: run from the project root, where the pipeline is declared")


def run_stages(runner, plan: Plan, max_parallel: int, retries: int, env: dict) -> dict[str, Outcome]:
    """Submit each stage once its upstream stages are done, at most `max_parallel` at a time.

    A stage downstream of a failed one is not run; stages that do not depend on it carry on.
    Submitting only ready stages keeps a waiting task from holding one of the runner's workers.
    """
    log = get_run_logger()
    done: queue.Queue = queue.Queue()          # futures land here as they finish
    futures, running, started, outcomes = {}, {}, {}, {}
    waiting = list(plan.order)                 # topological: a stage's upstream comes before it
    while waiting or running:
        for name in list(waiting):
            ups = plan.upstream[name]
            blocked = [u for u in ups if u in outcomes and outcomes[u].status in ("failed", "not run")]
            if blocked:
                waiting.remove(name)
                outcomes[name] = Outcome("not run", note=f"upstream stage '{blocked[0]}' did not complete")
                log.warning(f"{name}: not run: {outcomes[name].note}")
            elif all(u in outcomes for u in ups) and len(running) < max_parallel:
                waiting.remove(name)
                stage = run_stage.with_options(task_run_name=name, retries=retries, retry_delay_seconds=RETRY_DELAY_S)
                # Stale: changed itself, or an upstream stage ran (its outputs may differ). A stage marked
                # always_changed (corpus) runs each time, but what it leaves unchanged reruns nothing.
                stale = name in plan.changed or any(outcomes[u].status in ("ran", "restored") for u in ups)
                parameters = {"name": name, "root": str(Path.cwd()), "stale": stale, "env": env}
                futures[name] = running[name] = runner.submit(stage, parameters, wait_for=[futures[u] for u in ups])
                started[name] = time.perf_counter()
                futures[name].add_done_callback(done.put)
        assert running or not waiting, f"no stage can start among {waiting}"
        if running:
            finished = done.get()
            name = next(n for n, f in running.items() if f is finished)
            del running[name]
            outcomes[name] = outcome_of(finished, time.perf_counter() - started[name])
    return {name: outcomes[name] for name in plan.order}


def outcome_of(future, seconds: float) -> Outcome:
    future.wait()
    state = future.state
    if state.is_completed():
        result = future.result()
        return Outcome(result, seconds, state.message or "")
    error = future.result(raise_on_failure=False)       # the exception the task raised, or a crash
    return Outcome("failed", seconds, str(error) if isinstance(error, BaseException) else (state.message or ""))


def stage_runner(kind: str, address: Optional[str], max_parallel: int):
    """The Prefect task runner that executes the stage tasks (each one only launches a subprocess)."""
    if kind == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner
        return ThreadPoolTaskRunner(max_workers=max_parallel)
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise ParamsError("--task-runner dask needs prefect-dask: pip install -e '.[dask]'") from None
        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": max_parallel, "threads_per_worker": 1})
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise ParamsError("--task-runner ray needs prefect-ray: pip install -e '.[ray]'") from None
        return RayTaskRunner(address=address) if address else RayTaskRunner()
    raise ParamsError(f"unknown task runner '{kind}': use thread, dask or ray")


def lock_entries() -> list[str]:
    from ruamel.yaml import YAML
    lock = Path("dvc.lock")
    return list((YAML(typ="safe", pure=True).load(lock.read_text()) or {}).get("stages", {})) if lock.exists() else []


def keep_lock_order(plan: Plan) -> None:
    """Put dvc.lock's entries where `dvc repro` would have: stages finish in any order when parallel.

    `dvc repro` updates existing entries in place and appends new ones in the order it runs them,
    which is plan.order. That order is itself not fixed for independent stages: DVC orders them
    by string hashes, which change with PYTHONHASHSEED from one process to the next; so dvc.lock
    is one that `dvc repro` could have written, with every stage after its upstream.
    """
    current = lock_entries()
    want = [n for n in plan.lock_order if n in current] + [n for n in plan.order if n in current and n not in plan.lock_order]
    want += [n for n in current if n not in want]
    if current == want:
        return
    from dvc.repo import Repo
    from dvc.utils.serialize import modify_yaml

    with Repo(".") as repo, repo.lock, modify_yaml("dvc.lock") as lock:
        for name in want:
            lock["stages"].move_to_end(name)


def publish_artifacts(outcomes: dict[str, Outcome], experiment: str, parent_run: Optional[str]) -> None:
    """The report's summary table and a note on where the MLflow runs are, in the Prefect UI."""
    summary = Path("reports/summary.csv")
    if summary.exists():
        with summary.open(newline="") as f:
            create_table_artifact(list(csv.DictReader(f)), key="archflow-summary",
                                  description="reports/summary.csv: one row per model")
    uri = tracking.tracking_uri()
    browse = f"open {uri}" if uri.startswith("http") else f"`mlflow ui --backend-store-uri {uri}`, then open http://127.0.0.1:5000"
    mlflow_note = (f"MLflow experiment **{experiment}** at `{uri}`: this execution is the run `{parent_run}`, "
                   f"every stage's run is nested under it. To browse: {browse}, select the experiment and "
                   f"the runs to compare." if parent_run else f"MLflow tracking was off (`{uri}` unreachable).")
    rows = "\n".join(f"| `{n}` | {o.status} | {o.seconds:.1f} | {o.note.splitlines()[0] if o.note else ''} |"
                     for n, o in outcomes.items())
    create_markdown_artifact(
        f"# archflow pipeline\n\n{mlflow_note}\n\n"
        f"| stage | outcome | seconds | note |\n|---|---|---:|---|\n{rows}\n",
        key="archflow-run", description="stage outcomes and where the MLflow runs are")


def raise_if_failed(outcomes: dict[str, Outcome]) -> None:
    failed = {n: o for n, o in outcomes.items() if o.status == "failed"}
    if failed:
        not_run = [n for n, o in outcomes.items() if o.status == "not run"]
        raise StageFailed("\n\n".join(o.note for o in failed.values())
                          + (f"\n\nnot run (upstream failed): {', '.join(not_run)}" if not_run else ""))


def flow_run_id() -> str:
    from prefect.runtime import flow_run
    return str(flow_run.id)


def check_prefect_api(timeout: float = 3.0) -> None:
    """With PREFECT_API_URL set, its server must answer /health; without, the temporary server must
    start (else fail before any stage runs)."""
    from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        start_temporary_server()
        return
    key = PREFECT_API_KEY.value()
    try:
        r = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout,
                      headers={"Authorization": f"Bearer {key.get_secret_value()}"} if key else {})
        problem = None if r.status_code == 200 else f"HTTP {r.status_code}"
    except httpx.HTTPError as e:
        problem = f"{type(e).__name__}: {e}"
    if problem:
        raise ParamsError(f"no Prefect server answers at PREFECT_API_URL={url} ({problem}): start one with "
                          "`prefect server start --host 127.0.0.1`, or unset PREFECT_API_URL to run without one")


def start_temporary_server() -> None:
    """Start Prefect's temporary local server now, with time enough to start on busy cores; the flow
    then uses it (Prefect keeps one per process). Not started: one message with the alternative."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    ephemeral = get_current_settings().server.ephemeral
    if not ephemeral.enabled:
        return                                 # Prefect itself says that PREFECT_API_URL is needed
    timeout = (ephemeral.startup_timeout_seconds if "startup_timeout_seconds" in ephemeral.model_fields_set
               else TEMP_SERVER_STARTUP_S)
    server = SubprocessASGIServer()
    try:
        server.start(timeout=timeout)
    except RuntimeError as e:                  # "Timed out while attempting to connect to ephemeral ..."
        server.stop()
        why = str(e).split(" stdout:")[0].rstrip(".")
        raise ParamsError(f"Prefect's temporary server (no PREFECT_API_URL is set) did not start within {timeout} s "
                          f"({why}). Run a real server instead: `prefect server start --host 127.0.0.1` in another "
                          "shell, then export PREFECT_API_URL=http://127.0.0.1:4200/api; or give it longer with "
                          "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") from None


def exit_lost_server(error: Exception) -> None:
    """The flow's end when its Prefect server stopped answering (after the client's retries): one
    message, exit code 2, and no at-exit drain of Prefect's services, which would retry each queued
    event against the lost server (about 7 s each) before the process could end."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    server = f"the Prefect server at PREFECT_API_URL={url}" if (url := PREFECT_API_URL.value()) else \
        "Prefect's temporary server"
    # a new line first: Prefect's own "--- Error logging to API ---" note to stderr ends without one
    print(f"\nerror: {server} stopped answering ({type(error).__name__}: {error}), so the flow run could not be "
          "recorded. Stages that finished are in dvc.lock with complete outputs: start the server again "
          "(`prefect server start --host 127.0.0.1`) and rerun; DVC skips what is done", file=sys.stderr)
    if not url:
        SubprocessASGIServer().stop()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(2)


def drop_server_gone_traceback(record: logging.LogRecord) -> bool:
    """A filter on Prefect's flow-run logger: when its server stops answering, the engine logs the
    client's 60-line traceback; main() says it in one line instead."""
    if record.exc_info and isinstance(record.exc_info[1], httpx.TransportError):
        record.exc_info, record.exc_text = None, None
    return True


def parse_args(argv: list[str]) -> argparse.Namespace:
    serving = argv[:1] == ["serve"]
    p = argparse.ArgumentParser(prog="python -m flows.pipeline" + " serve" * serving,
                                description="Run dvc.yaml's stages as a Prefect flow (DVC decides what reruns).",
                                epilog=None if serving else "`python -m flows.pipeline serve --cron '0 3 * * *'` serves "
                                "it as a deployment the Prefect UI can trigger (serve --help).")
    if serving:
        p.add_argument("--cron", help='schedule, e.g. "0 3 * * *" (nightly at 03:00); none: run on demand only')
        p.add_argument("--name", default="archflow", help="deployment name (default: archflow)")
    p.add_argument("targets", nargs="*", default=[],
                   help="stages (e.g. pretrain@parallel) or foreach groups (pretrain); default: all of dvc.yaml")
    p.add_argument("--max-parallel", type=int, default=2, help="stages running at once (default: 2)")
    p.add_argument("--retries", type=int, default=0, help="reruns of a failed stage before it fails (default: 0)")
    p.add_argument("--task-runner", choices=["thread", "dask", "ray"], default="thread",
                   help="where stage tasks run: threads here (default), or a Dask/Ray cluster")
    p.add_argument("--address", help="the Dask scheduler (tcp://host:8786) or Ray cluster address; "
                                     "default: a local cluster")
    args = p.parse_args(argv[1:] if serving else argv)
    args.serve = serving
    if args.max_parallel < 1 or args.retries < 0:
        p.error("--max-parallel must be >= 1 and --retries >= 0")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    preflight(args.targets)                    # every user error is reported before Prefect starts
    stage_runner(args.task_runner, args.address, args.max_parallel)   # its extra is installed
    params = {"targets": args.targets, "max_parallel": args.max_parallel, "retries": args.retries,
              "task_runner": args.task_runner, "address": args.address}
    if args.serve:
        from prefect.settings import PREFECT_API_URL
        if not PREFECT_API_URL.value():
            raise ParamsError("serve needs a Prefect server: `prefect server start --host 127.0.0.1`, then "
                              "export PREFECT_API_URL=http://127.0.0.1:4200/api")
        check_prefect_api()
        pipeline.serve(name=args.name, cron=args.cron, parameters=params)   # until SIGTERM / Ctrl-C
        return 0
    with one_flow_per_project():               # before Prefect starts: a refused flow costs no server
        check_prefect_api()
        logging.getLogger("prefect.flow_runs").addFilter(drop_server_gone_traceback)
        try:
            state = pipeline(**params, return_state=True)
        except httpx.TransportError as e:      # the API did not answer, even after Prefect's retries
            exit_lost_server(e)
    if state.is_failed():
        print(f"error: the pipeline failed: {state.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
