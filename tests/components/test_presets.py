"""Pins the presets (components/config.py PRESETS) on tiny CPU configs: each builds, is causal,
decodes with its cache exactly as the full forward, has its closed-form parameter count, learns in
one step and survives a save/load; and each paper's identity against a reference: par 'sfsf..' ==
serial, looped == the unrolled stack, DWA at init == the plain stack (and its formula otherwise),
one-wide-ffn == serial with every FFN a copy of the shared one, parallel-2norm with equal norms ==
parallel, the SSM's chunked scan == its recurrence, the hybrid mixer == its formula.

    .venv/bin/python -m pytest tests/components/test_presets.py -q
"""
import math

import pytest
import torch
import torch.nn.functional as F

from components.artifacts import load_model_dir, save_model_dir
from components.config import PRESETS, ModelConfig
from components.model import (
    AttentionSublayer,
    FFNSublayer,
    HybridMixer,
    SharedFFNBlock,
    TransformerLM,
    attend,
)
from components.ssm import ssd_scan, ssd_step

torch.set_num_threads(1)

TINY = dict(vocab_size=64, block_size=24, n_layer=2, n_head=4, n_embd=32)
V = TINY["vocab_size"]

# Every knob value appears for every preset, in 4 combinations (not the full product: time).
KNOBS = [dict(ffn="gelu", norm="layernorm", pos="learned"),
         dict(ffn="swiglu", norm="rmsnorm", pos="rope", n_kv_head=2),
         dict(ffn="gelu", norm="rmsnorm", pos="rope", n_kv_head=1),
         dict(ffn="swiglu", norm="layernorm", pos="learned", n_kv_head=1, bias=True)]
# The stack options and combinations the presets leave at their defaults.
EXTRAS = [("denseformer", dict(n_layer=4, dwa_dilation=2, dwa_period=2)),
          ("denseformer", dict(n_loop=2, block="hybrid")),
          ("looped", dict(n_loop=3, pos="rope")),
          ("looped", dict(block="hybrid", n_kv_head=2)),      # one SSM state and KV slot per application
          ("par", dict(n_layer=3, layout="fsffsf", pos="rope")),
          ("par", dict(n_loop=2, n_kv_head=1)),
          ("one-wide-ffn", dict(d_ff=48, ffn="swiglu")),
          ("hybrid", dict(d_state=4, n_layer=3))]
CASES = [(name, knobs) for name in PRESETS for knobs in KNOBS] + EXTRAS
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in knobs.items())}" for name, knobs in CASES]


def cfg_of(name: str, **overrides) -> ModelConfig:
    return ModelConfig.from_preset(name, **{**TINY, **overrides})


def perturb_(module: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> torch.nn.Module:
    """Noise on every parameter: norms, DWA weights and SSM steps non-trivial, logits spread out."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def model_of(name: str, seed: int = 0, **overrides) -> TransformerLM:
    torch.manual_seed(seed)
    return perturb_(TransformerLM(cfg_of(name, **overrides)), seed + 1)


def tokens(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# every preset: causal, cache == full forward, one step learns, save/load round trip

@pytest.mark.parametrize("name,knobs", CASES, ids=IDS)
def test_causal_and_cache_matches_full_forward(name, knobs):
    model = model_of(name, **knobs)
    idx = tokens(2, 12)
    changed = idx.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % V
    full = model(idx)                                                   # (B, T, V)
    other = model(changed)
    assert full.shape == (2, 12, V)
    assert max_diff(full[:, :6], other[:, :6]) < 1e-6                   # t <= 5 never sees t >= 6
    assert (full[:, 6:] - other[:, 6:]).abs().amax(-1).min() > 1e-3     # every later position moves
    with torch.no_grad():   # prefill 5, a 3-token chunk (offset mask, SSM state carried), then 1 at a time
        cache = model.new_cache(2)
        steps = [model(idx[:, :5], cache), model(idx[:, 5:8], cache)]
        steps += [model(idx[:, t:t + 1], cache) for t in range(8, 12)]
    assert cache.pos == 12
    assert max_diff(torch.cat(steps, dim=1), full) < 1e-5
    with torch.no_grad():   # the fixed-shape step (compiled_step's): writes at its positions, reads the whole cache
        cache = model.new_cache(2)                                      # block_size 24: half of it never written
        steps = [model(idx[:, :5], cache), model.step(idx[:, 5:8], cache, torch.arange(5, 8))]
        steps += [model.step(idx[:, t:t + 1], cache, torch.tensor([t])) for t in range(8, 12)]
    assert max_diff(torch.cat(steps, dim=1), full) < 1e-5
    prompt = idx[:, :4]
    with_cache = model.generate(prompt, 10, temperature=0)
    assert with_cache.shape == (2, 14) and torch.equal(with_cache[:, :4], prompt)
    assert torch.equal(with_cache, model.generate(prompt, 10, temperature=0, use_cache=False))


def test_hybrid_cache_across_scan_chunks():
    """70 tokens: the training path scans 3 chunks of 32; the cache path steps one token at a time."""
    model = model_of("hybrid", block_size=80, pos="rope")
    idx = tokens(1, 70)
    with torch.no_grad():
        cache = model.new_cache(1)
        steps = [model(idx[:, :33], cache)] + [model(idx[:, t:t + 1], cache) for t in range(33, 70)]
    assert max_diff(torch.cat(steps, dim=1), model(idx)) < 1e-5


@pytest.mark.parametrize("name", PRESETS)
def test_one_step_lowers_the_loss_and_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = TransformerLM(cfg_of(name, ffn="swiglu", norm="rmsnorm", pos="rope", n_kv_head=2))
    x, y = tokens(4, TINY["block_size"], seed=1), tokens(4, TINY["block_size"], seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    before = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    before.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []
    opt.step()
    after = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    assert after.item() < before.item() - 1e-3


@pytest.mark.parametrize("name", PRESETS)
def test_model_directory_round_trip(tmp_path, name):
    model = model_of(name, n_kv_head=2, bias=True, tie_embeddings=False)
    save_model_dir(tmp_path / name, model, {"stage": "pretrain"})
    loaded, _ = load_model_dir(tmp_path / name)                         # asserts every weight is loaded
    assert loaded.cfg == model.cfg
    idx = tokens(2, 12)
    assert torch.equal(loaded(idx), model(idx))


# ---------------------------------------------------------------------------------------------
# parameter counts in closed form (no biases, tied embeddings, learned positions)

def closed_form(name: str, c: ModelConfig) -> int:
    d, L, hs = c.n_embd, c.n_layer, c.head_size
    attn = d * (c.n_head + 2 * c.n_kv_head) * hs + c.n_head * hs * d    # qkv, proj
    ffn = d * (2 if c.ffn == "swiglu" else 1) * c.d_ff + c.d_ff * d     # fc (gate and up), proj
    norm = d                                                            # weight only (bias=False)
    serial = L * (2 * norm + attn + ffn)
    per_preset = {
        "serial": serial,
        "parallel": L * (norm + attn + ffn),
        "parallel-2norm": serial,
        "par": c.layout.count("s") * (norm + attn) + c.layout.count("f") * (norm + ffn),
        "one-wide-ffn": L * (2 * norm + attn) + ffn,                    # one FFN, d_ff = L * default
        "denseformer": serial + sum(i // c.dwa_dilation + 1 for i in range(c.dwa_period, L * c.n_loop + 1,
                                                                            c.dwa_period)),
        "looped": serial,                                               # loops add no weights
        "hybrid": L * (2 * norm + attn + ffn                            # the serial block, and:
                       + d * (2 * d + 2 * c.d_state + c.n_head)         # w_in rows for x, z, B, C, dt
                       + c.n_head + 2 * norm),                          # dt_bias, norm_attn, norm_ssm
    }[name]
    return per_preset + c.vocab_size * d + c.block_size * d + norm      # wte (= lm_head), wpe, norm_f


@pytest.mark.parametrize("ffn", ["gelu", "swiglu"])
@pytest.mark.parametrize("n_kv_head", [4, 1])
@pytest.mark.parametrize("name", PRESETS)
def test_num_params_closed_form(name, n_kv_head, ffn):
    c = cfg_of(name, n_layer=4, n_kv_head=n_kv_head, ffn=ffn)
    assert TransformerLM(c).num_params() == closed_form(name, c)


@pytest.mark.parametrize("dilation,period,expected", [(1, 1, 4 * 7 // 2), (2, 1, 1 + 2 + 2 + 3), (1, 2, 3 + 5),
                                                      (3, 2, 1 + 2)])
def test_dwa_weight_count(dilation, period, expected):
    """L(L+3)/2 scalars for L=4 (paper's d(d+3)/2); dilation k: floor(i/k)+1 after block i; period p:
    only after blocks p, 2p, ..."""
    c = cfg_of("denseformer", n_layer=4, dwa_dilation=dilation, dwa_period=period)
    assert TransformerLM(c).num_params() - TransformerLM(cfg_of("serial", n_layer=4)).num_params() == expected
    assert closed_form("denseformer", c) - closed_form("serial", c) == expected


def test_one_wide_ffn_width_matches_serial_parameter_count():
    for ffn in ("gelu", "swiglu"):
        wide, serial = cfg_of("one-wide-ffn", n_layer=3, ffn=ffn), cfg_of("serial", n_layer=3, ffn=ffn)
        assert wide.d_ff == 3 * serial.d_ff
        assert TransformerLM(wide).num_params() == TransformerLM(serial).num_params()


# ---------------------------------------------------------------------------------------------
# each paper's identity, against a reference

def test_par_with_alternating_layout_is_serial():
    serial = model_of("serial", pos="rope", n_kv_head=2)
    par = TransformerLM(cfg_of("par", layout="sfsf", pos="rope", n_kv_head=2)).eval()
    assert [type(b) for b in par.blocks] == [AttentionSublayer, FFNSublayer] * 2
    mapping = {"ln_1": (0, "ln"), "attn": (0, "attn"), "ln_2": (1, "ln"), "mlp": (1, "mlp")}
    sd = {}
    for name, t in serial.state_dict().items():                        # blocks.i.ln_1.weight -> blocks.2i.ln.weight
        parts = name.split(".")
        if parts[0] == "blocks":
            offset, module = mapping[parts[2]]
            name = ".".join(["blocks", str(2 * int(parts[1]) + offset), module, *parts[3:]])
        sd[name] = t
    par.load_state_dict(sd)                                             # strict: every name maps
    idx = tokens(2, 12)
    assert max_diff(par(idx), serial(idx)) < 1e-6
    assert cfg_of("par", n_layer=4).layout == "sfsfffff"                # the default layout rule
    assert cfg_of("par", n_layer=6).layout == "sfsf" + "f" * 8


def test_par_default_layout_attends_early_and_rarely():
    for L in range(1, 13):
        layout = cfg_of("par", n_layer=L).layout
        n = math.ceil(L / 3)                                            # ~2/3 of attention replaced
        assert len(layout) == 2 * L and layout.count("s") == n
        assert layout[:2 * n] == "sf" * n                               # attention only in the leading sfsf..


def test_looped_is_the_unrolled_stack():
    looped1 = model_of("looped", n_loop=1, pos="rope")
    serial = TransformerLM(cfg_of("serial", pos="rope")).eval()
    serial.load_state_dict(looped1.state_dict())
    idx = tokens(2, 12)
    assert max_diff(looped1(idx), serial(idx)) < 1e-6                   # n_loop=1: the plain stack
    looped3 = model_of("looped", n_loop=3, pos="rope")                  # 2 blocks, 3 times
    deep = TransformerLM(cfg_of("serial", n_layer=6, pos="rope")).eval()
    sd = looped3.state_dict()
    deep.load_state_dict({k if not k.startswith("blocks.") else
                          f"blocks.{int(k.split('.')[1]) + 2 * r}.{k.split('.', 2)[2]}": v
                          for r in range(3) for k, v in sd.items()})    # block i + 2r = copy of block i
    assert max_diff(looped3(idx), deep(idx)) < 1e-5
    assert max_diff(looped3(idx), looped1(idx)) > 1e-2


def test_dwa_at_init_is_the_plain_stack():
    for dilation, period in [(1, 1), (2, 1), (1, 2)]:
        torch.manual_seed(0)
        dense = TransformerLM(cfg_of("denseformer", n_layer=4, dwa_dilation=dilation, dwa_period=period)).eval()
        plain = perturb_(TransformerLM(cfg_of("serial", n_layer=4)))
        missing, unexpected = dense.load_state_dict(plain.state_dict(), strict=False)
        assert unexpected == [] and all(n.startswith("dwa.alphas.") for n in missing) and missing
        idx = tokens(2, 12)
        assert torch.equal(dense(idx), plain(idx))


@pytest.mark.parametrize("dilation,period", [(1, 1), (2, 1), (2, 3)])
def test_dwa_follows_its_formula(dilation, period):
    """Y_i = sum_{j<=i, j = i mod k} alpha_{i,j} X_j after blocks p, 2p, ...; X_0 the embedding."""
    model = model_of("denseformer", n_layer=5, dwa_dilation=dilation, dwa_period=period)
    idx = tokens(2, 12)
    X = [model.wte(idx) + model.wpe(torch.arange(12))]
    y = X[0]
    for i, block in enumerate(model.blocks, start=1):
        X.append(block(y))
        if i % period == 0:
            alpha = model.dwa.alphas[i // period - 1]                  # weights of X_i, X_{i-k}, ...
            y = sum(alpha[n] * X[i - n * dilation] for n in range(i // dilation + 1))
        else:
            y = X[i]
    assert max_diff(model(idx), model.lm_head(model.norm_f(y))) < 1e-5
    y = X[0]
    for block in model.blocks:                                          # the same blocks without DWA
        y = block(y)
    assert max_diff(model(idx), model.lm_head(model.norm_f(y))) > 1e-3


def test_one_wide_ffn_is_serial_with_every_ffn_a_copy_of_the_shared_one():
    wide = model_of("one-wide-ffn", ffn="swiglu", pos="rope")
    assert all(isinstance(b, SharedFFNBlock) and b.shared[0] is wide.shared_mlp for b in wide.blocks)
    assert sorted(k for k in wide.state_dict() if "mlp" in k) == ["shared_mlp.fc.weight", "shared_mlp.proj.weight"]
    serial = TransformerLM(cfg_of("serial", ffn="swiglu", pos="rope", d_ff=wide.cfg.d_ff)).eval()
    sd = {k: v for k, v in wide.state_dict().items() if not k.startswith("shared_mlp.")}
    for i in range(TINY["n_layer"]):
        sd |= {f"blocks.{i}.mlp.{k}": v for k, v in wide.shared_mlp.state_dict().items()}
    serial.load_state_dict(sd)
    idx = tokens(2, 12)
    assert max_diff(wide(idx), serial(idx)) < 1e-6


def test_parallel_2norm_with_equal_norms_is_parallel():
    two = model_of("parallel-2norm", pos="rope", n_kv_head=2)
    one = TransformerLM(cfg_of("parallel", block="parallel-unfused", pos="rope", n_kv_head=2)).eval()
    sd = {k.replace(".ln_1.", ".ln."): v for k, v in two.state_dict().items() if ".ln_2." not in k}
    one.load_state_dict(sd)
    idx = tokens(2, 12)
    assert max_diff(two(idx), one(idx)) > 1e-3                          # ln_2 differs from ln_1 ...
    with torch.no_grad():
        for b in two.blocks:
            b.ln_2.weight.copy_(b.ln_1.weight)
    assert max_diff(two(idx), one(idx)) < 1e-6                          # ... and with it equal, one norm


def test_chunked_scan_equals_the_recurrence():
    g = torch.Generator().manual_seed(0)
    B, nh, T, P, N = 2, 3, 11, 4, 5
    x, Bm, Cm = torch.randn(B, nh, T, P, generator=g), torch.randn(B, T, N, generator=g), torch.randn(B, T, N, generator=g)
    h0 = torch.randn(B, nh, N, P, generator=g)
    for log_a in (-torch.rand(B, nh, T, generator=g),                  # decays in (0.37, 1)
                  -30 * torch.rand(B, nh, T, generator=g)):             # near 0: exp(+cum) would overflow
        h, ys = h0, []
        for t in range(T):
            y, h = ssd_step(x[:, :, t:t + 1], log_a[:, :, t:t + 1], Bm[:, t:t + 1], Cm[:, t:t + 1], h)
            ys.append(y)
        for chunk in (4, 11, 32):                                       # partial last chunk, one, larger
            y_scan, h_scan = ssd_scan(x, log_a, Bm, Cm, h0, chunk=chunk)
            assert max_diff(y_scan, torch.cat(ys, dim=2)) < 1e-5 and max_diff(h_scan, h) < 1e-5
    # the step itself, against the formula for one batch row and head: H = a H + B xᵀ, y = Hᵀ C
    H = h0[0, 1].clone()
    for t in range(3):
        H = log_a[0, 1, t].exp() * H + torch.outer(Bm[0, t], x[0, 1, t])
    h = h0
    for t in range(3):
        y, h = ssd_step(x[:, :, t:t + 1], log_a[:, :, t:t + 1], Bm[:, t:t + 1], Cm[:, t:t + 1], h)
    assert max_diff(h[0, 1], H) < 1e-5 and max_diff(y[0, 1, 0], H.T @ Cm[0, 2]) < 1e-5


def test_hybrid_mixer_matches_its_formula():
    """mixer(h) = proj((norm_attn(attn) + norm_ssm(ssm * silu(z))) / 2), the SSM run token by token."""
    cfg = cfg_of("hybrid", n_kv_head=2, norm="rmsnorm", d_state=3)
    torch.manual_seed(0)
    mixer = perturb_(HybridMixer(cfg))
    h = torch.randn(2, 7, cfg.n_embd, generator=torch.Generator().manual_seed(1))
    qkv, x, z, Bm, Cm, dt = mixer.w_in(h).split(mixer.split, dim=-1)
    att = attend(qkv, cfg.n_head, cfg.n_kv_head)                         # pinned in test_model.py
    step = F.softplus(dt + mixer.dt_bias)                               # (B, T, nh)
    ssm = torch.zeros(2, 7, cfg.n_head, cfg.head_size)
    for b in range(2):
        for head in range(cfg.n_head):
            H = torch.zeros(cfg.d_state, cfg.head_size)
            for t in range(7):
                xt = x[b, t].view(cfg.n_head, cfg.head_size)[head] * step[b, t, head]
                H = torch.exp(-step[b, t, head]) * H + torch.outer(Bm[b, t], xt)
                ssm[b, t, head] = H.T @ Cm[b, t]
    ssm = ssm.flatten(2) * F.silu(z)
    expected = mixer.proj((mixer.norm_attn(att) + mixer.norm_ssm(ssm)) / 2)
    assert max_diff(mixer(h), expected) < 1e-5
    assert (step[0, 0] - F.softplus(dt[0, 0])).abs().max() > 1e-3      # dt_bias is used
