"""The MLflow tracking server killed while a training stage runs: the stage stops with one message
naming the server and the fix, leaves its DVC outputs complete or absent, keeps its checkpoint, and
its rerun (server back up) resumes from that checkpoint to the weights of an uninterrupted run.

    .venv/bin/python -m pytest tests/faults/test_tracking_backend.py -q        # 1-2 minutes on 2 busy cores
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tasks import prepare, pretrain
from tests.faults.test_sigkill import inode
from tests.tasks.tiny_corpus import write_domain_corpus
from tests.test_mlflow_server import api, free_port

ROOT = Path(__file__).resolve().parents[2]
STEPS, CKPT_EVERY = 40, 10
PARAMS = f"""\
study: {{name: backend, seed: 3}}
data: {{source: corpus, include: ["*/*.txt"], tokenizer: byte, val_fraction: 0.1}}
model: {{block_size: 32, n_layer: 2, n_head: 4, n_embd: 32, ffn: swiglu, norm: rmsnorm, pos: rope}}
train: {{max_steps: {STEPS}, batch_size: 8, lr: 3.0e-3, min_lr: 3.0e-4, warmup_steps: 2, eval_every: 20,
        eval_batches: 2, ckpt_every: {CKPT_EVERY}, accelerator: cpu, devices: 1}}
pretrain:
  variants:
    parallel: {{block: parallel}}
evaluate: {{prompt_tokens: 16, decode_tokens: 8}}
"""
OUT, METRICS = Path("models/parallel"), Path("metrics/train/parallel.json")      # the stage's DVC outputs
CKPT = Path("checkpoints/parallel/last.ckpt")


def mlflow_server(home: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port, sqlite in `home`, in its own process group (killed whole)."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
         "--artifacts-destination", str(home / "artifacts")],
        cwd=home, env=env, stdout=open(home / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
    while True:
        assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.3)


def stage(root: Path, uri: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri}
    return subprocess.Popen([sys.executable, "-m", "tasks.pretrain", "parallel"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_killed_tracking_server_stops_the_stage_cleanly_and_the_rerun_resumes(tmp_path, monkeypatch, fault):
    study, home = tmp_path / "study", tmp_path / "server"
    study.mkdir(), home.mkdir()
    write_domain_corpus(study)
    (study / "params.yaml").write_text(PARAMS)
    monkeypatch.chdir(study)
    prepare.main([])
    pretrain.main(["parallel"])                             # the reference: uninterrupted, local sqlite
    reference = files(study / OUT)
    shutil.rmtree(study / OUT), (study / METRICS).unlink()

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = mlflow_server(home, port)
    proc, seen = stage(study, uri), inode(study / CKPT)
    while proc.poll() is None and inode(study / CKPT) == seen:   # its run is open once it checkpoints
        time.sleep(0.005)
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    fault("SIGKILL the MLflow tracking server mid-pretrain")
    out, err = proc.communicate(timeout=600)

    assert proc.returncode == 2 and "Traceback" not in out + err, out + err
    message = err.strip().splitlines()[-1]
    assert message.startswith(f"error: MLflow tracking backend {uri} stopped answering"), err
    assert "start the server again" in message and "rerun" in message, message
    assert [line for line in err.splitlines() if line.startswith("error:")] == [message], err
    # DVC's outputs: complete (the server died after they were written) or absent, never partial
    assert not (study / OUT).exists() or files(study / OUT) == reference, "a partial model directory"
    assert not (study / METRICS).exists() or "train_seconds" in json.loads((study / METRICS).read_text())
    assert not list((study / "models").glob(".*tmp*")), "a temporary model directory was left behind"
    assert (study / CKPT).exists(), "the checkpoint was deleted although logging failed"

    server = mlflow_server(home, port)                      # back up, same address and database
    try:
        rerun = stage(study, uri)
        out, err = rerun.communicate(timeout=600)
        assert rerun.returncode == 0, out + err
        step = int(re.search(r"resuming from .* at step (\d+)", out).group(1))
        assert 0 < step <= STEPS and step % CKPT_EVERY == 0, out
        assert files(study / OUT) == reference, "the resumed weights differ from an uninterrupted run's"
        assert not (study / CKPT).exists()                  # removed once logged
        experiment = api(uri, "experiments/get-by-name?experiment_name=backend")["experiment"]["experiment_id"]
        runs = api(uri, "runs/search", {"experiment_ids": [experiment], "filter": "tags.current = 'true'"})["runs"]
        assert [r["info"]["status"] for r in runs] == ["FINISHED"]
        assert "final_val_loss" in {m["key"] for m in runs[0]["data"]["metrics"]}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
