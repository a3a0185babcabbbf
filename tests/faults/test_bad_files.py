"""Damaged inputs on a built DVC study: a stage that reads one stops with one message naming the
file, what is wrong and the fix (exit 2, no traceback), leaves its previous output as it was, and
DVC names the damaged output; the fix the message gives restores the study. A damaged training
checkpoint (not a DVC output) is ignored, said so, and training starts over to the same weights.
The first damage runs the stage as DVC does, a process of its own (its exit code and console); the
others call its main in this process (the same ParamsError that `cli` prints; ~5 s of start-up less
each). The checkpoint cases train, so they keep a process of their own (its thread count, its bytes).

    .venv/bin/python -m pytest tests/faults/test_bad_files.py -q        # about a minute
"""
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from components.errors import ParamsError
from tasks import distill as distill_stage
from tests.tasks.tiny_corpus import write_domain_corpus
from tests.test_pipeline import make_repo, sh

STUDY = """\
study: {name: bad-files, seed: 1}
data: {source: corpus, include: ["**/*.txt"], domains: {a: ["a/*.txt"]}, tokenizer: byte, val_fraction: 0.1}
model: {block_size: 32, n_layer: 2, n_head: 2, n_embd: 32}
train: {max_steps: 4, batch_size: 4, lr: 1.0e-3, min_lr: 1.0e-4, warmup_steps: 1, eval_every: 2, eval_batches: 1,
        ckpt_every: 2}
pretrain: {variants: {a: {preset: serial}}}
import: {}
branch: {}
upcycle: {}
distill: {s: {teacher: a, student: {n_layer: 1}}}
compress: {}
evaluate: {max_tokens: 512, batch_size: 2, prompt_tokens: 8, decode_tokens: 4, speed_warmup: 0, speed_runs: 1}
report: {comparisons: []}
"""
UP_TO_DATE = "corpus:\n\talways changed\n"      # `dvc status` of a built study: only the corpus check is due
# what is damaged -> (the file, the DVC output holding it, how)
DAMAGE = {"truncated token file": ("data/prepared/train.bin", "data/prepared", "truncate"),
          "damaged prepared meta.json": ("data/prepared/meta.json", "data/prepared", "not json"),
          "truncated teacher weights": ("models/a/model.safetensors", "models/a", "truncate"),
          "teacher config.json not JSON": ("models/a/config.json", "models/a", "not json"),
          "damaged teacher meta.json": ("models/a/meta.json", "models/a", "not json")}


@pytest.fixture(autouse=True)
def _mlflow_in_tmp(monkeypatch):
    """Overrides tests/conftest.py's: stages track into the project's own mlflow.db, the default."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The study built by `dvc repro`: a teacher `a` and its distilled student `s`."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # stages' `python`
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo = tmp_path_factory.mktemp("bad-files")
    write_domain_corpus(repo)
    make_repo(repo, STUDY)
    sh(repo, "dvc", "repro")
    yield repo
    mp.undo()


def distill(repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks.distill", "s"], cwd=repo, capture_output=True, text=True)


def digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_input_is_one_message_with_a_fix_that_works(repo, damage, fault, monkeypatch):
    file, out, how = DAMAGE[damage]
    path, student = repo / file, digests(repo / "models/s")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else b"{not json")
    fault(damage)

    status = sh(repo, "dvc", "status").stdout
    assert re.search(rf"modified:\s+{out}\n", status), status        # DVC names the damaged output

    if damage == next(iter(DAMAGE)):                                 # as DVC runs it
        r = distill(repo)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        message = r.stderr.strip()
    else:                                                            # what `cli` would print
        monkeypatch.chdir(repo)
        with pytest.raises(ParamsError) as e:
            distill_stage.main(["s"])
        message = f"error: {e.value}"
    assert message.startswith("error: ") and message.count("\n") == 0, message   # one line
    assert str(repo / file) in message or f"{out}/{Path(file).name}" in message, message
    assert digests(repo / "models/s") == student                     # the previous output, untouched

    fix = re.search(r"`(dvc checkout --force [^`]+)`", message).group(1)     # the fix the message gives works
    sh(repo, *fix.split())
    assert path.read_bytes() == data
    assert sh(repo, "dvc", "status").stdout == UP_TO_DATE


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["garbage", "cut short"])
def test_a_damaged_checkpoint_is_ignored_and_training_starts_over(repo, damage, fault):
    student = digests(repo / "models/s")
    ckpt = repo / "checkpoints/s/last.ckpt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    if damage == "garbage":
        ckpt.write_bytes(os.urandom(4096))
    else:                              # the first half of a real checkpoint file (a zip of tensors)
        import torch
        torch.save({"params_hash": "x", "global_step": 2, "state_dict": {"w": torch.zeros(64, 64)}}, ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    fault(f"{damage} checkpoint")

    r = distill(repo)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert f"ignoring unreadable checkpoint {Path('checkpoints/s/last.ckpt')}" in r.stdout, r.stdout
    assert digests(repo / "models/s") == student                     # retrained to the same bytes
    assert not ckpt.exists()
    assert "models/s" not in sh(repo, "dvc", "status").stdout      # DVC agrees (only the timings file changed)
