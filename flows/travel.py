"""travel: one DVC stage on a worker that cannot see the project (`--task-runner dask|ray`).

The stage's task builds a working copy of its own on whichever worker runs it:

1. `git clone` the project's git URL and check out the flow's commit;
2. lay over it what the flow sends: its uncommitted files (params.yaml edits, metrics, ...), its
   dvc.lock, and the uncached outputs of other stages that this stage reads (data/corpus.json, ...);
3. `dvc pull` the cached outputs it reads (data/prepared, a parent's model) from the DVC remote;
4. `dvc repro --single-item <stage>`, its log streamed into the task run's log;
5. `dvc push` its outputs, and hand back to the flow its dvc.lock entry and the files the remote
   does not hold (uncached outputs, files git sees changed); the flow writes them into the project.

This module uses only the standard library and Prefect: the flow ships it to the workers by value
(cloudpickle), so a worker needs archflow's dependencies installed, not archflow, and runs the
code of the flow's commit, whatever is installed there.
"""
import collections
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.states import Completed

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
LOG_TAIL = 30                      # lines of a failed stage's log quoted in the flow's error
# What the stage commands import (`python -m tasks.<stage>`, `python -m dvc`): a worker without one of
# them fails before cloning anything.
REQUIRES = ("dvc", "torch", "lightning", "mlflow", "pandas", "matplotlib", "tokenizers", "safetensors",
            "pydantic", "ruamel.yaml", "numpy")


class StageFailed(RuntimeError):
    """A stage's command failed; the message names it and quotes the end of its log."""


@dataclass
class Job:
    """What a stage needs from the flow's project to run anywhere."""
    git_url: str
    commit: str
    remote_url: str                                  # the DVC remote: inputs come from it, outputs go to it
    lock: str                                        # dvc.lock's text now (its upstream entries included)
    files: dict[str, bytes | None] = field(default_factory=dict)   # laid over the commit (None: deleted)
    pull: list[str] = field(default_factory=list)    # cached inputs to fetch from the remote
    uncached: list[str] = field(default_factory=list)   # this stage's outputs DVC does not cache: they come back


def stream(name: str, cmd: list[str], cwd: str | Path, env: dict[str, str], base: dict | None = None) -> str:
    """Run a stage's `dvc repro` with its output, line by line, in the task's log: "ran", "skipped"
    (DVC found it unchanged) or "restored" (from DVC's run cache); StageFailed otherwise. Its
    environment: `base` (default: this process's), then `env`."""
    log = get_run_logger()
    base = os.environ if base is None else base
    # Stage commands call `python`: make it the interpreter running this task (as an activated venv would).
    path = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**base, **env, "PATH": path, "PYTHONUNBUFFERED": "1"})
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
    return outcome


def repro_command(name: str) -> list[str]:
    # --wait-for-lock: parallel `dvc repro` processes queue for the repo lock instead of failing.
    return [sys.executable, "-m", "dvc", "--wait-for-lock", "repro", "--single-item", name]


def missing_packages() -> list[str]:
    return [m for m in REQUIRES if importlib.util.find_spec(m.split(".")[0]) is None
            or (("." in m) and importlib.util.find_spec(m) is None)]


@task(cache_policy=NONE, persist_result=False)
def probe_worker() -> dict:
    """Where a task lands and what it lacks: the flow asks once before any stage."""
    import socket
    return {"host": socket.gethostname(), "python": sys.version.split()[0], "missing": missing_packages()}


def finished(outcome: str, data=None, where: str = ""):
    """The task's end state: Completed, named "Skipped" when DVC found nothing to do."""
    at = f" in {where}" if where else ""
    if outcome == "skipped":
        return Completed(name="Skipped", message="skipped: up to date", data=data or "skipped")
    if outcome == "restored":
        return Completed(message=f"restored from DVC's run cache{at}", data=data or "restored")
    return Completed(message=f"ran{at}" if at else None, data=data or "ran")


@task(cache_policy=NONE, persist_result=False)
def run_stage_away(name: str, job: Job, env: dict[str, str]):
    """The stage in a fresh working copy on this worker. Its result: {"outcome", "lock" (its dvc.lock
    entry), "files" (to write into the project), "setup_s"}; the state's message says where it ran."""
    if missing := missing_packages():
        raise StageFailed(f"stage '{name}': the worker lacks {', '.join(missing)} (Python {sys.executable}): "
                          "install archflow's dependencies there (`pip install torch==2.13.0 && pip install -e .` "
                          "from a clone of the project), or start the worker from that environment")
    log = get_run_logger()
    base = Path(os.environ.get("ARCHFLOW_WORK_DIR") or Path(tempfile.gettempdir()) / "archflow-work")
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=name.replace("@", "-") + "-", dir=base))
    start = time.perf_counter()
    try:
        checkout(name, job, work, base)
        if job.pull:
            pull(name, job, work)
        setup_s = time.perf_counter() - start
        log.info(f"working copy {work} on {os.uname().nodename} ready in {setup_s:.1f} s")
        # Dask's nanny and Ray set one thread for their own workers' sake: a stage gets its `resources`
        # cpus (OMP_NUM_THREADS in env), else torch's default, as it would with `dvc repro`
        base = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
        outcome = stream(name, repro_command(name), work, env, base)
        if outcome != "skipped":               # a skipped stage's outputs are those already in the remote
            git_or_dvc(name, ["dvc", "push", "-q", name], work, "push its outputs to the DVC remote")
        where = f"{os.uname().nodename}:{work}"
        return finished(outcome, {"outcome": outcome, "lock": lock_entry(work, name), "files": changed_files(work, job),
                                  "setup_s": setup_s}, where)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        # Ray ends a flow's worker processes once the flow disconnects: send the logs still queued now
        from prefect.logging.handlers import APILogWorker
        APILogWorker.drain_all(timeout=5)


def checkout(name: str, job: Job, work: Path, base: Path) -> None:
    """The flow's commit, its uncommitted files and dvc.lock; DVC's cache shared by the worker's stages."""
    git_or_dvc(name, ["git", "clone", "-q", "--no-checkout", job.git_url, "."], work,
               f"clone {job.git_url} (is it a git URL this worker can reach?)")
    git_or_dvc(name, ["git", "checkout", "-q", "--detach", job.commit], work,
               f"check out commit {job.commit[:12]} from {job.git_url}: push it there first (`git push`)")
    for rel, data in job.files.items():
        path = work / rel
        if data is None:
            path.unlink(missing_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    (work / "dvc.lock").write_text(job.lock) if job.lock else (work / "dvc.lock").unlink(missing_ok=True)
    # the remote, and a cache shared by every stage this worker runs (a parent model is fetched once)
    (work / ".dvc/config.local").write_text(f"[core]\n    remote = archflow\n['remote \"archflow\"']\n    url = {job.remote_url}\n"
                                            f"[cache]\n    dir = {base / 'dvc-cache'}\n")


def pull(name: str, job: Job, work: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "dvc", "pull", "-q", *job.pull], cwd=work, capture_output=True, text=True)
    missing = [p for p in job.pull if not (work / p).exists()]
    if r.returncode or missing:
        raise StageFailed(f"stage '{name}': its inputs {', '.join(missing) or ' '.join(job.pull)} are not in the DVC "
                          f"remote {job.remote_url}: push them from the project that built them "
                          f"(`dvc push {' '.join(missing or job.pull)}`), or rebuild them there"
                          + (f"\n{r.stderr.strip()[-2000:]}" if r.stderr.strip() else ""))


def git_or_dvc(name: str, cmd: list[str], work: Path, doing: str) -> None:
    full = [sys.executable, "-m", *cmd] if cmd[0] == "dvc" else cmd
    r = subprocess.run(full, cwd=work, capture_output=True, text=True)
    if r.returncode:
        raise StageFailed(f"stage '{name}': could not {doing}: `{' '.join(cmd)}` said: "
                          f"{(r.stderr or r.stdout).strip()[-2000:]}")


def lock_entry(work: Path, name: str) -> dict:
    from ruamel.yaml import YAML                       # DVC's own YAML library: there wherever DVC is

    return YAML(typ="safe", pure=True).load((work / "dvc.lock").read_text())["stages"][name]


def changed_files(work: Path, job: Job) -> dict[str, bytes | None]:
    """Files the stage left that the remote does not hold: its uncached outputs (git-ignored ones
    too, like data/corpus.json) and whatever else git sees changed or new (.gitignore entries DVC
    added, models/dvc.yaml). Files that came from the flow unchanged are left out; dvc.lock goes as its entry."""
    r = subprocess.run(["git", "status", "--porcelain", "-z", "--untracked-files=all"],
                       cwd=work, capture_output=True, text=True, check=True)
    paths = [item[3:] for item in r.stdout.split("\0") if len(item) > 3]
    for out in map(Path, job.uncached):
        paths += [str(f.relative_to(work)) for f in ([work / out] if (work / out).is_file() else
                                                     (work / out).rglob("*")) if f.is_file()]
    files = {}
    for rel in paths:
        if rel == "dvc.lock" or rel.startswith(".dvc/"):
            continue
        data = (work / rel).read_bytes() if (work / rel).is_file() else None
        if job.files.get(rel, ...) != data:
            files[rel] = data
    return files
