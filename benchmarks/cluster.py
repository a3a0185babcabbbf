"""What a stage costs when it travels to a Dask worker (`--task-runner dask`) instead of running here.

    python -m benchmarks.cluster                       # both parts below
    python -m benchmarks.cluster --only tiny --stages 6 --shape chain --rounds 2
    python -m benchmarks.cluster --only smoke --subset "evaluate@serial evaluate@parallel"
    python -m benchmarks.cluster --only smoke --subset all       # the whole smoke study (53 stages, long;
                                                                 # on Dask it fails preflight: upcycle's deps)

Options:
  --only tiny|smoke  run one part only (default: both, tiny first)
  --stages N         tiny part: number of trivial stages (default 6)
  --shape chain|fanout  tiny part: s0 -> s1 -> ... (each reads its parent's DVC-cached output, so a
                     travelling stage pulls it), or s0 -> {s1..sN-1} (default chain)
  --rounds R         tiny part: interleaved rounds of thread vs dask, order alternating (default 2)
  --workers W        Dask workers in the local cluster (`dask worker --nthreads 1` each, cwd an empty
                     directory: tests/flows/clusters.py); the flows run with --max-parallel W (default 2)
  --subset TARGETS   smoke part: the targets (space-separated) whose upstream is built, or `all`
                     (default: evaluate@serial evaluate@parallel evaluate-compress@serial-int8)
  --contenders LIST  smoke part: any of dvc,thread,dask, run in that order (default dask,dvc,thread)

Set-up shared by every run and not timed: one `prefect server start` and one `mlflow server` on
loopback (the flows and `dvc repro` track into it), a fresh project per run (git repo committed,
pushed to a bare `origin.git`, a directory DVC remote) and, per dask run, a fresh local Dask cluster
whose workers keep their clones and DVC cache in a fresh ARCHFLOW_WORK_DIR (a cold cache).

1. tiny: N stages `python stage.py` (tests/flows/conftest.py's), each writing a small file, through
   `python -m flows.pipeline --max-parallel W` with the thread runner vs `--task-runner dask
   --address <cluster>`. Timed: the flow's wall time (the process, from start to exit), and per stage:
   - `flow sees`: submit -> result in the flow (its Outcome.seconds);
   - `task`: the Prefect task run's start -> end (the Prefect API's task run);
   - `setup` (dask): task start -> the worker's "working copy ... ready in X s" log line, and
     `setup_logged`: that X (clone + overlay + `dvc pull` of its inputs, as the worker timed it);
   - `repro`: setup done (thread: task start) -> the last line `dvc repro` printed (log timestamps);
   - `after`: that line -> task end: `dvc push`, the dvc.lock entry and changed files, removing the
     working copy, draining the logs to the API (thread: DVC's process exit only);
   - `dispatch`: flow sees - task: Dask scheduling, (de)serializing, the task run's creation and
     its result coming back;
   - `bring back` (dask): Away.bring_back in the flow (files, dvc.lock entry), and `job`: Away.job
     (dvc.lock and `git status` read for each stage's Job);
   and once per flow: `dvc pull` at the end (Away.pull_here) and the worker probe (check_workers).
   The flow-side parts are timed by wrapping flows.pipeline's functions in the flow's process
   (instrumented_flow runs flows.pipeline.main); flows/ is not changed.
2. smoke: the smoke study (tests/smoke/params.yaml) built from nothing by `dvc repro <targets>`, the
   flow with threads (--max-parallel W) and the flow on the W-worker Dask cluster, once each, in
   fresh copies; the stage count printed is what the flow plans for the targets.

Run from the project root with the project's venv; prints tables and a host line. The machine's
load changes the numbers: say how loaded it was when you quote them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
QUIET = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
         "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
# no upcycle stage (evaluate-upcycle@...): on Dask the flow refuses them (README, "Stages on a Dask cluster")
DEFAULT_SUBSET = "evaluate@serial evaluate@parallel evaluate-compress@serial-int8"
TIMES_ENV = "ARCHFLOW_BENCH_TIMES"


# ---------------------------------------------------------------- the flow's process, instrumented

def instrumented_flow(argv: list[str]) -> int:
    """flows.pipeline.main(argv) with its flow-side steps timed into the JSON file $ARCHFLOW_BENCH_TIMES."""
    t0 = time.perf_counter()
    import flows.pipeline as fp

    times = {"bring_back": {}, "job": {}, "pull_here": 0.0, "probe": 0.0, "outcomes": {}, "flow_run_id": None}

    def timed(fn, record):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                record(args, time.perf_counter() - start)
        return wrapper

    fp.Away.bring_back = timed(fp.Away.bring_back, lambda a, s: times["bring_back"].__setitem__(a[1], s))
    fp.Away.job = timed(fp.Away.job, lambda a, s: times["job"].__setitem__(a[2], s))
    fp.Away.pull_here = timed(fp.Away.pull_here, lambda a, s: times.__setitem__("pull_here", s))
    fp.check_workers = timed(fp.check_workers, lambda a, s: times.__setitem__("probe", s))
    run_stages = fp.run_stages

    def run_stages_timed(*args, **kwargs):
        times["flow_run_id"] = fp.flow_run_id()
        times["stages_start"] = time.perf_counter() - t0
        outcomes = run_stages(*args, **kwargs)
        times["stages_end"] = time.perf_counter() - t0
        times["outcomes"] = {n: [o.status, o.seconds] for n, o in outcomes.items()}
        return outcomes
    fp.run_stages = run_stages_timed
    try:
        return fp.main(argv)
    except fp.ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        times["total_in_process"] = time.perf_counter() - t0
        Path(os.environ[TIMES_ENV]).write_text(json.dumps(times))


# ---------------------------------------------------------------- servers, projects, runs

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    import httpx
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def server(cmd: list[str], health: str, home: Path, env: dict, name: str):
    log = (home / f"{name}.log").open("w")
    proc = subprocess.Popen(cmd, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not answers(health):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{name} did not start:\n{(home / f'{name}.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
        if proc.poll() is None:
            proc.kill()
        log.close()


@contextlib.contextmanager
def servers(tmp: Path):
    """(PREFECT_API_URL, MLFLOW_TRACKING_URI) of a `prefect server` and an `mlflow server` on loopback."""
    env = {**os.environ, **QUIET, "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_UI_ENABLED": "false",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("PREFECT_API_URL", None)
    (tmp / "prefect-home").mkdir()
    pp, mp = free_port(), free_port()
    api, mlflow = f"http://127.0.0.1:{pp}/api", f"http://127.0.0.1:{mp}"
    with server([BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(pp)], f"{api}/health",
                tmp, env, "prefect-server"), \
         server([BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", str(mp), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination",
                 str(tmp / "mlflow-artifacts")], f"{mlflow}/health", tmp, env, "mlflow-server"):
        yield api, mlflow


def sh(cwd: Path, *cmd, env=None) -> str:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed in {cwd}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout


def publish(project: Path, base: Path) -> Path:
    """Commit the project, give it a directory DVC remote and a bare `origin` (as tests/flows/test_cluster.py)."""
    env = {**os.environ, **QUIET, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    (base / "remote").mkdir()
    sh(base, "git", "init", "-q", "--bare", "origin.git")
    sh(project, sys.executable, "-m", "dvc", "remote", "add", "-d", "storage", base / "remote", env=env)
    sh(project, "git", "add", "-A")
    sh(project, "git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "bench", "--allow-empty")
    sh(project, "git", "remote", "add", "origin", base / "origin.git")
    sh(project, "git", "push", "-q", "origin", "HEAD:main")
    return project


def tiny_project(base: Path, n: int, shape: str) -> Path:
    from tests.flows.conftest import make_project, stage

    stages = "".join(stage(f"s{i}", deps=[] if i == 0 else [f"out/s{i - 1 if shape == 'chain' else 0}.txt"])
                     for i in range(n))
    return publish(make_project(base / "project", stages), base)


def smoke_project(base: Path) -> Path:
    from benchmarks.flow_vs_dvc import copy_project

    (base / "project").mkdir(parents=True)
    return publish(copy_project(base / "project"), base)


def run_env(api: str, mlflow: str, times: Path | None = None) -> dict:
    env = {**os.environ, **QUIET, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_API_URL": api,
           "MLFLOW_TRACKING_URI": mlflow}
    if times:
        env[TIMES_ENV] = str(times)
    return env


def timed_run(cmd: list[str], cwd: Path, env: dict, log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("w") as f:
        r = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}) in {cwd}; the end of {log}:\n"
                           + log.read_text()[-4000:])
    return seconds


def flow_cmd(targets: list[str], workers: int, address: str | None) -> list[str]:
    # flows.pipeline.main in a process whose cwd is the project, benchmarks/ importable from here
    # (not through PYTHONPATH, which the stages' own processes would inherit)
    run = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.cluster import instrumented_flow; " \
          "sys.exit(instrumented_flow(sys.argv[1:]))"
    cmd = [sys.executable, "-c", run, *targets, "--max-parallel", str(workers)]
    return cmd + (["--task-runner", "dask", "--address", address] if address else [])


@contextlib.contextmanager
def cluster(base: Path, workers: int):
    """A fresh local Dask cluster whose workers use a fresh ARCHFLOW_WORK_DIR (clones, DVC cache)."""
    from tests.flows.clusters import dask_cluster

    old = os.environ.get("ARCHFLOW_WORK_DIR")
    os.environ["ARCHFLOW_WORK_DIR"] = str(base / "archflow-work")
    try:
        with dask_cluster(base / "dask", workers=workers) as address:
            yield address
    finally:
        if old is None:
            os.environ.pop("ARCHFLOW_WORK_DIR", None)
        else:
            os.environ["ARCHFLOW_WORK_DIR"] = old


# ---------------------------------------------------------------- what the Prefect API recorded

ENGINE = re.compile(r"^(Finished in state|Created task run|Executing|Beginning|Task run .* received)")


def task_breakdown(api: str, flow_run_id: str, dump: Path | None = None) -> dict[str, dict]:
    """stage -> {task, setup, repro, after} seconds, from the task runs and their logs' timestamps."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    time.sleep(2)                                    # logs still in flight
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), limit=200)
        logs, offset = [], 0
        while True:
            page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200,
                                    offset=offset, sort=LogSort.TIMESTAMP_ASC)
            logs += page
            offset += len(page)
            if len(page) < 200:
                break
    if dump:
        names = {tr.id: tr.name for tr in runs}
        dump.write_text("".join(f"{lg.timestamp.isoformat()} {names.get(lg.task_run_id, '-')} {lg.name}: {lg.message}\n"
                                for lg in logs))
    out = {}
    for tr in runs:
        if not tr.start_time or not tr.end_time:
            continue
        mine = [lg for lg in logs if lg.task_run_id == tr.id and not ENGINE.match(lg.message)]
        ready = next((lg for lg in mine if lg.message.startswith("working copy ")), None)
        start, end = tr.start_time.timestamp(), tr.end_time.timestamp()
        setup_from = ready.timestamp.timestamp() if ready else start
        last = mine[-1].timestamp.timestamp() if mine else end
        row = {"task": end - start, "setup": setup_from - start if ready else 0.0,
               "setup_logged": float(re.search(r"ready in ([\d.]+) s", ready.message).group(1)) if ready else 0.0,
               "repro": last - setup_from, "after": end - last}
        out[tr.name] = row
    return out


# ---------------------------------------------------------------- part 1: tiny stages

COLUMNS = ("flow sees", "task", "setup", "setup_logged", "repro", "after", "dispatch", "job", "bring back")


def one_tiny_run(base: Path, kind: str, args, api: str, mlflow: str) -> dict:
    base.mkdir(parents=True)
    project = tiny_project(base, args.stages, args.shape)
    times = base / "times.json"
    env = run_env(api, mlflow, times)
    if kind == "thread":
        wall = timed_run(flow_cmd([], args.workers, None), project, env, base / "flow.log")
    else:
        with cluster(base, args.workers) as address:
            wall = timed_run(flow_cmd([], args.workers, address), project, env, base / "flow.log")
    t = json.loads(times.read_text())
    per = task_breakdown(api, t["flow_run_id"], base / "prefect-logs.txt")
    stages = {}
    for name, (status, seconds) in t["outcomes"].items():
        assert status == "ran", f"{kind}: stage {name} {status}; see {base / 'flow.log'}"
        p = per.get(name, {})
        stages[name] = {"flow sees": seconds, **p, "dispatch": seconds - p.get("task", 0.0),
                        "job": t["job"].get(name, 0.0), "bring back": t["bring_back"].get(name, 0.0)}
    before = t["stages_start"]
    return {"wall": wall, "stages": stages, "pull_here": t["pull_here"], "probe": t["probe"],
            "before_stages": before, "stages_span": t["stages_end"] - t["stages_start"],
            "after_stages": t["total_in_process"] - t["stages_end"]}


def tiny(args, api: str, mlflow: str, tmp: Path) -> None:
    print(f"\n## tiny: {args.stages} trivial stages, {args.shape}, {args.workers} Dask workers, "
          f"--max-parallel {args.workers}, {args.rounds} rounds")
    results = {"thread": [], "dask": []}
    for i in range(args.rounds):
        for kind in (("thread", "dask") if i % 2 == 0 else ("dask", "thread")):
            r = one_tiny_run(tmp / f"tiny-{i}-{kind}", kind, args, api, mlflow)
            results[kind].append(r)
            print(f"round {i + 1} {kind}: flow {r['wall']:.1f} s (before stages {r['before_stages']:.1f} s, "
                  f"stages {r['stages_span']:.1f} s, after {r['after_stages']:.1f} s; probe {r['probe']:.1f} s, "
                  f"end pull {r['pull_here']:.1f} s)", flush=True)
    med = lambda xs: statistics.median(xs) if xs else 0.0
    print("\n| runner | flow wall s | before stages s | stages s | after stages s | probe s | end `dvc pull` s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, rs in results.items():
        print(f"| {kind} | {med([r['wall'] for r in rs]):.1f} | {med([r['before_stages'] for r in rs]):.1f} | "
              f"{med([r['stages_span'] for r in rs]):.1f} | {med([r['after_stages'] for r in rs]):.1f} | "
              f"{med([r['probe'] for r in rs]):.1f} | {med([r['pull_here'] for r in rs]):.1f} |")
    for title, stat in (("median over stages and rounds (seconds)", med),
                        ("max over stages and rounds (the first stage on a cold worker, mostly)", max)):
        print(f"\nper stage, {title}:\n")
        print("| runner | " + " | ".join(COLUMNS) + " |")
        print("|---|" + "---:|" * len(COLUMNS))
        for kind, rs in results.items():
            cells = [stat([s.get(c, 0.0) for r in rs for s in r["stages"].values()]) for c in COLUMNS]
            print(f"| {kind} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    walls = [d["wall"] - t["wall"] for t, d in zip(results["thread"], results["dask"])]
    per_stage = med(walls) / args.stages
    print(f"\ndask - thread flow wall: median {med(walls):.1f} s, {per_stage:.2f} s a stage "
          f"({'a chain: stages run one after another' if args.shape == 'chain' else 'fan-out'})")


# ---------------------------------------------------------------- part 2: the smoke study

def smoke_run(kind: str, targets: list[str], workers: int, project: Path, env: dict, base: Path) -> float:
    if kind == "dvc":
        return timed_run([sys.executable, "-m", "dvc", "repro", *targets], project, env, base / "run.log")
    if kind == "thread":
        return timed_run(flow_cmd(targets, workers, None), project, env, base / "run.log")
    with cluster(base, workers) as address:
        return timed_run(flow_cmd(targets, workers, address), project, env, base / "run.log")


def smoke(args, api: str, mlflow: str, tmp: Path) -> None:
    targets = [] if args.subset.strip() == "all" else args.subset.split()
    rows = []
    for kind in args.contenders.split(","):
        base = tmp / f"smoke-{kind}"
        base.mkdir()
        project = smoke_project(base)
        env = run_env(api, mlflow, base / "times.json")
        if not rows:
            count = len(sh(project, sys.executable, "-c", "import sys; from flows.pipeline import plan_stages; "
                           "print('\\n'.join(plan_stages(sys.argv[1:]).order))", *targets, env=env).split())
            print(f"\n## smoke: targets {' '.join(targets) or 'all'}: {count} stages; {args.workers} Dask workers, "
                  f"flows --max-parallel {args.workers}", flush=True)
        try:
            wall = smoke_run(kind, targets, args.workers, project, env, base)
        except RuntimeError as e:                    # one contender failing does not stop the others
            print(f"{kind}: FAILED: {e}", flush=True)
            rows.append((kind, None, None))
            continue
        rows.append((kind, wall, None if kind == "dvc" else json.loads((base / "times.json").read_text())))
        print(f"{kind}: {wall:.1f} s", flush=True)
    dvc = next((w for k, w, _ in rows if k == "dvc" and w), None)
    print("\n| run | wall s | x dvc repro | stages ran | sum of task runs s | sum setup s | sum after s | "
          "end `dvc pull` s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind, wall, t in rows:
        if wall is None:
            print(f"| {kind} | failed | | | | | | |")
            continue
        ratio = f"{wall / dvc:.2f}" if dvc else ""
        if t is None:
            print(f"| `dvc repro` | {wall:.1f} | {ratio} | | | | | |")
            continue
        per = task_breakdown(api, t["flow_run_id"], tmp / f"smoke-{kind}" / "prefect-logs.txt")
        ran = sum(1 for s, _ in t["outcomes"].values() if s in ("ran", "restored"))
        total = lambda c: sum(p[c] for n, p in per.items() if n in t["outcomes"])
        name = "flow, threads" if kind == "thread" else f"flow, Dask ({args.workers} workers)"
        print(f"| {name} | {wall:.1f} | {ratio} | {ran}/{len(t['outcomes'])} | {total('task'):.1f} | "
              f"{total('setup'):.1f} | {total('after'):.1f} | {t['pull_here']:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["tiny", "smoke"])
    p.add_argument("--stages", type=int, default=6)
    p.add_argument("--shape", choices=["chain", "fanout"], default="chain")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--subset", default=DEFAULT_SUBSET)
    p.add_argument("--contenders", default="dask,dvc,thread")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, projects) and print where")
    args = p.parse_args()
    from benchmarks.common import host_line

    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    t0 = time.perf_counter()
    try:
        with servers(tmp) as (api, mlflow):
            print(f"servers up in {time.perf_counter() - t0:.1f} s (not counted); temp dir {tmp}", flush=True)
            if args.only in (None, "tiny"):
                tiny(args, api, mlflow, tmp)
            if args.only in (None, "smoke"):
                smoke(args, api, mlflow, tmp)
    finally:
        print(f"\n{host_line()}")
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
