"""Model directories: round trip, tied weights saved once under a fixed name, atomic replacement."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from components.artifacts import load_model_dir, save_model_dir
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


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ParamsError, match="no model at"):
        load_model_dir(tmp_path / "nope")
