"""DVC's promise on a tiny study (a directory corpus, one 4-step model): the corpus is a dependency,
and sweeps (`dvc exp run`, queued or --temp) keep their results and their MLflow runs.

    .venv/bin/python -m pytest tests/test_dvc_study.py -q        # about two minutes; CI runs it
"""
import json
import os
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tests.tasks.tiny_corpus import write_domain_corpus
from tests.test_pipeline import make_repo, sh

TINY = """\
study: {name: tiny, seed: 1}
data: {source: corpus, include: ["**/*.txt"], domains: {a: ["a/*.txt"]}, tokenizer: byte, val_fraction: 0.1}
model: {block_size: 32, n_layer: 1, n_head: 2, n_embd: 32}
train: {max_steps: 4, batch_size: 4, lr: 1.0e-3, min_lr: 1.0e-4, warmup_steps: 1, eval_every: 2, eval_batches: 1,
        ckpt_every: 2}
pretrain: {variants: {a: {preset: serial}}}
import: {}
branch: {}
upcycle: {}
distill: {}
compress: {}
evaluate: {max_tokens: 512, batch_size: 2, prompt_tokens: 8, decode_tokens: 4, speed_warmup: 0, speed_runs: 1}
report: {comparisons: []}
"""
DOWNSTREAM = ["prepare", "pretrain@a", "evaluate@a", "report"]


def ran(out: str) -> list[str]:
    """The stages a `dvc repro`/`dvc exp run` output says it ran, in order."""
    return [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")]


@pytest.fixture(autouse=True)
def _mlflow_in_tmp(monkeypatch):
    """Overrides tests/conftest.py's: stages track into the project's own mlflow.db, the default."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # stages' `python`
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)            # the default: <project>/mlflow.db
    repo = tmp_path_factory.mktemp("tiny")
    write_domain_corpus(repo)
    make_repo(repo, TINY)                                      # commits the corpus too
    assert ran(sh(repo, "dvc", "repro").stdout) == ["validate", "corpus"] + DOWNSTREAM
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "built")
    yield repo
    mp.undo()


@pytest.mark.slow
def test_the_corpus_is_a_dependency(repo):
    doc = repo / "corpus/a/doc0.txt"
    text = doc.read_text()
    # unchanged corpus: only the manifest is checked (always_changed), nothing else reruns
    assert "corpus" in sh(repo, "dvc", "status").stdout
    assert ran(sh(repo, "dvc", "repro").stdout) == ["corpus"]

    # a line appended: once the manifest is checked, `dvc status` names prepare, and repro rebuilds it and all after it
    doc.write_text(text + "return x\n")
    sh(repo, "dvc", "repro", "corpus")
    assert "prepare:" in sh(repo, "dvc", "status").stdout
    assert ran(sh(repo, "dvc", "repro").stdout) == ["corpus"] + DOWNSTREAM

    # back to the corpus built before: restored from DVC's run cache (tests/tasks/test_prepare.py
    # shows the manifest also changes when a file is added, removed or renamed)
    doc.write_text(text)
    out = sh(repo, "dvc", "repro").stdout
    assert "Stage 'prepare' is cached - skipping run" in out and "pretrain@a" not in ran(out)
    assert sh(repo, "git", "status", "--porcelain").stdout == ""   # dvc.lock as committed: the same corpus


@pytest.mark.slow
def test_a_corpus_problem_stops_the_repro_before_any_compute(repo):
    doc = repo / "corpus/b/doc2.txt"
    text = doc.read_bytes()
    doc.write_bytes(text[:100] + b"\xff" + text[100:])
    r = sh(repo, "dvc", "repro", check=False)
    assert r.returncode != 0 and ran(r.stdout) == ["corpus"]
    assert "not UTF-8 text: b/doc2.txt (byte 100)" in r.stderr + r.stdout and "Traceback" not in r.stderr + r.stdout
    doc.write_bytes(text)
    assert ran(sh(repo, "dvc", "repro").stdout) == ["corpus"]


def mlflow_runs(repo, dvc_exp: str) -> list[tuple[str, str]]:
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["tiny"], filter_string=f"tags.dvc_exp = '{dvc_exp}'",
                              output_format="list")
    return sorted((r.data.tags["stage"], r.data.tags.get("model", "")) for r in runs)


@pytest.mark.slow
def test_queued_and_temporary_experiments_keep_their_results_and_mlflow_runs(repo):
    sh(repo, "dvc", "exp", "run", "--queue", "-n", "lr-2e-3", "-S", "train.lr=2.0e-3")
    sh(repo, "dvc", "queue", "start")
    deadline = time.time() + 600
    while "Success" not in (status := sh(repo, "dvc", "queue", "status").stdout):
        assert "Failed" not in status and time.time() < deadline, status + sh(repo, "dvc", "queue", "logs", "lr-2e-3",
                                                                              check=False).stdout
        time.sleep(2)
    sh(repo, "dvc", "queue", "stop", "--kill", check=False)
    sh(repo, "dvc", "exp", "run", "--temp", "-n", "lr-3e-3", "-S", "train.lr=3.0e-3")

    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)    # [workspace, baseline commit]
    exps = {e["name"]: e for e in shown[1]["experiments"]}
    for name, lr in (("lr-2e-3", 2e-3), ("lr-3e-3", 3e-3)):
        data = exps[name]["revs"][0]["data"]
        assert data["params"]["params.yaml"]["data"]["train"]["lr"] == lr
        assert data["metrics"]["metrics/a.json"]["data"]["val_loss"] > 0
        stages = mlflow_runs(repo, name)
        assert ("pretrain", "a") in stages and ("evaluate", "a") in stages and ("report", "") in stages
    assert not list((repo / ".dvc/tmp/exps").glob("*/mlflow.db"))     # nothing left in the temporary copies
    assert sh(repo, "git", "status", "--porcelain").stdout == ""          # the workspace is as it was
