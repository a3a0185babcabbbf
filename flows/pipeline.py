"""pipeline: the DVC pipeline (dvc.yaml) executed as a Prefect flow, one task run per stage.

    python -m flows.pipeline                                  # like `dvc repro`, independent stages 2 at a time
    python -m flows.pipeline evaluate@serial --max-parallel 3 # a stage (or a foreach group: `pretrain`) and its upstream
    python -m flows.pipeline --retries 1                      # rerun a failed stage once before giving up
    python -m flows.pipeline --task-runner dask --address tcp://host:8786   # stages on a Dask (or Ray) cluster
    python -m flows.pipeline serve --cron "0 3 * * *"         # a deployment the Prefect UI can trigger; SIGTERM stops it

dvc.yaml stays the only DAG and DVC alone decides what reruns: each task runs
`dvc repro --single-item <stage>` in its own process once its upstream stages are done, so
dvc.lock and every output end up as `dvc repro` leaves them, and a second run executes nothing.
On a Dask or Ray cluster each task does the same in a working copy of its own on its worker, with
no shared disk: git at the flow's commit, inputs and outputs through the DVC remote (flows/travel.py,
class Away here). Stages DVC reports up to date (with nothing that ran upstream) get no task run: the
flow's log names them in one line and its summary artifact lists them as skipped (a task run each cost
~0.1 s of Prefect's bookkeeping: half of a no-op flow over the smoke study's 65 stages).
Prefect adds concurrency, retries, live logs, schedules and the UI; its result caching is off.
Without PREFECT_API_URL the flow runs against a temporary local server (ephemeral mode), given
TEMP_SERVER_STARTUP_S to start. A server that stops answering mid-flow ends the flow with one message
once Prefect's client stops retrying; the stages keep running without it, and DVC records those that finish.
"""

import argparse
import contextlib
import csv
import difflib
import fcntl
import functools
import logging
import os
import queue
import socket
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

from components import tracking
from components.errors import ParamsError, cli
from components.files import write_atomic
from components.params import load_study
from flows import travel
from flows.travel import StageFailed
from tasks import validate

RETRY_DELAY_S = 2
# Prefect's temporary server took 11-15 s to start on a fresh PREFECT_HOME (database migrations) on
# 2 quiet cores, 17-20 s beside 2 busy processes, 51 s when other jobs loaded the machine too
# (load 6.7): Prefect's default of 20 s fails there. PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
# when set, wins over this.
TEMP_SERVER_STARTUP_S = 120
_holding = False                   # this process holds the project's flow lock (one_flow_per_project)
_checked: dict = {}                 # preflight's answer in main(), which the flow body of the same process reuses


@dataclass
class Plan:
    order: list[str]               # the stages `dvc repro <targets>` would visit, in its order
    upstream: dict[str, list[str]] # stage -> the stages of the plan it depends on
    changed: set[str]              # stages whose own deps, params or outs DVC reports changed now
    lock_order: list[str]          # dvc.lock's entries before the run
    inputs: dict[str, list[str]]   # stage -> its deps that DVC caches (other stages' outputs, `dvc add`ed files)
    uncached: dict[str, list[str]] # stage -> its outputs that DVC does not cache (metrics, data/corpus.json)
    sources: set[str]              # every other dep of the plan: files git must hold for a worker to see them
    every: list[str]               # every stage of dvc.yaml, planned or not
    outs_before: dict[str, list]   # dvc.lock's record of each stage's outputs (paths, hashes) before the run
    always: set[str]               # stages DVC runs every time (always_changed: corpus): checks that track nothing


@dataclass
class Outcome:
    status: Literal["ran", "restored", "skipped", "failed", "not run"]
    seconds: float = 0.0
    note: str = ""
    same_outputs: bool = False     # it ran and dvc.lock records the outputs it had before (bit-identical)


@flow(name="pipeline", persist_result=False)
def pipeline(targets: Optional[list[str]] = None, max_parallel: int = 2, retries: int = 0,
             task_runner: Literal["thread", "dask", "ray"] = "thread", address: Optional[str] = None,
             git_url: Optional[str] = None) -> dict:
    """Reproduce dvc.yaml's stages (or `targets` and their upstream) as Prefect tasks."""
    with one_flow_per_project():
        return run_pipeline(targets or [], max_parallel, retries, task_runner, address, git_url)


def run_pipeline(targets: list[str], max_parallel: int, retries: int, task_runner: str, address: Optional[str],
                 git_url: Optional[str] = None) -> dict:
    key = (tuple(targets), task_runner, address, git_url)
    study, plan, away = _checked.pop(key, None) or preflight(targets, task_runner, address, git_url)
    params = {"targets": " ".join(targets) or "all", "max_parallel": max_parallel, "retries": retries,
              "task_runner": task_runner}
    with contextlib.ExitStack() as stack:
        parent = ParentRun(stack, study, params, plan.always)
        with stage_runner(task_runner, address, max_parallel) as runner:
            if away:
                check_workers(runner, task_runner, plan, study)
            outcomes = run_stages(runner, plan, max_parallel, retries, parent.env, away, study, task_runner)
        ran = [name for name, o in outcomes.items() if o.status in ("ran", "restored")]
        if away and ran:                       # their cached outputs are in the remote: here too, as after dvc repro
            away.pull_here([] if not targets else ran)
        if ran:
            keep_lock_order(plan)
        try:
            publish_artifacts(outcomes, study.experiment, parent)
        except httpx.TransportError as e:      # the server is gone: main() reports it once the flow ends
            get_run_logger().warning(f"no Prefect artifacts for this run ({type(e).__name__}: {e})")
        raise_if_failed(outcomes)              # inside the MLflow run: it ends FAILED
    return {name: o.status for name, o in outcomes.items()}


class ParentRun:
    """The flow's MLflow run, under which every stage's run nests. It opens when the first stage that is
    not always_changed starts: those (corpus) rerun on every flow and track nothing, so a flow in which
    only they ran (nothing else was out of date) records no run and skips MLflow's start-up (~2 s)."""

    def __init__(self, stack: contextlib.ExitStack, study, params: dict, always: set[str]):
        self.stack, self.study, self.params, self.always = stack, study, params, always
        self.opened, self.run_id = False, None    # opened with run_id None: tracking is off (tracking.required)

    def env(self, stage: str) -> dict[str, str]:
        """What stage's process needs to nest its run under this one."""
        if stage in self.always:
            return {}
        if not self.opened:                       # in the stack: an exception through the flow ends it FAILED
            self.run_id = self.stack.enter_context(tracking.stage_run(
                self.study, "pipeline", params=self.params, tags={"prefect_flow_run_id": flow_run_id()}))
            self.opened = True
        return {tracking.PARENT_RUN_ENV: self.run_id, "MLFLOW_TRACKING_URI": tracking.tracking_uri()} if self.run_id else {}


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
def run_stage(name: str, root: str, env: dict[str, str]):
    """One DVC stage in its own process in the project, its output streamed line by line into the task's log."""
    return travel.finished(travel.stream(name, travel.repro_command(name), root, env))


def preflight(targets: list[str], task_runner: str = "thread", address: Optional[str] = None,
              git_url: Optional[str] = None):
    """(study, plan, away), or a ParamsError naming what is wrong, before any stage runs. `away` is
    None when stages run here (thread runner), else where cluster workers get the project."""
    check_dvc_project()
    study = load_study()                       # lists every problem of params.yaml with its fix
    validate.check(study)                      # the files it names, the extras its stages need
    if validate.REPLICAS.exists():             # an archflow project: its replicate-seed stages as params.yaml has them now
        write_atomic(validate.REPLICAS, validate.replicas(study))
    plan = plan_stages(targets)
    tracking.reachable(study)                  # an unreachable MLflow backend (tracking.required: true)
    names = plan.every + sorted({n.split("@")[0] for n in plan.every}) + ["default"]
    for key in study.resources:
        if key not in names:
            hint = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            raise ParamsError(f"resources: '{key}' is no stage of dvc.yaml: use a stage (pretrain@serial), a foreach "
                              f"group (pretrain) or default" + (f"; did you mean '{hint[0]}'?" if hint else ""))
    away = None if task_runner == "thread" else Away.check(plan, study, task_runner, address, git_url)
    return study, plan, away


def plan_stages(targets: list[str]) -> Plan:
    """What `dvc repro <targets>` would visit, in its order, and which stages may need a rerun."""
    from dvc.exceptions import DvcException
    from dvc.lock import LockError
    from dvc.repo import Repo, lock_repo
    from dvc.repo.reproduce import get_active_graph, plan_repro

    # under DVC's repo lock throughout: status() takes it too, and taking it resets the index, which
    # would then be built twice (~0.4 s)
    with Repo(".") as repo, contextlib.ExitStack() as held:
        try:
            held.enter_context(lock_repo(repo))
        except LockError as e:
            raise ParamsError(f"{e} (is a `dvc repro` running in this project?): run the flow again once it "
                              "is done") from None
        try:
            graph = get_active_graph(repo.index.graph)       # nx.DiGraph, edge A -> B: A depends on B
        except DvcException as e:
            raise ParamsError(f"dvc.yaml can't be read: {e}{f' ({e.__cause__})' if e.__cause__ else ''}") from None
        # no targets: dvc.yaml's stages, as `dvc repro` collects them (from the graph: collecting reads dvc.yaml again)
        wanted = ([s for t in targets for s in collect_target(repo, graph, t)] if targets else
                  [s for s in graph if s.path == os.path.join(repo.root_dir, "dvc.yaml")])
        stages = plan_repro(graph, wanted)
        # one status pass over the whole project (~2 s), not one per target stage (~0.5 s each: 35 s
        # for the smoke study); a stage's own status does not depend on what else is asked
        changed = set(repo.status()) & {s.addressing for s in stages}
        order = [s.addressing for s in stages]
        planned = set(order)
        upstream = {s.addressing: [u.addressing for u in graph.successors(s) if u.addressing in planned] for s in stages}
        rel = functools.partial(relative_to, Path(repo.root_dir))
        cached = [rel(o) for s in graph for o in s.outs if o.use_cache]
        deps = {s.addressing: [rel(d) for d in s.deps] for s in stages}        # each path worked out once
        # a dep is an output, inside one, or a directory of outputs (upcycle's branches/<parent>)
        inputs = {name: sorted({o for d in ds for o in cached if within(d, o) or within(o, d)}) for name, ds in deps.items()}
        uncached = {s.addressing: [rel(o) for o in s.outs if not o.use_cache] for s in stages}
        outs = [rel(o) for s in graph for o in s.outs]
        sources = {d for ds in deps.values() for d in ds if not any(within(d, o) or within(o, d) for o in outs)}
        every = [s.addressing for s in graph]
        always = {s.addressing for s in stages if s.always_changed}
    lock = read_lock()
    return Plan(order, upstream, {name for name in order if name in changed}, list(lock), inputs, uncached,
                sources, every, {name: entry.get("outs") for name, entry in lock.items()}, always)


def relative_to(root: Path, item) -> str:
    """A dep's or out's path as dvc.yaml would write it from the project root (absolute when outside)."""
    path = Path(item.fs_path)
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


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


def run_stages(runner, plan: Plan, max_parallel: int, retries: int, env, away=None, study=None,
               kind: str = "thread") -> dict[str, Outcome]:
    """Submit each stage once its upstream stages are done, at most `max_parallel` at a time.

    A stage downstream of a failed one is not run; stages that do not depend on it carry on.
    Submitting only ready stages keeps a waiting task from holding one of the runner's workers.
    """
    log = get_run_logger()
    done: queue.Queue = queue.Queue()          # futures land here as they finish
    futures, running, started, outcomes, skipped = {}, {}, {}, {}, []
    waiting = list(plan.order)                 # topological: a stage's upstream comes before it
    while waiting or running:
        for name in list(waiting):
            ups = plan.upstream[name]
            blocked = [u for u in ups if u in outcomes and outcomes[u].status in ("failed", "not run")]
            if blocked:
                waiting.remove(name)
                outcomes[name] = Outcome("not run", note=f"upstream stage '{blocked[0]}' did not complete")
                log.warning(f"{name}: not run: {outcomes[name].note}")
            elif all(u in outcomes for u in ups) and not stale(name, plan, outcomes):
                waiting.remove(name)
                outcomes[name] = Outcome("skipped", note="up to date")
                skipped.append(name)
            elif all(u in outcomes for u in ups) and len(running) < max_parallel:
                waiting.remove(name)
                need = study.resources_of(name) if study else None
                stage = (travel.run_stage_away if away else run_stage).with_options(
                    task_run_name=name, retries=retries, retry_delay_seconds=RETRY_DELAY_S,
                    tags=["gpu"] if need and need.gpus else [])
                parameters = {"name": name,
                              "env": env(name) | ({"OMP_NUM_THREADS": str(need.cpus)} if need and need.cpus else {}),
                              **({"job": away.job(plan, name)} if away else {"root": str(Path.cwd())})}
                with requesting(kind, need):
                    futures[name] = running[name] = runner.submit(stage, parameters, wait_for=[futures[u] for u in ups if u in futures])
                started[name] = time.perf_counter()
                futures[name].add_done_callback(done.put)
        assert running or not waiting, f"no stage can start among {waiting}"
        if running:
            finished = done.get()
            name = next(n for n, f in running.items() if f is finished)
            del running[name]
            outcomes[name] = outcome_of(finished, time.perf_counter() - started[name], away)
            if not away and outcomes[name].status in ("ran", "restored"):
                outcomes[name].same_outputs = outputs_unchanged(name, plan)
            if away and outcomes[name].status in ("ran", "restored"):
                away.bring_back(name, finished.result())
            if away:                           # the stage's own log is in its task run, on the worker's side
                log.info(f"{name}: {outcomes[name].status} ({outcomes[name].seconds:.1f} s"
                         + (f", {outcomes[name].note.splitlines()[0]})" if outcomes[name].note else ")"))
    if skipped:
        log.info(f"up to date, not run: {len(skipped)} stage(s): {' '.join(skipped)}")
    return {name: outcomes[name] for name in plan.order}


def stale(name: str, plan: Plan, outcomes: dict[str, Outcome]) -> bool:
    """Whether the stage may need a rerun: DVC found it changed, or an upstream stage ran and its outputs
    are not the ones dvc.lock recorded before. A stage marked always_changed (corpus) runs each time;
    what it leaves unchanged starts no task downstream (those would run `dvc repro`, which finds them
    up to date)."""
    return name in plan.changed or any(outcomes[u].status in ("ran", "restored") and not outcomes[u].same_outputs
                                       for u in plan.upstream[name])


def outputs_unchanged(name: str, plan: Plan) -> bool:
    """Whether dvc.lock now records the outputs it recorded for the stage before the run. Any doubt (no
    earlier record, a lock being rewritten by a parallel stage, a stage of another dvc.yaml) is a change."""
    before = plan.outs_before.get(name)
    try:
        return before is not None and read_lock().get(name, {}).get("outs") == before
    except Exception:                      # yaml.YAMLError, a half-written file: its downstream runs
        return False


def outcome_of(future, seconds: float, away=None) -> Outcome:
    future.wait()
    state = future.state
    if state.is_completed():
        result = future.result()
        return Outcome(result["outcome"] if away else result, seconds, state.message or "")
    error = future.result(raise_on_failure=False)       # the exception the task raised, or a crash
    return Outcome("failed", seconds, str(error) if isinstance(error, BaseException) else (state.message or ""))


# What a worker is sent of the project beyond git: its uncommitted files and uncached outputs
# (params.yaml edits, metrics, data/corpus.json). Larger files belong in git or DVC.
MAX_SENT_BYTES = 16 * 2**20


@dataclass
class Away:
    """Where stage tasks on cluster workers get the project (a git URL at a commit) and put their
    outputs (a DVC remote); the worker's side is flows/travel.py."""
    git_url: str
    commit: str
    remote_url: str

    @classmethod
    def check(cls, plan: Plan, study, task_runner: str, address: Optional[str], git_url: Optional[str]) -> "Away":
        """Everything a worker will need, checked here: one ParamsError naming what is missing and the fix."""
        runner = f"--task-runner {task_runner}"
        check_address(task_runner, address)
        commit = git("rev-parse", "HEAD", fix=f"{runner} runs the project's commit on each worker: commit it first")
        if not git_url:
            git_url = git("remote", "get-url", "origin", fix=f"{runner}: workers clone the project from a git URL and "
                          "this repository has no `origin`: add one (`git remote add origin <url>`) or pass --git-url")
        if Path(git_url).is_dir():                         # a path: the same for every worker once absolute
            git_url = str(Path(git_url).resolve())
        on_remote = git("ls-remote", git_url, fix=f"{runner}: workers clone the project from {git_url}, which git "
                        "cannot read: check the URL (--git-url) and your access").split()[::2]
        if commit not in on_remote and not any(git("merge-base", "--is-ancestor", commit, sha, check=False) == ""
                                               for sha in on_remote):
            raise ParamsError(f"commit {commit[:12]} is not on {git_url}, where the workers get the project: push it "
                              "(`git push`), then run again")
        away = cls(git_url, commit, dvc_remote(runner))
        if not tracking.tracking_uri().startswith(("http://", "https://")) and study.tracking.required:
            raise ParamsError(f"{runner}: stages on other machines can't write to the MLflow store "
                              f"{tracking.tracking_uri()}: start a tracking server (`mlflow server --host 0.0.0.0 "
                              "--backend-store-uri sqlite:///mlflow.db`) and export MLFLOW_TRACKING_URI=http://<host>:5000, "
                              "or set `tracking: {required: false}` in params.yaml to run without tracking")
        sent = away.files()                                # nothing too large to send
        tracked = set(git("ls-files", "-z").split("\0")) | set(sent)
        unseen = sorted(src for src in plan.sources
                        if src not in tracked and not any(t.startswith(src.rstrip("/") + "/") for t in tracked))
        if unseen:
            raise ParamsError(f"{runner}: stages read {', '.join(unseen)}, which neither git nor DVC holds, so a "
                              "worker can't get them: commit them (`git add`), or `dvc add` them and `dvc push`")
        return away

    def files(self) -> dict[str, bytes | None]:
        """The project's files a worker's clone lacks: what git sees changed or new, and uncached outputs."""
        status = git("status", "--porcelain", "-z", "--untracked-files=all")
        paths = [item[3:] for item in status.split("\0") if len(item) > 3]
        paths += [str(f) for out in uncached_outputs() for f in ([Path(out)] if Path(out).is_file()
                                                                   else Path(out).rglob("*")) if f.is_file()]
        sent = {}
        for rel in paths:
            if rel == "dvc.lock":
                continue                                   # sent whole, as the job's lock
            path = Path(rel)
            if path.is_file() and path.stat().st_size > MAX_SENT_BYTES:
                raise ParamsError(f"{rel} ({path.stat().st_size / 2**20:.1f} MiB) is neither committed nor in DVC, and "
                                  f"workers get only files up to {MAX_SENT_BYTES // 2**20} MiB from the flow: commit it, "
                                  "`dvc add` it, or git-ignore it")
            sent[rel] = path.read_bytes() if path.is_file() else None
        return sent

    def job(self, plan: Plan, name: str) -> travel.Job:
        lock = Path("dvc.lock")
        return travel.Job(self.git_url, self.commit, self.remote_url, lock.read_text() if lock.exists() else "",
                          self.files(), plan.inputs[name], plan.uncached[name])

    def bring_back(self, name: str, result: dict) -> None:
        """Write what a stage returned from its worker into the project: files, then its dvc.lock entry."""
        written = []
        for rel, data in result["files"].items():
            path = Path(rel)
            if data is None:
                path.unlink(missing_ok=True)
            elif path.name == ".gitignore" and path.exists():     # stages add their outputs' lines: merge them
                lines = path.read_text().splitlines()
                path.write_text("\n".join(lines + [x for x in data.decode().splitlines() if x not in lines]) + "\n")
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            written.append(rel)
        from dvc.repo import Repo
        from dvc.utils.serialize import modify_yaml

        with Repo(".") as repo, repo.lock:
            with modify_yaml("dvc.lock") as lock:
                lock.setdefault("schema", "2.0")
                lock.setdefault("stages", {})[name] = result["lock"]
            if repo.config["core"].get("autostage"):        # as `dvc repro` would have
                git("add", "dvc.lock", *[w for w in written if Path(w).name == ".gitignore"])

    def pull_here(self, stages: list[str]) -> None:
        """`dvc pull` the stages; none: all of dvc.yaml, which DVC collects faster than stages named one
        by one (7 smoke stages: 1.5 s for all against 3.0 s by name; 53 by name took 65 s)."""
        r = subprocess.run([sys.executable, "-m", "dvc", "pull", "-q", *stages], capture_output=True, text=True)
        if r.returncode:
            raise StageFailed(f"the stages ran, but their outputs could not be pulled here from {self.remote_url} "
                              f"(`dvc pull {' '.join(stages)}` said: {(r.stderr or r.stdout).strip()[-2000:]}): "
                              "dvc.lock is written; run `dvc pull` once the remote answers")


def git(*args: str, fix: str = "", check: bool = True) -> str:
    r = subprocess.run(["git", *args], capture_output=True, text=True)
    if r.returncode and check:
        raise ParamsError(f"{fix} (`git {' '.join(args)}` said: {r.stderr.strip() or r.returncode})")
    return r.stdout.strip("\n") if not r.returncode else None     # not strip(): `status` lines start with a space


def dvc_remote(runner: str) -> str:
    """The default DVC remote's URL (a local directory: it must exist and be writable)."""
    from dvc.repo import Repo

    with Repo(".") as repo:
        name = repo.config["core"].get("remote")
        url = repo.config["remote"][name]["url"] if name in repo.config["remote"] else None
    if not url:
        raise ParamsError(f"{runner}: each stage gets its inputs from a DVC remote and pushes its outputs there, and "
                          "this project has no default remote: `dvc remote add -d storage <url>` (s3://..., ssh://..., "
                          "or a directory every worker can reach), then `git commit .dvc/config`")
    if "://" not in url:
        path = Path(url)
        if not path.is_dir():
            raise ParamsError(f"{runner}: the DVC remote '{name}' is the directory {path}, which does not exist: "
                              f"create it (`mkdir -p {path}`) or point the remote elsewhere (`dvc remote modify {name} url ...`)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ParamsError(f"{runner}: the DVC remote '{name}' ({path}) is not writable, and stages push their outputs "
                              f"there: fix its permissions or point the remote elsewhere (`dvc remote modify {name} url ...`)")
    return url


def uncached_outputs() -> list[str]:
    from dvc.repo import Repo

    with Repo(".") as repo:
        return [relative_to(Path(repo.root_dir), o) for s in repo.index.stages for o in s.outs if not o.use_cache]


def check_address(kind: str, address: Optional[str]) -> None:
    """A scheduler/head address must answer on its port (no address: the engine starts a local cluster)."""
    if not address or address == "auto":
        return
    from urllib.parse import urlsplit
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=5).close()
    except (OSError, TypeError, ValueError) as e:
        start = ("`dask scheduler` on that host (and `dask worker <address>` on each worker)" if kind == "dask" else
                 "`ray start --head` on that host (and `ray start --address <head>:6379` on each worker)")
        raise ParamsError(f"nothing answers at --address {address} ({type(e).__name__}: {e}): start {start}, or leave "
                          "out --address to run a local cluster") from None


def check_workers(runner, kind: str, plan: Plan, study) -> None:
    """Before any stage: one probe task (a worker without archflow's dependencies fails the flow), and
    every stage's declared resources held by some worker (else the engine would queue it for ever)."""
    probe = runner.submit(travel.probe_worker, {}).result()
    if probe["missing"]:
        raise ParamsError(f"a worker ({probe['host']}, Python {probe['python']}) lacks {', '.join(probe['missing'])}: "
                          "install archflow's dependencies on every worker (`pip install torch==2.13.0 && pip install "
                          "-e .` in a clone of the project) and start the workers from that environment")
    if kind == "dask":
        # asked of the scheduler now: Client.scheduler_info() can answer from a cache with no workers in it
        # (it keeps the last answer when the scheduler does not reply in time, as on a loaded machine)
        client = runner.client
        identity = client.sync(client.scheduler.identity, n_workers=-1)
        workers = [w.get("resources", {}) for w in identity["workers"].values()]
    else:
        import ray
        workers = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    for name in plan.order:
        want = engine_resources(kind, study.resources_of(name))
        if want and not any(all(w.get(k, 0) >= v for k, v in want.items()) for w in workers):
            held = "; ".join(", ".join(f"{k}={v:g}" for k, v in sorted(w.items()) if not k.startswith("node:"))
                             or "none declared" for w in workers)
            start = ('`dask worker <scheduler> --resources "GPU=1 CPU=8 MEMORY=32e9"`' if kind == "dask" else
                     "`ray start --address <head> --num-gpus 1 --num-cpus 8 --memory <bytes>`")
            raise ParamsError(f"stage {name} asks for {', '.join(f'{k}={v:g}' for k, v in want.items())} (resources in "
                              f"params.yaml) and no worker has that (workers hold: {held}): start one that does, e.g. "
                              f"{start}, or lower the request")


def engine_resources(kind: str, need) -> dict[str, float]:
    """A stage's resources as its engine names them: Dask's worker resources (declared with `dask worker
    --resources`), or Ray's (CPU, GPU, memory in bytes)."""
    if need is None:
        return {}
    names = {"dask": ("CPU", "GPU", "MEMORY"), "ray": ("CPU", "GPU", "memory")}[kind]
    values = (need.cpus, need.gpus, need.memory_gb * 2**30 if need.memory_gb else None)
    return {k: v for k, v in zip(names, values) if v}


@contextlib.contextmanager
def requesting(kind: str, need):
    """Submissions inside ask the engine for a stage's resources (threads: the `gpu` tag does it)."""
    want = engine_resources(kind, need) if kind in ("dask", "ray") else {}
    if not want:
        yield
    elif kind == "dask":
        import dask
        with dask.annotate(resources=want):
            yield
    else:
        from prefect_ray.context import remote_options
        with remote_options(num_cpus=want.get("CPU", 1), num_gpus=want.get("GPU", 0),
                            **({"memory": int(want["memory"])} if "memory" in want else {})):
            yield


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
        import cloudpickle                     # flows/travel.py goes by value: workers need no archflow code
        cloudpickle.register_pickle_by_value(travel)
        if address:
            return DaskTaskRunner(address=address, client_kwargs={"timeout": 10})
        # a local cluster: each worker holds its share of this machine, for stages that declare resources
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max_parallel
        share = {"CPU": max(1, (os.cpu_count() or 1) // max_parallel), "MEMORY": memory}
        return DaskTaskRunner(cluster_kwargs={"n_workers": max_parallel, "threads_per_worker": 1, "resources": share})
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise ParamsError("--task-runner ray needs prefect-ray: pip install -e '.[ray]'") from None
        import ray.cloudpickle                 # Ray's own copy of cloudpickle: the same, for Ray
        ray.cloudpickle.register_pickle_by_value(travel)
        # log_to_driver: the stages' output reaches the flow as task-run logs; Ray's copy would double it
        return RayTaskRunner(address=address, init_kwargs={"log_to_driver": False})
    raise ParamsError(f"unknown task runner '{kind}': use thread, dask or ray")


def read_lock() -> dict[str, dict]:
    """dvc.lock's stages, name -> entry, in its order. Read with PyYAML's libyaml loader (0.04 s for the
    smoke study's lock against ruamel's pure loader's 0.4 s); its YAML 1.1 reads some plain scalars (on,
    no, 1e3) unlike DVC's YAML 1.2, but a stage name is a fixed word or contains '@', which none of them
    does, and the entries are compared only with entries read the same way."""
    import yaml
    lock = Path("dvc.lock")
    if not lock.exists():
        return {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)     # libyaml, where PyYAML was built with it
    return {str(name): entry for name, entry in ((yaml.load(lock.read_text(), Loader=loader) or {}).get("stages") or {}).items()}


def keep_lock_order(plan: Plan) -> None:
    """Put dvc.lock's entries where `dvc repro` would have: stages finish in any order when parallel.

    `dvc repro` updates existing entries in place and appends new ones in the order it runs them,
    which is plan.order. That order is itself not fixed for independent stages: DVC orders them
    by string hashes, which change with PYTHONHASHSEED from one process to the next; so dvc.lock
    is one that `dvc repro` could have written, with every stage after its upstream.
    """
    current = list(read_lock())
    want = [n for n in plan.lock_order if n in current] + [n for n in plan.order if n in current and n not in plan.lock_order]
    want += [n for n in current if n not in want]
    if current == want:
        return
    from dvc.repo import Repo
    from dvc.utils.serialize import modify_yaml

    with Repo(".") as repo, repo.lock, modify_yaml("dvc.lock") as lock:
        for name in want:
            lock["stages"].move_to_end(name)


def publish_artifacts(outcomes: dict[str, Outcome], experiment: str, parent: ParentRun) -> None:
    """The report's summary table and a note on where the MLflow runs are, in the Prefect UI."""
    summary = Path("reports/summary.csv")
    if summary.exists():
        with summary.open(newline="") as f:
            create_table_artifact(list(csv.DictReader(f)), key="archflow-summary",
                                  description="reports/summary.csv: one row per model")
    uri = tracking.tracking_uri()
    browse = f"open {uri}" if uri.startswith("http") else f"`mlflow ui --backend-store-uri {uri}`, then open http://127.0.0.1:5000"
    mlflow_note = (f"MLflow experiment **{experiment}** at `{uri}`: this execution is the run `{parent.run_id}`, "
                   f"every stage's run is nested under it. To browse: {browse}, select the experiment and "
                   f"the runs to compare." if parent.run_id else
                   f"MLflow tracking was off (`{uri}` unreachable)." if parent.opened else
                   "No stage that tracks ran: this execution has no MLflow run.")
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
    p.add_argument("--git-url", help="with dask or ray: where workers clone the project (default: the `origin` remote)")
    args = p.parse_args(argv[1:] if serving else argv)
    args.serve = serving
    if args.max_parallel < 1 or args.retries < 0:
        p.error("--max-parallel must be >= 1 and --retries >= 0")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    stage_runner(args.task_runner, args.address, args.max_parallel)   # its extra is installed
    checked = preflight(args.targets, args.task_runner, args.address, args.git_url)   # every user error, before Prefect starts
    params = {"targets": args.targets, "max_parallel": args.max_parallel, "retries": args.retries,
              "task_runner": args.task_runner, "address": args.address, "git_url": args.git_url}
    if args.serve:
        from prefect.settings import PREFECT_API_URL
        if not PREFECT_API_URL.value():
            raise ParamsError("serve needs a Prefect server: `prefect server start --host 127.0.0.1`, then "
                              "export PREFECT_API_URL=http://127.0.0.1:4200/api")
        check_prefect_api()
        pipeline.serve(name=args.name, cron=args.cron, parameters=params)   # until SIGTERM / Ctrl-C
        return 0
    if args.task_runner != "thread":
        from prefect.settings import PREFECT_API_URL
        if not PREFECT_API_URL.value():
            raise ParamsError(f"--task-runner {args.task_runner} needs a Prefect server the workers can reach (with "
                              "Prefect's temporary one, each worker would start its own and the stages' logs would be "
                              "lost): `prefect server start --host 0.0.0.0`, then export "
                              "PREFECT_API_URL=http://<this-host>:4200/api")
    with one_flow_per_project():               # before Prefect starts: a refused flow costs no server
        # the flow body runs in this process, moments later: it plans no second time (a served
        # deployment's runs, hours apart, each plan their own)
        _checked[(tuple(args.targets), args.task_runner, args.address, args.git_url)] = checked
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
    cli(main)
