"""Pins the bytes of the model code against records made before the model/moe refactor: for tiny
configs of every preset, the MoE/MoA variants, upcycled and compressed models, the weights built
with seed 0 hash as recorded (so every study starts from the same weights), logits, generated
tokens, cache slot shapes and parameter counts match; and saved model directories
(tests/components/data/saved-*) still load and reproduce their recorded outputs.

    .venv/bin/python -m pytest tests/components/test_compat.py -q

A change that alters these records on purpose changes every study's initial weights: re-record
compat.json in the same commit and say so.
"""
import hashlib
import json
from pathlib import Path

import pytest
import torch

from components.artifacts import load_model_dir
from components.compress import drop_attention, fuse_ffns, importance, keep_by_score, prune, quantize
from components.config import PRESETS, ModelConfig
from components.model import TransformerLM
from components.upcycle import upcycle_state_dict, upcycled_config

torch.set_num_threads(1)

DATA = Path(__file__).parent / "data"
TINY = dict(vocab_size=64, block_size=16, n_layer=3, n_head=4, n_embd=32)
PRUNED = dict(layer_n_head=[4, 2, 0], layer_n_kv_head=[2, 1, 0], layer_d_ff=[64, 100, 40], n_kv_head=2)

# built with torch.manual_seed(0): config overrides of TINY
BUILT = {f"preset-{name}": overrides for name, overrides in PRESETS.items()} | {
    "serial-swiglu-rmsnorm-rope-gqa-bias": dict(ffn="swiglu", norm="rmsnorm", pos="rope", n_kv_head=2, bias=True,
                                                tie_embeddings=False),
    "parallel-swiglu-rope-mqa-bias": dict(block="parallel", ffn="swiglu", pos="rope", n_kv_head=1, bias=True),
    "parallel-unfused-gqa": dict(block="parallel-unfused", n_kv_head=2),
    "hybrid-rope-gqa-bias": dict(block="hybrid", pos="rope", n_kv_head=2, bias=True, d_state=8),
    "denseformer-dilated": dict(dwa=True, dwa_dilation=2, dwa_period=2, n_layer=4),
    "serial-pruned": dict(PRUNED),
    "parallel-pruned": dict(PRUNED, block="parallel", ffn="swiglu", bias=True),
    "parallel-2norm-pruned": dict(PRUNED, block="parallel-2norm", pos="rope"),
    "serial-int8": dict(quant="int8", quant_embeddings=True),
    "serial-moe": dict(n_expert=4, top_k=2),
    "serial-moe-every-2-shared": dict(n_expert=3, top_k=1, router="softmax-topk", moe_every=2, shared_expert=True),
    "parallel-moe-every-2": dict(block="parallel", n_expert=4, top_k=2, moe_every=2),
    "parallel-unfused-moe-every-2": dict(block="parallel-unfused", n_expert=2, top_k=2, moe_every=2, ffn="swiglu"),
    "bam-kv-experts": dict(block="parallel", n_expert=2, top_k=1, router="softmax-topk", n_attn_expert=2,
                           n_kv_head=2, pos="rope"),
    "bam-kv-shared": dict(block="parallel-unfused", n_expert=3, top_k=2, n_attn_expert=3, moa="kv-shared",
                          n_kv_head=1, bias=True),
    "moa-only-kv-shared": dict(block="parallel", n_attn_expert=2, moa="kv-shared", ffn="swiglu", n_kv_head=2),
    "moa-only-kv-experts": dict(block="parallel-unfused", n_attn_expert=2),
    "parallel-moa-moe-every-2": dict(block="parallel", n_attn_expert=2, n_expert=2, top_k=2, moe_every=2,
                                     shared_expert=True),
}


def perturbed(model, seed: int) -> TransformerLM:
    """Noise on every parameter (from its own generator), so routing and greedy picks are not ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def dense(seed: int, **overrides) -> TransformerLM:
    torch.manual_seed(seed)
    return perturbed(TransformerLM(ModelConfig(**{**TINY, **overrides})), seed + 1)


def upcycled(method: str, parents: list, n_expert: int, router_init="random", expert_noise=0.0, **moe):
    cfg = upcycled_config(parents[0].cfg, method, n_expert, **moe)
    sources = [0] * n_expert if method == "sparse" else list(range(len(parents)))
    sd = upcycle_state_dict(cfg, parents[0].cfg, [p.state_dict() for p in parents], sources, 7, router_init,
                            expert_noise)
    model = TransformerLM(cfg)
    model.load_state_dict(sd)                                # strict
    return model.eval()


def pruned(model, fraction=0.3):
    return prune(model, *keep_by_score(importance(model, "magnitude", []), fraction))


# made from perturbed dense models by components/upcycle.py and components/compress.py
DERIVED = {
    "upcycle-sparse-parallel": lambda: upcycled("sparse", [dense(0, block="parallel")], 4, expert_noise=0.01,
                                                top_k=2, moe_every=2, shared_expert=True),
    "upcycle-btx-serial": lambda: upcycled("btx", [dense(0, ffn="swiglu"), dense(1, ffn="swiglu")], 2,
                                           router_init="uniform", top_k=1, router="softmax-topk"),
    "upcycle-bam-kv-shared": lambda: upcycled("bam", [dense(0, block="parallel"), dense(1, block="parallel")], 2,
                                              top_k=2, moa="kv-shared"),
    "upcycle-bam-kv-experts-unfused": lambda: upcycled(
        "bam", [dense(s, block="parallel-unfused", bias=True, n_kv_head=2) for s in (0, 1)], 2, router_init="zero",
        top_k=1, router="softmax-topk"),
    "prune-parallel": lambda: pruned(dense(0, block="parallel", bias=True)),
    "prune-serial-swiglu-gqa": lambda: pruned(dense(0, ffn="swiglu", n_kv_head=2)),
    # FFN Fusion fuses FFN-only layers: attention dropped first (the same weights as the recorded one-step fusion)
    "fuse-ffns-parallel": lambda: fuse_ffns(drop_attention(dense(0, block="parallel", bias=True, norm="layernorm"),
                                                           [1, 2]), [(1, 2)]),
    "fuse-ffns-serial": lambda: fuse_ffns(drop_attention(dense(0, ffn="swiglu", norm="rmsnorm"), [0, 1]), [(0, 1)]),
    "prune-then-fuse-parallel": lambda: fuse_ffns(drop_attention(pruned(dense(0, block="parallel")), [0, 1]),
                                                  [(0, 1)]),
    "int8-parallel": lambda: quantize(dense(0, block="parallel"), embeddings=False),
}


def tensor_hashes(sd: dict) -> list[list[str]]:
    """[name, sha256 prefix of its shape, dtype and bytes] of every tensor, in state-dict order."""
    def digest(t):
        t = t.detach().cpu().contiguous()
        return hashlib.sha256(f"{list(t.shape)} {t.dtype}".encode() + t.numpy().tobytes()).hexdigest()[:12]
    return [[k, digest(t)] for k, t in sd.items()]


@torch.no_grad()
def outputs(model: TransformerLM) -> dict:
    """Logits on a fixed input, greedy (cached and sliding) and sampled tokens, cache slot shapes, counts."""
    model.eval()
    idx = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    logits = model(idx)                                      # (2, 10, 64)
    prompt = idx[:, :4]
    return {
        "logits_head": [round(v, 6) for v in logits[:, ::3, :4].flatten().tolist()],   # 2 x 4 x 4 of them
        "logits_sum": round(logits.double().sum().item(), 6),
        "logits_abs_sum": round(logits.double().abs().sum().item(), 6),
        "greedy": model.generate(prompt, 8, temperature=0).tolist(),
        "sliding": model.generate(prompt, 14, temperature=0, use_cache=False).tolist(),
        # temperature 1, sampling top-k 5 (positional: the argument's name is not pinned)
        "sampled": model.generate(prompt, 8, 1.0, 5, torch.Generator().manual_seed(3)).tolist(),
        "cache_slots": [None if s is None else [list(t.shape) for t in s] for s in model.new_cache(2, 12).slots],
        "num_params": model.num_params(),
        "num_active_params": model.num_active_params(),
    }


def build(name: str) -> tuple[TransformerLM, dict]:
    """(model, what is pinned about how it was made)."""
    if name in DERIVED:
        model = DERIVED[name]()
        return model, {"weights": tensor_hashes(model.state_dict())}
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(**{**TINY, **BUILT[name]}))
    made = {"weights": tensor_hashes(model.state_dict()),
            "rng_after_init": torch.randint(0, 2**31, (1,)).item()}      # init draws no more, no fewer
    return perturbed(model, 1), made


RECORDS = json.loads((DATA / "compat.json").read_text()) if (DATA / "compat.json").exists() else None
SAVED = sorted(p.name for p in DATA.glob("saved-*"))


def check_outputs(got: dict, want: dict):
    assert got["cache_slots"] == want["cache_slots"]
    assert (got["num_params"], got["num_active_params"]) == (want["num_params"], want["num_active_params"])
    assert torch.allclose(torch.tensor(got["logits_head"]), torch.tensor(want["logits_head"]), atol=1e-5, rtol=1e-5)
    assert got["logits_sum"] == pytest.approx(want["logits_sum"], rel=1e-6, abs=1e-4)
    assert got["logits_abs_sum"] == pytest.approx(want["logits_abs_sum"], rel=1e-6)
    assert (got["greedy"], got["sliding"], got["sampled"]) == (want["greedy"], want["sliding"], want["sampled"])


def test_every_case_is_recorded():
    assert set(RECORDS["cases"]) == set(BUILT) | set(DERIVED)
    assert set(RECORDS["saved"]) == set(SAVED) and len(SAVED) >= 2


@pytest.mark.parametrize("name", list(BUILT) + list(DERIVED))
def test_weights_and_outputs_are_unchanged(name):
    model, made = build(name)
    want = RECORDS["cases"][name]
    assert made["weights"] == want["weights"]              # names, order, shapes and bytes
    assert made.get("rng_after_init") == want.get("rng_after_init")
    check_outputs(outputs(model), want["outputs"])


@pytest.mark.parametrize("name", SAVED)
def test_saved_model_directories_load_unchanged(name):
    model, meta = load_model_dir(DATA / name)
    assert meta == {"fixture": name}
    check_outputs(outputs(model), RECORDS["saved"][name])
