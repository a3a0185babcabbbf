"""Real local Dask and Ray clusters for tests, as subprocesses of the test run.

    with dask_cluster(tmp_path, workers=2, resources=[None, {"GPU": 1}]) as address:
        ...   # address: "tcp://127.0.0.1:<port>", for DaskTaskRunner(address=...)
    with ray_cluster(tmp_path, nodes=2, gpus=[0, 1]) as address:
        ...   # address: "127.0.0.1:<port>" (the GCS), for RayTaskRunner(address=...)

Each worker (Dask) or node (Ray) runs with its cwd a different empty directory, <tmp_path>/worker<i>,
so a task that relies on the flow's cwd fails there as it would on another machine. The console
scripts are those of the running interpreter's environment (`dask`, `ray` next to sys.executable).
Every process is started in a session of its own and its whole process group is killed on the way
out, also when the test fails or is interrupted: nothing is left running.

The clusters do not know the Prefect API: a flow sends its PREFECT_API_URL to the workers with each
task (Prefect serializes the settings context). It must be a real server (prefect_test_harness or
`prefect server start`): with Prefect's temporary server, each worker starts a temporary server of
its own, keeps the task's logs there and leaves it running (an orphan) when the worker stops.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

BIN = Path(sys.executable).parent
QUIET = {"DO_NOT_TRACK": "true", "RAY_USAGE_STATS_ENABLED": "0", "DASK_DISTRIBUTED__LOGGING__DISTRIBUTED": "warning"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reachable(address: str, timeout: float = 3.0) -> bool:
    """Whether something listens at a tcp://host:port, ray://host:port or host:port address."""
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}   # tasks bring theirs
    # where stages make their working copies and share a DVC cache (flows/travel.py): this cluster's own
    return {**env, **QUIET, "ARCHFLOW_WORK_DIR": str(tmp_path / "archflow-work")}


def _start(cmd: list, cwd: Path, log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _stop(procs: list[subprocess.Popen], sig: int, grace: float) -> None:
    """`sig` to each process, then SIGKILL to each process group once they exited or after `grace` s."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
    deadline = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.1, deadline - time.monotonic()))
    for p in procs:                            # the group: a nanny's worker, a raylet's workers...
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(5)


def _wait(ready, procs: list[subprocess.Popen], logs: list[Path], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for p, log in zip(procs, logs):
            if p.poll() is not None:
                raise RuntimeError(f"{what}: {p.args[:3]} exited ({p.returncode}):\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout:.0f} s; logs in {logs[0].parent}")
        time.sleep(0.2)


@contextlib.contextmanager
def dask_cluster(tmp_path: Path, workers: int = 2, resources: Optional[Sequence[Optional[dict]]] = None,
                 timeout: float = 60) -> Iterator[str]:
    """A `dask scheduler` and `workers` × `dask worker --nworkers 1 --nthreads 1`; yields the address.

    resources: one entry per worker, e.g. [None, {"GPU": 1}] (`dask worker --resources GPU=1`): a task
    submitted under `dask.annotate(resources={"GPU": 1})` runs only on the second worker.
    """
    import distributed

    resources = list(resources or [None] * workers)
    assert len(resources) == workers, "one resources entry per worker"
    port, env = free_port(), _env(tmp_path)
    address = f"tcp://127.0.0.1:{port}"
    logs_dir = tmp_path / "dask-logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    procs, logs = [], [logs_dir / "scheduler.log"]
    try:
        procs.append(_start([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard",
                             "--no-show"], tmp_path, logs[0], env))
        for i, res in enumerate(resources):
            cwd = tmp_path / f"worker{i}"
            cwd.mkdir()
            cmd = [BIN / "dask", "worker", address, "--name", f"worker{i}", "--nworkers", "1", "--nthreads", "1",
                   "--no-dashboard", "--death-timeout", "30", "--local-directory", tempfile.mkdtemp(dir=logs_dir)]
            if res:
                cmd += ["--resources", " ".join(f"{k}={v}" for k, v in res.items())]
            logs.append(logs_dir / f"worker{i}.log")
            procs.append(_start(cmd, cwd, logs[-1], env))
        _wait(lambda: reachable(address, 0.5), procs, logs, timeout, "dask scheduler")
        with distributed.Client(address, timeout=timeout) as client:
            client.wait_for_workers(workers, timeout=timeout)
        yield address
    finally:
        if procs and procs[0].poll() is None:   # the scheduler tells its workers to exit (~3 s)
            with contextlib.suppress(Exception), distributed.Client(address, timeout=5) as client:
                client.shutdown()
            deadline = time.monotonic() + 6
            for p in procs:                    # SIGTERM meanwhile would slow the workers down (8 s)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(max(0.1, deadline - time.monotonic()))
        _stop(procs, signal.SIGTERM, grace=10)


@contextlib.contextmanager
def ray_cluster(tmp_path: Path, nodes: int = 2, cpus: int = 1, gpus: Optional[Sequence[int]] = None,
                resources: Optional[Sequence[Optional[dict]]] = None, timeout: float = 90) -> Iterator[str]:
    """A head (`ray start --head --block`) and nodes-1 more nodes, `cpus` CPUs each; yields the GCS address.

    gpus / resources: one entry per node (`--num-gpus`, `--resources`); the head also has {"head": 1}.
    Ray's temp dir (sockets, logs) is a short /tmp/ray-* dir (unix socket paths must stay under 108
    bytes, too short for pytest's tmp_path), removed on the way out; the logs are copied to tmp_path.
    """
    import ray

    gpus = list(gpus or [0] * nodes)
    resources = list(resources or [None] * nodes)
    assert len(gpus) == nodes and len(resources) == nodes, "one entry per node"
    port, env = free_port(), _env(tmp_path)
    address = f"127.0.0.1:{port}"
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    logs_dir = tmp_path / "ray-logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    common = ["--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
              "--num-cpus", cpus, "--object-store-memory", 100 * 2**20]
    procs, logs = [], []
    try:
        for i in range(nodes):
            cwd = tmp_path / f"worker{i}"
            cwd.mkdir()
            res = {**(resources[i] or {}), **({"head": 1} if i == 0 else {})}
            role = (["--head", "--port", port, "--temp-dir", temp_dir, "--include-dashboard=false",
                     "--ray-client-server-port", free_port()] if i == 0 else ["--address", address])
            logs.append(logs_dir / f"node{i}.log")
            procs.append(_start([BIN / "ray", "start", *role, *common, "--num-gpus", gpus[i],
                                 "--resources", json.dumps(res)], cwd, logs[-1], env))
            if i == 0:                        # the other nodes need the head's GCS
                _wait(lambda: reachable(address, 0.5), procs, logs, timeout, "ray head")

        started = lambda: all("Ray runtime started" in log.read_text(errors="replace") for log in logs)
        _wait(started, procs, logs, timeout, "ray nodes")   # `ray start` says so once its raylet is up
        yield address
    finally:
        if ray.is_initialized():              # a driver left connected by the test
            with contextlib.suppress(Exception):
                ray.shutdown()
        _stop(procs[::-1], signal.SIGINT, grace=15)   # SIGINT: `ray start --block` stops its processes
        for log in temp_dir.glob("session_latest/logs/*"):
            with contextlib.suppress(OSError):
                (logs_dir / log.name).write_bytes(log.read_bytes())
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)
