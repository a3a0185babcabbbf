"""SIGKILL during every kind of training stage: the rerun resumes from a checkpoint strictly inside
the run and ends with the weights (bit for bit) and the training curve of an uninterrupted run; a
killed stage never leaves a model directory behind.

    .venv/bin/python -m pytest tests/faults -q

Each stage kind (pretrain, branch, upcycle sparse and bam, distill, compress with recovery) first
runs uninterrupted in this process (the reference), then as DVC runs it, a fresh process, killed at
a random moment after a checkpoint was written, and run again to the end. pretrain is killed twice,
the second time while it resumes: every kind resumes through the same `fit` (components/lit.py), so
a resumed run's own checkpoints are tested once, not once a kind (each kill is a process start).
"""
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from tasks import branch, compress, distill, prepare, pretrain, upcycle
from tests.tasks.tiny_corpus import write_domain_corpus

ROOT = Path(__file__).resolve().parents[2]
STEPS, CKPT_EVERY = 120, 10
PARAMS = f"""\
study: {{name: faults, seed: 3}}
data: {{source: corpus, include: ["*/*.txt"], tokenizer: byte, val_fraction: 0.1,
       domains: {{a: ["a/*.txt"], b: ["b/*.txt"]}}}}
model: {{block_size: 32, n_layer: 2, n_head: 4, n_embd: 32, ffn: swiglu, norm: rmsnorm, pos: rope}}
train: {{max_steps: {STEPS}, batch_size: 8, lr: 3.0e-3, min_lr: 3.0e-4, warmup_steps: 2, eval_every: 50,
        eval_batches: 2, ckpt_every: {CKPT_EVERY}, accelerator: cpu, devices: 1}}
pretrain:
  variants:
    parallel: {{block: parallel}}
branch:
  par-a: {{parent: parallel, domain: a}}
  par-b: {{parent: parallel, domain: b, max_steps: 2}}
upcycle:
  sparse: {{parent: parallel, method: sparse, n_expert: 2, top_k: 1, router: softmax-topk}}
  bam: {{parent: parallel, method: bam, top_k: 1, router: softmax-topk, moa: kv-shared}}
distill:
  student: {{teacher: parallel, student: {{n_layer: 1}}}}
compress:
  pruned: {{source: parallel, method: prune, fraction: 0.25, criterion: magnitude, recover: train}}
evaluate: {{prompt_tokens: 16, decode_tokens: 8}}
"""
# stage module, entry name, where its model lands
KINDS = {"pretrain": (pretrain, "parallel", "models/parallel"),
         "branch": (branch, "par-a", "branches/parallel/par-a"),
         "upcycle-sparse": (upcycle, "sparse", "models/sparse"),
         "upcycle-bam": (upcycle, "bam", "models/bam"),
         "distill": (distill, "student", "models/student"),
         "compress": (compress, "pruned", "models/pruned")}
KILLS = {"pretrain": 2}                   # kills before the run that ends; the other kinds: 1


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A prepared tiny study with two domains, its parent and the second branch built."""
    root = tmp_path_factory.mktemp("faults")
    write_domain_corpus(root)
    (root / "params.yaml").write_text(PARAMS)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        prepare.main([])
        pretrain.main(["parallel"])
        branch.main(["par-b"])
    return root


def start(root: Path, module: str, name: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    return subprocess.Popen([sys.executable, "-m", module, name], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def kill_after_checkpoints(proc: subprocess.Popen, ckpt: Path, rng: random.Random) -> str:
    """SIGKILL `proc` a random moment (0-50 ms) after it wrote its 1st, 2nd or 3rd checkpoint (picked at
    random): never before the first, and far enough from the end that the kill lands inside the run."""
    writes, seen = rng.randint(1, 3), inode(ckpt)
    while proc.poll() is None and writes:
        now = inode(ckpt)                                   # each checkpoint replaces the file: a new inode
        if now is not None and now != seen:
            writes, seen = writes - 1, now
        time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.05))
    proc.send_signal(signal.SIGKILL)
    return proc.communicate()[0]


@pytest.mark.parametrize("kind", KINDS)
def test_a_killed_stage_resumes_to_the_weights_of_an_uninterrupted_run(study, kind, monkeypatch, fault):
    module, name, out = KINDS[kind]
    monkeypatch.chdir(study)
    if kind == "upcycle-bam" and not (study / "branches/parallel/par-a").exists():
        branch.main(["par-a"])                          # bam mixes the parent's branches
    module.main([name])
    reference = load_file(study / out / "model.safetensors")
    reference_curve = pd.read_csv(study / out / "curve.csv")
    shutil.rmtree(study / out)

    rng, ckpt = random.Random(kind), study / "checkpoints" / name / "last.ckpt"
    kills = KILLS.get(kind, 1)
    for kill in range(kills):
        log = kill_after_checkpoints(start(study, module.__name__, name), ckpt, rng)
        fault(f"SIGKILL {kind} mid-training ({kill + 1} of {kills})")
        assert not (study / out).exists(), f"kill {kill + 1} came after the model was written:\n{log[-2000:]}"
        assert ckpt.exists(), f"no checkpoint before kill {kill + 1}:\n{log[-2000:]}"

    resumed = start(study, module.__name__, name)
    log = resumed.communicate()[0]
    assert resumed.returncode == 0, log
    step = int(re.search(r"resuming from .* at step (\d+)", log).group(1))
    assert 0 < step < STEPS and step % CKPT_EVERY == 0, log
    weights = load_file(study / out / "model.safetensors")
    assert weights.keys() == reference.keys()
    assert all(weights[k].equal(reference[k]) for k in reference), f"{kind}: resumed weights differ"
    pd.testing.assert_frame_equal(pd.read_csv(study / out / "curve.csv"),
                                  reference_curve)       # rows and partial sums survive the kills too
    assert not ckpt.parent.exists()                     # removed once the model is written


def test_a_stage_killed_while_saving_leaves_no_partial_model_and_reruns_cleanly(study, monkeypatch, fault):
    """A kill between writing the temp directory and swapping it in leaves a half-written
    `.student.tmp-<pid>` and no model (the old one was removed, the new one not yet in place): the
    rerun writes the model whole and removes the leftover."""
    monkeypatch.chdir(study)
    out = study / "models/student"
    leftover = study / "models/.student.tmp-999999"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half a")
    shutil.rmtree(out, ignore_errors=True)
    fault("killed while saving the model directory")
    distill.main(["student"])
    assert sorted(f.name for f in out.iterdir()) == ["config.json", "curve.csv", "meta.json", "model.safetensors"]
    assert load_file(out / "model.safetensors")                      # whole: safetensors checks its header
    assert not list(out.parent.glob(".student.tmp-*"))
