"""Model directories: round trip, tied weights saved once under a fixed name, atomic replacement (a
failed write leaves the previous directory, a crash mid-swap a whole one); a stage's inputs checked with the fix."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components import artifacts
from components.artifacts import input_problems, load_input, load_model_dir, prepared_meta, save_model_dir
from components.config import ModelConfig
from components.model import TransformerLM
from components.errors import ParamsError

SAVE = """
import sys, torch
from components.artifacts import save_model_dir
from components.config import ModelConfig
from components.model import TransformerLM
torch.manual_seed(0)
save_model_dir(sys.argv[1], TransformerLM(ModelConfig(vocab_size=64, n_layer=1, n_embd=32, n_head=2)), {"stage": "x"})
"""


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_reproduces_the_model(tmp_path, tied):
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_embd=32, n_head=4,
                                      block="parallel", tie_embeddings=tied)).eval()
    save_model_dir(tmp_path / "m", model, {"stage": "pretrain", "parents": []}, {"curve.csv": "step\n1\n"})
    loaded, meta = load_model_dir(tmp_path / "m")
    x = torch.randint(0, 64, (2, 16))
    assert torch.equal(loaded(x), model(x))
    assert meta == {"stage": "pretrain", "parents": []}
    assert json.loads((tmp_path / "m/config.json").read_text())["block"] == "parallel"
    assert ("lm_head.weight" in load_file(tmp_path / "m/model.safetensors")) is not tied
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]          # no temporary left behind


def test_bytes_do_not_depend_on_the_process(tmp_path):
    """Tied names once came out in per-process hash order: same weights, different files."""
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", SAVE, str(tmp_path / seed)], env=env, check=True)
    files = {(tmp_path / s / "model.safetensors").read_bytes() for s in ("1", "2", "3")}
    assert len(files) == 1


def tiny(seed: int) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(ModelConfig(vocab_size=64, n_layer=1, n_embd=32, n_head=2))


def snapshot(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_a_failure_while_writing_leaves_the_previous_directory(tmp_path, monkeypatch):
    save_model_dir(tmp_path / "m", tiny(0), {"run": 1}, {"curve.csv": "step\n1\n"})
    before = snapshot(tmp_path / "m")
    dumps = artifacts.dumps

    def failing_dumps(obj):                              # weights and config.json written, then meta.json fails
        if obj == {"run": 2}:
            raise OSError("disk full")
        return dumps(obj)
    monkeypatch.setattr(artifacts, "dumps", failing_dumps)
    with pytest.raises(OSError, match="disk full"):
        save_model_dir(tmp_path / "m", tiny(1), {"run": 2})
    assert snapshot(tmp_path / "m") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]          # no temporary left behind


def test_a_crash_while_replacing_shows_a_whole_directory(tmp_path, monkeypatch):
    """Killed while the previous directory is being deleted: models/m is still a whole directory,
    the previous one or the new one, never one with some of its files gone."""
    save_model_dir(tmp_path / "new", tiny(1), {"run": 2})
    new = snapshot(tmp_path / "new")
    save_model_dir(tmp_path / "m", tiny(0), {"run": 1}, {"curve.csv": "step\n1\n"})
    old = snapshot(tmp_path / "m")
    rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):        # deletes one file, then the process "dies"
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        if not files:
            return rmtree(path, ignore_errors=True)
        files[0].unlink()
        raise KeyboardInterrupt
    monkeypatch.setattr(artifacts.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        save_model_dir(tmp_path / "m", tiny(1), {"run": 2})
    assert snapshot(tmp_path / "m") in (old, new)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ParamsError, match="no model at"):
        load_model_dir(tmp_path / "nope")


class TinyStudy:
    """The two things input checks ask a study: where a model lives and which stage makes it."""
    def model_dir(self, name):
        return Path("models") / name              # relative, like Study.model_dir

    def models(self):
        return {"p": {"stage": "pretrain"}}


def test_inputs_are_checked_with_the_dvc_repro_that_fixes_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError, match=r"data/prepared is missing: run `dvc repro prepare` first"):
        prepared_meta()
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/meta.json").write_text(json.dumps({"sha256": "a", "vocab_size": 64, "domains": {}}))
    assert prepared_meta()["sha256"] == "a"
    with pytest.raises(ParamsError, match=r"has no domain 'd' .*run `dvc repro prepare`"):
        prepared_meta("d")
    study, data = TinyStudy(), prepared_meta()
    assert input_problems(study, "p", data, "parent") == [
        "the parent 'p' is not built (models/p is missing): run `dvc repro pretrain@p` first"]
    model = TransformerLM(ModelConfig(vocab_size=60, n_layer=1, n_embd=32, n_head=2))
    save_model_dir(tmp_path / "models/p", model, {"stage": "pretrain", "data_sha256": "b"})
    assert input_problems(study, "p", data, "teacher") == [
        "the teacher 'p' was trained on other prepared data (another corpus): rebuild it with `dvc repro pretrain@p`",
        "the teacher 'p' has vocab_size 60 but data/prepared has 64 (another tokenizer): rebuild it with "
        "`dvc repro pretrain@p`"]
    with pytest.raises(ParamsError, match=r"^distill.kd.teacher: the teacher 'p' was trained on other prepared data"):
        load_input(study, "p", data, "distill.kd.teacher", "teacher")
    assert load_input(study, "p", {"sha256": "b", "vocab_size": 60}, "x", "parent")[1]["data_sha256"] == "b"
    # an hf tokenizer's model may pad its embedding past the vocabulary (Pythia: 50304 rows, 50277 tokens)
    assert input_problems(study, "p", {"sha256": "b", "vocab_size": 56, "tokenizer": "hf"}, "parent") == []
    assert input_problems(study, "p", {"sha256": "b", "vocab_size": 56, "tokenizer": "bpe"}, "parent") == [
        "the parent 'p' has vocab_size 60 but data/prepared has 56 (another tokenizer): rebuild it with "
        "`dvc repro pretrain@p`"]


@pytest.mark.parametrize("damage", ["truncate weights", "config not json", "config of another shape"])
def test_a_damaged_model_directory_names_the_file_and_the_fix(tmp_path, damage):
    torch.manual_seed(0)
    save_model_dir(tmp_path / "m", TransformerLM(ModelConfig(vocab_size=64, n_layer=1, n_embd=32, n_head=2)), {})
    weights, config = tmp_path / "m/model.safetensors", tmp_path / "m/config.json"
    if damage == "truncate weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "config not json":
        config.write_text(config.read_text()[:-10])
    else:
        config.write_text(json.dumps({**json.loads(config.read_text()), "n_embd": 64}))
    broken = weights if damage != "config not json" else config
    with pytest.raises(ParamsError, match=rf"{broken} is damaged .*dvc checkout --force {tmp_path / 'm'}"):
        load_model_dir(tmp_path / "m")


def test_a_damaged_input_meta_names_the_file(tmp_path):
    torch.manual_seed(0)
    save_model_dir(tmp_path / "m", TransformerLM(ModelConfig(vocab_size=64, n_layer=1, n_embd=32, n_head=2)), {})
    (tmp_path / "m/meta.json").write_text("{")

    class Study:                                         # what input_problems asks of the study
        def model_dir(self, name):
            return tmp_path / name

        def models(self):
            return {"m": {"stage": "pretrain"}}
    with pytest.raises(ParamsError, match=rf"{tmp_path / 'm/meta.json'} is damaged"):
        input_problems(Study(), "m", {"sha256": "x", "vocab_size": 64}, "parent")
