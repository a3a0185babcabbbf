"""Pins components/flops.py against hand counts: a tiny dense model (and nanoGPT's 6N + 12 L H Q T), an MoE
(top_k of the experts and the router), GQA, looped, mixture of attention, attention-dropped and int8 models,
the SSM term of hybrid heads, and the meta.json keys of a stage (teacher forwards, lineage totals); the
generation cache's size (`cache_bytes`) against the tensors `new_cache` allocates.

    .venv/bin/python -m pytest tests/components/test_flops.py -q
"""
import pytest
import torch

from components.compress import drop_attention, quantize
from components.config import PRESETS, ModelConfig
from components.flops import cache_bytes, flops_meta, forward_flops_per_token, inherited_flops, training_flops_per_token
from components.model import TransformerLM

torch.set_num_threads(1)

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)   # gelu: d_ff 128; tied head


def lm(**overrides) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(ModelConfig(**{**TINY, **overrides}))


ATTENTION = 2 * 2 * 16 * 32              # q k^T and p v per token: 2 x 2 x n_ctx (block_size) x d_attn, per layer


def test_dense_model_by_hand_and_by_nanogpt():
    qkv, o, fc, proj, head = 32 * 96, 32 * 32, 32 * 128, 128 * 32, 32 * 64   # head: tied, still a matmul
    n = 2 * (qkv + o + fc + proj) + head                                   # 26,624 matmul weights
    assert forward_flops_per_token(lm()) == 2 * n + 2 * ATTENTION == 57_344
    assert training_flops_per_token(lm()) == 3 * 57_344
    L, H, Q, T = 2, 4, 8, 16                                               # nanoGPT's estimate_mfu
    assert training_flops_per_token(lm()) == 6 * n + 12 * L * H * Q * T


def test_moe_counts_top_k_experts_and_the_router():
    d_ff = 96                                                              # swiglu of n_embd 32
    expert = 32 * 2 * d_ff + d_ff * 32                                     # [gate; up] and down
    layer = 32 * 96 + 32 * 32 + 32 * 4 + 2 * expert                        # attention, router (4 experts), top 2
    n = 2 * layer + 32 * 64
    moe = lm(ffn="swiglu", n_expert=4, top_k=2)
    assert forward_flops_per_token(moe) == 2 * n + 2 * ATTENTION == 98_816
    assert moe.num_params() - moe.num_active_params() == 2 * 2 * expert    # the 2 experts a token skips, per layer
    shared = lm(ffn="swiglu", n_expert=4, top_k=2, shared_expert=True)     # a shared expert: every token
    assert forward_flops_per_token(shared) - forward_flops_per_token(moe) == 2 * 2 * expert


def test_gqa_looped_moa_dropped_and_int8():
    dense = forward_flops_per_token(lm())
    assert dense - forward_flops_per_token(lm(n_kv_head=1)) == 2 * 2 * 32 * 48   # k, v: 8 wide, not 32; scores alike
    head = 2 * 32 * 64
    assert forward_flops_per_token(lm(n_loop=2)) - head == 2 * (dense - head)     # each application counts
    moa = lm(block="parallel", n_attn_expert=2)                            # soft: both experts' heads, and a router
    assert forward_flops_per_token(moa) - forward_flops_per_token(lm(block="parallel")) == \
        2 * 2 * (32 * 96 + 32 * 32 + 32 * 2) + 2 * ATTENTION   # qkv, proj twice as wide; router: 2 experts
    assert dense - forward_flops_per_token(drop_attention(lm(), [1])) == 2 * (32 * 96 + 32 * 32) + ATTENTION
    assert forward_flops_per_token(quantize(lm(), embeddings=True)) == dense
    wide = lm(block="one-wide-ffn")                                        # its shared FFN (d_ff 256) in each layer
    assert forward_flops_per_token(wide) - dense == 2 * 2 * (2 * 32 * 256 - 2 * 32 * 128)


def test_hybrid_adds_its_projections_and_the_ssm_recurrence():
    hybrid = lm(block="hybrid", d_state=8)
    matmul = sum(m.in_features * m.out_features for m in hybrid.modules() if isinstance(m, torch.nn.Linear))
    assert forward_flops_per_token(hybrid) == 2 * matmul + 2 * ATTENTION + 2 * (2 * 2 * 8 * 32)


def test_stage_meta_pays_teacher_forwards_and_adds_up_the_lineage():
    student, teacher = lm(n_layer=1), lm()
    meta = flops_meta(student, 1000, inherited=5, teacher=teacher)
    assert meta == {"flops_per_token": training_flops_per_token(student),
                    "train_flops": 1000 * (training_flops_per_token(student) + forward_flops_per_token(teacher)),
                    "total_train_flops": 5 + meta["train_flops"]}
    assert flops_meta(student, 0, inherited=0)["total_train_flops"] == 0            # an import: nothing trained here
    assert flops_meta(student, 10, inherited=None)["total_train_flops"] is None     # unknown stays unknown
    parent, lib, tests = {"total_train_flops": 100}, {"total_train_flops": 130}, {"total_train_flops": 150}
    assert inherited_flops([parent, lib, tests]) == 100 + 30 + 50                  # btx: the parent once, each branch's own
    assert inherited_flops([parent]) == 100 and inherited_flops([{"tokens_seen": 1}]) is None


CACHE_CASES = [(name, {}) for name in PRESETS] + [
    ("serial", {"n_kv_head": 2}), ("serial", {"n_kv_head": 1}), ("hybrid", {"n_kv_head": 1, "d_state": 8}),
    ("looped", {"n_loop": 3, "n_kv_head": 2}), ("par", {"layout": "fsfs"}),
    ("serial", {"n_expert": 4}), ("parallel", {"n_expert": 4, "n_attn_expert": 3}),
    ("parallel", {"n_attn_expert": 3, "moa": "kv-shared", "n_kv_head": 2}),
    ("serial", {"layer_n_head": [4, 0], "layer_n_kv_head": [2, 0], "layer_d_ff": [64, 32]}),   # pruned: an FFN-only layer
]


@pytest.mark.parametrize("name,knobs", CACHE_CASES, ids=[f"{n}-{k}" for n, k in CACHE_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_equal_the_allocated_cache(name, knobs, dtype):
    model = TransformerLM(ModelConfig.from_preset(name, **{**TINY, **knobs})).to(dtype)
    expected = cache_bytes(model.cfg, element_bytes=dtype.itemsize)
    for length in (5, 16):
        slots = [s for s in model.new_cache(1, length).slots if s is not None]
        kv = sum(t.nbytes for s in slots for t in s[:2])                    # k, v: (1, nkv, length, hs) each
        state = sum(t.nbytes for s in slots for t in s[2:])                 # a hybrid block's SSM state
        assert kv == expected["kv_cache_bytes_per_token"] * length
        assert state == expected["state_bytes_per_sequence"]
    assert expected["kv_cache_bytes_per_token"] > 0
    assert (expected["state_bytes_per_sequence"] > 0) == (model.cfg.block == "hybrid")


def test_cache_bytes_by_hand():
    hs, f32 = 8, 4                                                          # n_embd 32 / 4 heads, float32
    assert cache_bytes(ModelConfig(**TINY)) == {"kv_cache_bytes_per_token": 2 * 2 * 4 * hs * f32,   # 2 layers x 4 kv heads
                                                "state_bytes_per_sequence": 0}
    assert cache_bytes(ModelConfig(**TINY, n_kv_head=1))["kv_cache_bytes_per_token"] == 2 * 2 * 1 * hs * f32   # MQA: 1/4
    assert cache_bytes(ModelConfig(**TINY, n_loop=2))["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 4 * hs * f32  # own slots
    assert cache_bytes(ModelConfig.from_preset("par", **TINY))["kv_cache_bytes_per_token"] == 2 * 1 * 4 * hs * f32  # "sfff"
    hybrid = cache_bytes(ModelConfig.from_preset("hybrid", **TINY, d_state=8), element_bytes=2)
    assert hybrid == {"kv_cache_bytes_per_token": 2 * 2 * 4 * hs * 2, "state_bytes_per_sequence": 2 * 4 * 8 * hs * 2}
