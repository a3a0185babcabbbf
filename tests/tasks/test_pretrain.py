"""pretrain@<variant> on a tiny corpus: pinned first losses, outputs, the same bytes from a rerun (the
time in metrics/train/), checkpoints of other inputs or holding code ignored, DDP on 2 CPU processes
(resume after SIGKILL: tests/faults).

    .venv/bin/python -m pytest tests/tasks/test_pretrain.py -q
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from tasks import prepare, pretrain
from tests.tasks.tiny_corpus import write_corpus

ROOT = Path(__file__).resolve().parents[2]
PARAMS = """\
study: {{name: tiny, seed: 7}}
data: {{source: corpus, include: ["*.txt"], tokenizer: byte, val_fraction: 0.1}}
model: {{block_size: 32, n_layer: 2, n_head: 4, n_embd: 32, ffn: swiglu, norm: rmsnorm, pos: rope}}
train: {{max_steps: {max_steps}, batch_size: 8, lr: 3.0e-3, min_lr: 3.0e-4, warmup_steps: 2, eval_every: {eval_every},
        eval_batches: 2, ckpt_every: {ckpt_every}, accelerator: cpu, devices: {devices}, strategy: {strategy}}}
pretrain:
  variants:
    serial: {{block: serial}}
    gqa: {{block: parallel, n_kv_head: 2}}
evaluate: {{prompt_tokens: 16, decode_tokens: 8}}
"""


def write_params(root: Path, max_steps=4, eval_every=1, ckpt_every=100, devices=1, strategy="auto"):
    (root / "params.yaml").write_text(PARAMS.format(max_steps=max_steps, eval_every=eval_every,
                                                    ckpt_every=ckpt_every, devices=devices, strategy=strategy))


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A prepared tiny study in tmp_path (the cwd), on made-up but deterministic text."""
    write_corpus(tmp_path)
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    prepare.main([])
    return tmp_path


def curve(root, name="serial") -> pd.DataFrame:
    return pd.read_csv(root / "models" / name / "curve.csv")


def run_stage(root, *args, **kw):
    """The stage as DVC runs it: a fresh process in the project root."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tasks.pretrain", *args], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_first_losses_are_pinned(project):
    pretrain.main(["serial"])
    losses = curve(project)["train_loss"].tolist()
    # Pinned on torch 2.13 CPU: a change here means the model, init, data order or optimizer changed.
    assert losses == pytest.approx([5.55431, 5.44531, 5.21836, 5.02233], abs=1e-3)


def test_outputs_explain_themselves(project):
    pretrain.main(["gqa"])
    out = project / "models" / "gqa"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "curve.csv", "meta.json", "model.safetensors"]
    config, meta = json.loads((out / "config.json").read_text()), json.loads((out / "meta.json").read_text())
    assert (config["block"], config["n_kv_head"], config["vocab_size"]) == ("parallel", 2, 257)
    assert meta["stage"] == "pretrain" and meta["parents"] == [] and meta["tokens_seen"] == 4 * 8 * 32
    data_meta = json.loads((project / "data/prepared/meta.json").read_text())
    assert meta["data_sha256"] == data_meta["sha256"]
    assert list(curve(project, "gqa")["step"]) == [1, 2, 3, 4]
    assert not (project / "checkpoints" / "gqa").exists()      # removed once the model is written
    run = mlflow.search_runs(experiment_names=["tiny"], output_format="list")[0]
    assert run.data.tags["stage"] == "pretrain" and run.data.tags["model"] == "gqa"
    assert run.data.params["model.n_kv_head"] == "2" and run.data.params["train.max_steps"] == "4"
    assert run.data.metrics["final_val_loss"] == pytest.approx(curve(project, "gqa")["val_loss"].iloc[-1])
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in history] == [1, 2, 3, 4]


def test_a_rerun_writes_the_same_bytes_and_the_time_apart(project):
    """DVC hashes models/<name>/: the same inputs must give the same bytes, so `dvc repro -f` changes
    no hash downstream. The wall-clock time, which differs every run, is a metric outside it."""
    out = project / "models" / "serial"
    pretrain.main(["serial"])
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    pretrain.main(["serial"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert "tokens_per_s" not in curve(project).columns
    assert "train_seconds" not in json.loads(first["meta.json"])
    timing = json.loads((project / "metrics/train/serial.json").read_text())
    assert timing["train_seconds"] > 0 and timing["tokens_per_s"] > 0
    assert (timing["device"], timing["world_size"], timing["precision"]) == ("cpu", 1, "32-true")


def test_checkpoint_of_other_params_is_ignored(project):
    write_params(project, max_steps=6, eval_every=3, ckpt_every=3)
    (project / "checkpoints/serial").mkdir(parents=True)
    # Readable, at step 3 of 6, but of other inputs: resuming from it would end after one row.
    torch.save({"global_step": 3, "params_hash": "other-params"}, project / "checkpoints/serial/last.ckpt")
    pretrain.main(["serial"])
    assert list(curve(project)["step"]) == [3, 6]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(project):
    """DDP re-executes the command on each rank; each rank takes half of every global batch."""
    write_params(project, max_steps=6, eval_every=3)
    single = run_stage(project, "serial").communicate()[0]
    single_curve = curve(project)
    write_params(project, max_steps=6, eval_every=3, devices=2, strategy="ddp")
    proc = run_stage(project, "serial")
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    assert "pretrain@serial" in single
    # Same global batches, gradients averaged over ranks: same losses up to float reordering.
    assert curve(project)["val_loss"].tolist() == pytest.approx(single_curve["val_loss"].tolist(), rel=1e-4)
    runs = mlflow.search_runs(experiment_names=["tiny"], output_format="list")
    assert len(runs) == 3                                       # prepare, single-process run, DDP run: one each


class Planted:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_a_checkpoint_holding_code_is_not_run(project):
    write_params(project, max_steps=6, eval_every=3, ckpt_every=3)
    (project / "checkpoints/serial").mkdir(parents=True)
    marker = project / "code-ran"
    torch.save({"global_step": 3, "params_hash": "x", "payload": Planted(str(marker))},
               project / "checkpoints/serial/last.ckpt")
    pretrain.main(["serial"])
    assert not marker.exists()
    assert list(curve(project)["step"]) == [3, 6]              # trained from step 0, the file ignored
