"""The training curve of a model: validation loss on fixed windows of the val split, rows of
(step, tokens, train_loss, val_loss, lr), curve.csv and the timing summary. Plain PyTorch: a stage
that trains no steps (int8, max_steps 0) uses it without Lightning; components/lit.py's TrainingCurve
adds the callback hooks that fill it during training.

    python -c "import numpy as np; from components.curve import Curve; c = Curve(np.arange(999) % 7, 8, 4, 2, 10, 0); c.start(1.5); print(c.csv())"
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from components.data import eval_offsets, window_batch
from components.model import TransformerLM, lm_loss


class Curve:
    """The rows (curve.csv, in the DVC-hashed model directory) are a pure function of the stage's
    inputs; the training time is not: `timing()` (metrics/train/<name>.json) sums it up."""

    def __init__(self, val_tokens: np.ndarray, block_size: int, batch_size: int, eval_batches: int,
                 eval_every: int, max_steps: int):
        self.val_tokens, self.block_size, self.batch_size = val_tokens, block_size, batch_size
        self.offsets = eval_offsets(len(val_tokens), block_size, eval_batches * batch_size)
        self.eval_every, self.max_steps = eval_every, max_steps
        self.tokens_per_step = batch_size * block_size
        self.rows, self.seconds = [], 0.0
        self._loss_sum, self._steps, self._t0 = 0.0, 0, None
        self.compile_s, self._compiled, self._first_steps, self._step_t0 = 0.0, False, [], None
        self._rows_at_first = 0
        self.ran_on = {"device": None, "world_size": None, "precision": None}   # what trained: none yet
        self.fit_seconds = 0.0      # fit()'s wall time in this process: steps, validation points, checkpoints

    def start(self, val_loss: float) -> None:
        """The step-0 row: the validation loss of the model training starts from. Stages that start
        from trained weights (branch, upcycle, compress, distill from its teacher's layers) write it,
        and so does one that trains no steps (its only row); a model trained from its random init
        (pretrain, distill init scratch) starts at step eval_every."""
        self.rows = [{"step": 0, "tokens": 0, "train_loss": math.nan, "val_loss": val_loss, "lr": 0.0}]

    def csv(self) -> str:
        """curve.csv: one line per row (NaN: no value, e.g. the step-0 row's train loss)."""
        return pd.DataFrame(self.rows).to_csv(index=False)

    def timing(self) -> dict:
        """metrics/train/<name>.json: seconds of training steps (summed over resumes), the mean training
        tokens/s over them, and what trained (device, world size, precision: None if no step ran)."""
        return {"train_seconds": round(self.seconds, 3),
                "tokens_per_s": round(self.rows[-1]["tokens"] / self.seconds, 1) if self.seconds else None,
                **self.ran_on, "threads": torch.get_num_threads(),
                "compile_s": round(self.compile_s, 3) if self._compiled else None}

    @torch.no_grad()
    def val_loss(self, model: TransformerLM) -> float:
        was_training = model.training
        model.eval()
        losses = []
        for i in range(0, len(self.offsets), self.batch_size):
            x, y = window_batch(self.val_tokens, self.offsets[i:i + self.batch_size], self.block_size)
            device = next(model.parameters()).device
            losses.append(lm_loss(model(x.to(device)), y.to(device)).item())
        model.train(was_training)
        return float(np.mean(losses))
