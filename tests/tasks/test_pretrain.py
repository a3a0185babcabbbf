"""pretrain@<variant> on a tiny corpus: pinned first losses, outputs, the same bytes from a rerun (the
time in metrics/train/), checkpoints of other inputs or holding code ignored, DDP on 2 CPU processes
(each rank half of the global batch), a batch of its own for every step of a longer run with pinned
losses (resume after SIGKILL: tests/faults).

    .venv/bin/python -m pytest tests/tasks/test_pretrain.py -q
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
import torch

from components import lit
from components.data import StepBatches
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
    assert meta["total_train_flops"] == meta["train_flops"] == 4 * 8 * 32 * meta["flops_per_token"] > 0
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


def test_checkpoint_of_other_params_is_ignored(project, monkeypatch, capsys):
    """A readable checkpoint made with another lr: resuming from it would give another curve."""
    write_params(project, max_steps=6, eval_every=3, ckpt_every=3)
    pretrain.main(["serial"])
    fresh = curve(project)
    # The other run: 3 steps at another lr, its step-3 checkpoint kept (the stage deletes it when done).
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace("max_steps: 6", "max_steps: 3").replace("lr: 3.0e-3", "lr: 1.0e-2"))
    with monkeypatch.context() as mp:
        mp.setattr(pretrain, "shutil", SimpleNamespace(rmtree=lambda *a, **kw: None))
        pretrain.main(["serial"])
    ckpt = project / "checkpoints/serial/last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 3     # readable, resumable
    (project / "params.yaml").write_text(params)
    capsys.readouterr()
    pretrain.main(["serial"])
    pd.testing.assert_frame_equal(curve(project), fresh)         # trained from step 0, as the fresh run
    assert "made with other params" in capsys.readouterr().out


def batch_of_rank(rank: int, world_size: int, step: int = 5) -> torch.Tensor:
    """The inputs (B / world_size, T) that the data module gives DDP rank `rank` at `step`."""
    data = lit.LMDataModule("data/prepared", block_size=32, batch_size=8, seed=7)
    data.trainer = SimpleNamespace(global_rank=rank, world_size=world_size, global_step=step)   # what it reads
    return next(iter(data.train_dataloader()))[0]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(project):
    """DDP re-executes the command on each rank; each rank takes half of every global batch."""
    # The two ranks' halves are the global batch (were each rank to take all of it, the losses below
    # would not change: averaging equal gradients is what one process computes).
    halves = [batch_of_rank(rank, 2) for rank in (0, 1)]
    assert [h.shape for h in halves] == [(4, 32), (4, 32)]
    assert torch.equal(torch.cat(halves), batch_of_rank(0, 1))
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


def test_every_step_trains_on_a_batch_of_its_own(project, monkeypatch):
    """One endless epoch: step s draws batch s of (seed, s), for s = 0..11, never a replay of an
    earlier step's batch (a loader that restarted at step 0 every few steps would pass any
    test whose run fits in its first round)."""
    drawn = []

    class Recorded(StepBatches):
        def __getitem__(self, step):
            x, y = super().__getitem__(step)
            drawn.append((step, x))
            return x, y

    monkeypatch.setattr(lit, "StepBatches", Recorded)
    write_params(project, max_steps=12, eval_every=4)
    pretrain.main(["serial"])
    assert [step for step, _ in drawn[:12]] == list(range(12))      # (the loader may fetch one ahead)
    assert len({x.numpy().tobytes() for _, x in drawn[:12]}) == 12
    rows = curve(project)
    # Pinned on torch 2.13 CPU: mean train loss and val loss at steps 4, 8, 12.
    assert rows["train_loss"].tolist() == pytest.approx([5.31008, 4.69371, 4.38995], abs=1e-3)
    assert rows["val_loss"].tolist() == pytest.approx([4.88158, 4.45667, 4.31334], abs=1e-3)


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


@pytest.fixture(scope="session")
def needs_compile():
    """Skips the test where torch.compile cannot run (it needs a C++ compiler on the CPU). Asked when a
    test needs it, not at collection: the probe compiles a model (~3 s on 2 cores)."""
    try:
        torch.compile(torch.nn.Linear(2, 2))(torch.zeros(1, 2))
    except Exception as e:                       # no compiler, an unsupported Python, ...
        pytest.skip(f"torch.compile does not work here: {type(e).__name__}: {str(e).splitlines()[0][:200]}")


@pytest.mark.usefixtures("needs_compile")
def test_compile_trains_and_saves_the_models_own_keys(project):
    """train.compile: true trains through torch.compile; model.safetensors keeps the model's keys (no
    `_orig_mod.`), compile_s is in metrics/train/ and out of train_seconds."""
    (project / "params.yaml").write_text((project / "params.yaml").read_text()
                                         .replace("strategy: auto}", "strategy: auto, compile: true}"))
    pretrain.main(["serial"])
    from safetensors.torch import load_file
    keys = load_file(project / "models/serial/model.safetensors").keys()
    assert keys and not [k for k in keys if "_orig_mod" in k]
    timing = json.loads((project / "metrics/train/serial.json").read_text())
    assert timing["compile_s"] > 0 and timing["train_seconds"] > 0 and timing["tokens_per_s"] > 0
    assert list(curve(project)["step"]) == [1, 2, 3, 4]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gradient_clipping_trains_in_full_and_mixed_precision(project, precision, monkeypatch):
    """AdamW is fused (one kernel a step) except under Lightning's mixed precision with clipping, which
    Lightning refuses for fused optimizers: both fits run, clipped."""
    (project / "params.yaml").write_text((project / "params.yaml").read_text().replace(
        "strategy: auto}", f"strategy: auto, precision: {precision}, grad_clip: 1.0}}"))
    fused, real = [], torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **kw: fused.append(kw["fused"]) or real(*a, **kw))
    pretrain.main(["serial"])
    assert fused == [precision == "32-true"]
    timing = json.loads((project / "metrics/train/serial.json").read_text())
    assert timing["precision"] == precision and timing["tokens_per_s"] > 0


def test_no_compile_reports_no_compile_time(project):
    pretrain.main(["serial"])
    assert json.loads((project / "metrics/train/serial.json").read_text())["compile_s"] is None


class StopAt(lit.TrainingCurve):
    """The curve, and training stops after step `stop` (its checkpoint written): an interrupted run."""
    stop = 2

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step == self.stop:
            trainer.should_stop = True


@pytest.mark.usefixtures("needs_compile")
def test_compiled_training_resumes_to_the_same_weights(project):
    """A compiled run interrupted at step 2 resumes from its checkpoint (whose keys are the model's own)
    in a new LitLM, and ends where an uninterrupted compiled run ends."""
    from components.config import ModelConfig
    from components.data import load_tokens
    from components.params import TrainParams
    cfg = ModelConfig(vocab_size=257, block_size=32, n_layer=2, n_head=4, n_embd=32)
    train = TrainParams(max_steps=4, batch_size=8, warmup_steps=2, eval_every=2, eval_batches=2, ckpt_every=2,
                        accelerator="cpu", compile=True)

    def run(ckpt_dir, curve_class=lit.TrainingCurve):
        torch.manual_seed(0)
        lm = lit.LitLM(cfg, train, "same-inputs")
        curve = curve_class(load_tokens("data/prepared", "val"), 32, 8, 2, 2, 4)
        lit.fit(lm, lit.LMDataModule("data/prepared", 32, 8, 7), curve, train, ckpt_dir, "same-inputs", False)
        return lm.model, curve

    whole, _ = run(project / "ckpt-whole")
    run(project / "ckpt-cut", StopAt)
    state = torch.load(project / "ckpt-cut/last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2 and not [k for k in state["state_dict"] if "_orig_mod" in k]
    resumed, resumed_curve = run(project / "ckpt-cut", StopAt)   # the same callback class: its rows come back
    assert [r["step"] for r in resumed_curve.rows] == [2, 4]
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
