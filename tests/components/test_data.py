"""Batches by step: a pure function of (seed, step); the ranks' slices make up the global batch;
a corpus too small for the model, or a batch the devices cannot split, is one ParamsError."""
import numpy as np
import pytest
import torch

from components.data import StepBatches
from components.errors import ParamsError

TOKENS = np.arange(1000, dtype=np.uint16)


def test_the_batch_of_a_step_depends_only_on_seed_and_step():
    a, b = StepBatches(TOKENS, 8, 4, seed=1), StepBatches(TOKENS, 8, 4, seed=1)
    assert torch.equal(a[5][0], b[5][0]) and not torch.equal(a[5][0], a[6][0])
    assert not torch.equal(a[5][0], StepBatches(TOKENS, 8, 4, seed=2)[5][0])
    x, y = a[5]
    assert torch.equal(x[:, 1:], y[:, :-1])                           # targets: the inputs shifted by one


def test_the_ranks_slices_make_up_the_global_batch():
    whole = StepBatches(TOKENS, 8, 4, seed=1)[3][0]
    halves = [StepBatches(TOKENS, 8, 4, seed=1, rank=r, world_size=2)[3][0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), whole)


@pytest.mark.parametrize("tokens, batch, world, problem", [
    (TOKENS[:9], 4, 1, r"only 9 training tokens, not more than block_size\+1=9: .* smaller model.block_size"),
    (TOKENS, 3, 2, r"train.batch_size=3 is not divisible by the 2 devices")])
def test_impossible_batches_are_one_params_error(tokens, batch, world, problem):
    with pytest.raises(ParamsError, match=problem):
        StepBatches(tokens, 8, batch, seed=1, world_size=world)
