"""tasks/evaluate.py's quality metrics against their definitions (docs/methods.md#metrics): val_loss, the
mean next-token NLL over non-overlapping windows; val_ppl = exp(val_loss); val_bpb = total NLL / (ln 2 x
bytes of the scored tokens). A tiny random model on made-up tokens of 1 to 4 bytes each, so bytes != tokens.

    .venv/bin/python -m pytest tests/tasks/test_evaluate.py -q
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from components.config import ModelConfig
from components.model import TransformerLM
from tasks.evaluate import quality


def test_quality_metrics_follow_their_definitions():
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    tokens = np.random.default_rng(0).integers(0, 16, 50).astype(np.uint16)
    token_bytes = torch.tensor([1, 2, 3, 4] * 4)                 # UTF-8 length of each token id's text
    m = quality(model, tokens, token_bytes, max_tokens=40, batch_size=2)
    # The reference: the 5 windows of 8 tokens starting at 0, 8, ..., 32, scored in one batch.
    rows = torch.from_numpy(np.stack([tokens[o:o + 9] for o in range(0, 40, 8)]).astype(np.int64))
    x, y = rows[:, :-1], rows[:, 1:]
    with torch.no_grad():
        nll = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
    n_bytes = int(token_bytes[y].sum())
    assert (m["val_tokens"], m["val_bytes"]) == (40, n_bytes) and n_bytes > 40
    assert m["val_loss"] == pytest.approx(nll / 40, rel=1e-5)
    assert m["val_ppl"] == pytest.approx(math.exp(nll / 40), rel=1e-5)
    assert m["val_bpb"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5)
