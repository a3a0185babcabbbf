"""distill@<name> on a tiny corpus with a tiny teacher saved by save_model_dir: outputs, lineage,
pinned first losses, teacher init, no training, and each bad input stopped before compute.

    .venv/bin/python -m pytest tests/tasks/test_distill.py -q
"""
import json
import shutil

import mlflow
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from components.artifacts import load_model_dir, save_model_dir
from components.config import ModelConfig
from components.distill import LitDistill
from components.model import TransformerLM
from components.errors import ParamsError
from tasks import distill, prepare
from tests.tasks.tiny_corpus import write_corpus

PARAMS = """\
study: {{name: tiny, seed: 7}}
data: {{source: corpus, include: ["*.txt"], tokenizer: byte, val_fraction: 0.1}}
model: {{block_size: 32, n_layer: 2, n_head: 4, n_embd: 32, ffn: swiglu, norm: rmsnorm, pos: rope}}
train: {{max_steps: 4, batch_size: 8, lr: 3.0e-3, min_lr: 3.0e-4, warmup_steps: 2, eval_every: 1,
        eval_batches: 2, ckpt_every: 100, accelerator: cpu, devices: 1}}
pretrain:
  variants:
    serial: {{block: serial}}
distill:
{distill}
evaluate: {{prompt_tokens: 16, decode_tokens: 8}}
"""
ENTRIES = """\
  small: {teacher: serial, student: {n_layer: 1, n_embd: 16, n_head: 2}}
  half: {teacher: serial, init: teacher-every-other, max_steps: 0}
  rev: {teacher: serial, reverse: true, hidden_weight: 0.5, alpha: 0.7, temperature: 1.5, max_steps: 2,
        student: {n_layer: 1}}
"""


def write_params(root, distill_entries=ENTRIES):
    (root / "params.yaml").write_text(PARAMS.format(distill=distill_entries))


def save_teacher(root, vocab_size=257, spread=0.0, **meta):
    """A tiny 2-layer teacher in models/serial, as pretrain would leave it (weights random but fixed;
    `spread`: noise of that scale added to every weight, for logits far from uniform)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=32, ffn="swiglu",
                      norm="rmsnorm", pos="rope")
    teacher = TransformerLM(cfg)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn(p.shape) * spread)
    data_sha = json.loads((root / "data/prepared/meta.json").read_text())["sha256"]
    save_model_dir(root / "models/serial", teacher,
                   {"stage": "pretrain", "parents": [], "data_sha256": data_sha, "params_hash": "t" * 16,
                    "tokens_seen": 1000, "steps": 1, "params": 0, **meta})


@pytest.fixture
def project(tmp_path, monkeypatch):
    write_corpus(tmp_path)
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    prepare.main([])
    save_teacher(tmp_path)
    return tmp_path


def meta(root, name):
    return json.loads((root / "models" / name / "meta.json").read_text())


def test_distilled_student_explains_itself(project):
    distill.main(["small"])
    out = project / "models/small"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "curve.csv", "meta.json", "model.safetensors"]
    student, m = load_model_dir(out)
    teacher, _ = load_model_dir(project / "models/serial")
    assert (student.cfg.n_layer, student.cfg.n_embd, student.cfg.vocab_size) == (1, 16, 257)
    assert student.num_params() < teacher.num_params() == m["teacher_params"]
    assert (m["stage"], m["method"], m["parents"], m["init"]) == ("distill", "kd", ["serial"], "scratch")
    assert m["tokens_seen"] == 4 * 8 * 32 and m["steps"] == 4 and m["teacher_tokens_seen"] == 1000
    assert (m["alpha"], m["temperature"], m["reverse"], m["hidden_weight"]) == (0.5, 2.0, False, 0.0)
    losses = pd.read_csv(out / "curve.csv")["train_loss"].tolist()
    # Pinned on torch 2.13 CPU: the student's LM loss (the curve's train_loss) of the first steps.
    assert losses == pytest.approx([5.57457, 5.53744, 5.48414, 5.35719], abs=1e-3)
    assert not (project / "checkpoints/small").exists()
    run = mlflow.search_runs(experiment_names=["tiny"], filter_string="tags.stage = 'distill'", output_format="list")[0]
    assert (run.data.tags["method"], run.data.tags["parents"], run.data.tags["model"]) == ("kd", "serial", "small")
    assert run.data.params["distill.small.teacher"] == "serial" and run.data.params["model.n_embd"] == "16"


def test_reverse_kd_with_hidden_term(project, monkeypatch):
    """The stage trains on the entry's objective: its alpha, temperature, reverse KL and hidden term,
    checked against the formula on the trained student (a stage that dropped any of them would still
    write the same meta.json)."""
    save_teacher(project, spread=0.3)       # a random init's logits are near uniform: every KD term would be ~0
    made = []
    monkeypatch.setattr(distill, "LitDistill", lambda *a, **kw: made.append(LitDistill(*a, **kw)) or made[-1])
    distill.main(["rev"])
    m = meta(project, "rev")
    assert (m["method"], m["steps"], m["alpha"], m["temperature"]) == ("kd-reverse+hidden", 2, 0.7, 1.5)
    assert len(pd.read_csv(project / "models/rev/curve.csv")) == 2
    [lit] = made
    lit.log = lit.log_dict = lambda *a, **kw: None                 # no Trainer to log to here
    student, teacher = lit.model.eval(), lit.teacher
    x = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    with torch.no_grad():
        s, t = student(x), teacher(x)
        ce = F.cross_entropy(s.flatten(0, 1), y.flatten())
        p_s, log_p_s, log_p_t = F.softmax(s / 1.5, -1), F.log_softmax(s / 1.5, -1), F.log_softmax(t / 1.5, -1)
        reverse_kl = (p_s * (log_p_s - log_p_t)).sum(-1).mean()           # KL(p_s || p_t)
        cosine = 1 - F.cosine_similarity(student.hidden(x), teacher.hidden(x), dim=-1).mean()   # same width: P = I
        expected = 0.3 * ce + 0.7 * 1.5 ** 2 * reverse_kl + 0.5 * cosine
        assert lit.training_step((x, y), 0)["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_teacher_init_without_training_keeps_every_other_layer(project):
    distill.main(["half"])
    student, m = load_model_dir(project / "models/half")
    teacher, _ = load_model_dir(project / "models/serial")
    assert student.cfg.n_layer == 1 and m["steps"] == 0 and m["tokens_seen"] == 1000   # the teacher's tokens
    for name, w in student.blocks[0].state_dict().items():
        assert torch.equal(w, teacher.blocks[0].state_dict()[name])
    curve = pd.read_csv(project / "models/half/curve.csv")
    assert list(curve["step"]) == [0] and curve["val_loss"].notna().all()


def test_each_bad_input_stops_before_compute(project):
    """One project for all of them (its set-up is most of the time)."""
    save_teacher(project, vocab_size=300)
    with pytest.raises(ParamsError, match="vocab_size 300 but data/prepared has 257"):
        distill.main(["small"])
    save_teacher(project, data_sha256="0" * 64)
    with pytest.raises(ParamsError, match="trained on other prepared data"):
        distill.main(["small"])
    shutil.rmtree(project / "models/serial")
    with pytest.raises(ParamsError, match=r"teacher 'serial' is not built .*dvc repro pretrain@serial"):
        distill.main(["small"])
    with pytest.raises(ParamsError, match="unknown distill model 'nope'"):
        distill.main(["nope"])
    write_params(project, "  a: {teacher: serial, alpha: 2.0}\n  b: {teacher: serial, temperature: 0}\n")
    with pytest.raises(ParamsError) as e:
        distill.main(["a"])
    assert "distill.a.alpha" in str(e.value) and "distill.b.temperature" in str(e.value)
    assert not (project / "models/small").exists()
    assert not mlflow.search_runs(experiment_names=["tiny"], filter_string="tags.stage = 'distill'", output_format="list")
