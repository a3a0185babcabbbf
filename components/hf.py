"""Hugging Face causal-LM checkpoints <-> archflow models: configs and state dicts, both ways, as pure
functions of dicts and tensors (tasks/hf_import.py and tasks/export.py read and write the files).

    python -m tasks.hf_import <hf_dir> models/<name>      # HF directory -> archflow model directory
    python -m tasks.export models/<name> <hf_dir>         # archflow model directory -> HF directory

    HF model_type         archflow
    llama, mistral        serial, rmsnorm, swiglu, rope (GQA; bias: Llama's attention_bias = mlp_bias)
    qwen2                 the same with qkv_bias (biases on q, k, v only)
    gpt_neox (Pythia)     parallel-2norm (use_parallel_residual false: serial), layernorm, gelu, bias,
                          rope on the first rotary_pct of each head
    falcon                parallel (one layernorm; new_decoder_architecture with two: parallel-2norm;
                          parallel_attn false: serial), layernorm with a bias (norm_bias), gelu, rope, MQA/GQA

RoPE: HF's Llama, GPT-NeoX and Falcon rotate halves of each head (rotate_half), as archflow does, so
q/k rows copy without a permutation (Meta's original Llama weights pair interleaved channels; HF's
conversion script permuted them already). What differs is the order of the fused q, k, v rows: HF
GPT-NeoX and Falcon group them per key/value head ([q of the group's heads, k, v] per group),
archflow stacks them ([all q; all k; all v]); `grouped_to_qkv` and `qkv_to_grouped` convert.

Every HF option archflow cannot compute exactly (sliding windows, ALiBi, rope scaling, other
activations, MoE families, ...) is a problem of `hf_problems`, reported before any tensor is read.
"""
from __future__ import annotations

import torch

from components.config import ModelConfig
from components.errors import ParamsError
from components.model import fuse_parallel_state_dict, unfuse_parallel_state_dict

FAMILIES = ("llama", "mistral", "qwen2", "gpt_neox", "falcon")
LLAMA_LIKE = ("llama", "mistral", "qwen2")         # one tensor layout: q, k, v, gate, up as separate matrices
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "gpt_neox": "GPTNeoXForCausalLM", "falcon": "FalconForCausalLM"}
# Model types people will try, and why each is not mapped (the rest: "no mapping").
REFUSED = {
    "mixtral": "a mixture-of-experts model: import a dense model and upcycle it (upcycle@) instead",
    "qwen2_moe": "a mixture-of-experts model: import a dense model and upcycle it (upcycle@) instead",
    "gptj": "its lm_head has a bias and its activation is gelu_new (tanh): archflow's head has none, gelu is exact",
    "phi": "its lm_head has a bias and its activation is gelu_new (tanh): archflow's head has none, gelu is exact",
    "gpt2": "learned positions with gelu_new (tanh) and Conv1D weights: not mapped yet",
}


# ---------------------------------------------------------------------------------------------
# configs


def hf_problems(hf: dict) -> list[str]:
    """Every reason the HF config `hf` (config.json, with transformers' defaults filled in) has no
    exact archflow equivalent, each naming the field and the fix; empty if it maps."""
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        why = REFUSED.get(kind, "no mapping")
        return [f"model_type={kind!r}: {why}; archflow imports {', '.join(FAMILIES)}"]
    p = []
    if hf.get("rope_scaling"):
        p.append(f"rope_scaling={hf['rope_scaling']}: archflow's rope has no scaling (linear, dynamic, yarn, "
                 f"llama3): pick a checkpoint without it")
    if hf.get("quantization_config"):
        p.append("quantization_config is set: import the unquantised checkpoint (compress@ quantises to int8)")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    if n_embd % n_head:
        p.append(f"hidden_size={n_embd} is not divisible by num_attention_heads={n_head}")
    if kind in LLAMA_LIKE:
        if hf.get("hidden_act") != "silu":
            p.append(f"hidden_act={hf.get('hidden_act')!r}: archflow's swiglu gates with silu only")
        if hf.get("head_dim") not in (None, n_embd // n_head):
            p.append(f"head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads={n_embd // n_head}: "
                     f"archflow derives the head size from n_embd/n_head")
        if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
            p.append(f"attention_bias={hf.get('attention_bias')} and mlp_bias={hf.get('mlp_bias')} differ: "
                     f"archflow's bias is all-or-none")
        if hf.get("sliding_window") is not None and hf["sliding_window"] < hf["max_position_embeddings"]:
            p.append(f"sliding_window={hf['sliding_window']} < max_position_embeddings="
                     f"{hf['max_position_embeddings']}: archflow attends to the whole context; set sliding_window "
                     f"to null only if the model was trained without one")
        if any(t != "full_attention" for t in hf.get("layer_types") or []):
            p.append(f"layer_types={hf['layer_types']} has sliding-window layers (use_sliding_window): archflow "
                     f"attends to the whole context in every layer")
    elif kind == "gpt_neox":
        if hf.get("hidden_act") != "gelu":
            p.append(f"hidden_act={hf.get('hidden_act')!r}: archflow's gelu is the exact (erf) one, 'gelu'")
        if not hf.get("attention_bias", True):
            p.append("attention_bias=false with GPT-NeoX's always-biased MLP: archflow's bias is all-or-none")
        rope_dim = int(n_embd // n_head * hf.get("rotary_pct", 1.0))
        if rope_dim % 2 or rope_dim < 2:
            p.append(f"rotary_pct={hf.get('rotary_pct')} rotates {rope_dim} channels per head: archflow needs an "
                     f"even number >= 2")
    elif kind == "falcon":
        p += falcon_problems(hf)
    return p


def falcon_problems(hf: dict) -> list[str]:
    p = []
    if hf.get("alibi"):
        p.append("alibi=true: archflow has learned and rotary positions, no ALiBi")
    if hf.get("activation", "gelu") != "gelu":
        p.append(f"activation={hf.get('activation')!r}: archflow's gelu is the exact (erf) one, 'gelu'")
    new, parallel = hf.get("new_decoder_architecture"), hf.get("parallel_attn", True)
    if new and not parallel:
        p.append("new_decoder_architecture=true with parallel_attn=false: transformers itself cannot run it")
    if not new and hf.get("num_ln_in_parallel_attn") == 2:
        p.append("num_ln_in_parallel_attn=2 without new_decoder_architecture: transformers itself cannot run it")
    if not new and not hf.get("multi_query", True) and hf.get("num_kv_heads") != hf["num_attention_heads"]:
        p.append(f"num_kv_heads={hf.get('num_kv_heads')} with multi_query=false needs new_decoder_architecture")
    return p


def config_from_hf(hf: dict) -> ModelConfig:
    """The ModelConfig of an HF config; one ParamsError naming every problem if it has none."""
    if problems := hf_problems(hf):
        raise ParamsError("this Hugging Face checkpoint cannot be imported exactly:\n"
                          + "\n".join(f"  - {p}" for p in problems))
    kind = hf["model_type"]
    common = dict(vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
                  n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
                  pos="rope", tie_embeddings=hf.get("tie_word_embeddings", True))
    if kind in LLAMA_LIKE:                                 # Qwen2: biases on q, k, v only
        own = dict(n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                   d_ff=hf["intermediate_size"], block="serial", ffn="swiglu", norm="rmsnorm",
                   rope_base=float(hf.get("rope_theta", 10000.0)), bias=bool(hf.get("attention_bias", False)),
                   qkv_bias=kind == "qwen2", norm_eps=hf["rms_norm_eps"])
    elif kind == "gpt_neox":
        own = dict(d_ff=hf["intermediate_size"], block="parallel-2norm" if hf["use_parallel_residual"] else "serial",
                   ffn="gelu", norm="layernorm", rope_base=float(hf.get("rotary_emb_base", 10000.0)),
                   rotary_pct=float(hf.get("rotary_pct", 1.0)), bias=True, norm_eps=hf["layer_norm_eps"])
    else:
        own = dict(n_kv_head=falcon_kv_heads(hf), d_ff=hf.get("ffn_hidden_size") or 4 * hf["hidden_size"],
                   block=falcon_block(hf), ffn="gelu", norm="layernorm", rope_base=float(hf.get("rope_theta", 10000.0)),
                   bias=bool(hf.get("bias")), norm_bias=not hf.get("bias"), norm_eps=hf["layer_norm_epsilon"])
    try:
        return ModelConfig(**common, **own)
    except ValueError as e:
        raise ParamsError(f"the Hugging Face config maps to an impossible ModelConfig: {e}") from None


def falcon_kv_heads(hf: dict) -> int:
    if not hf.get("new_decoder_architecture") and hf.get("multi_query", True):
        return 1
    return hf.get("num_kv_heads") or hf["num_attention_heads"]


def falcon_block(hf: dict) -> str:
    if not hf.get("parallel_attn", True):
        return "serial"
    if hf.get("new_decoder_architecture") and (hf.get("num_ln_in_parallel_attn") or 2) == 2:
        return "parallel-2norm"
    return "parallel"


def export_problems(cfg: ModelConfig, kind: str) -> list[str]:
    """Why HF family `kind` cannot express an archflow model of config cfg (empty if it can)."""
    p = []
    want = {"llama": dict(norm="rmsnorm", ffn="swiglu", qkv_bias=False),
            "mistral": dict(norm="rmsnorm", ffn="swiglu", bias=False, qkv_bias=False),
            "qwen2": dict(norm="rmsnorm", ffn="swiglu", bias=False, qkv_bias=True),
            "gpt_neox": dict(norm="layernorm", ffn="gelu", bias=True, n_kv_head=cfg.n_head),
            "falcon": dict(norm="layernorm", ffn="gelu", rotary_pct=1.0, qkv_bias=False)}[kind]
    blocks = {"llama": ("serial",), "mistral": ("serial",), "qwen2": ("serial",),
              "gpt_neox": ("serial", "parallel-2norm"),
              "falcon": ("serial", "parallel", "parallel-unfused", "parallel-2norm")}[kind]
    if cfg.block not in blocks:
        p.append(f"block={cfg.block!r} (it has {', '.join(blocks)})")
    if kind in LLAMA_LIKE and cfg.rotary_pct != 1.0:
        p.append(f"rotary_pct={cfg.rotary_pct} (it rotates whole heads)")
    if cfg.pos != "rope":
        p.append(f"pos={cfg.pos!r} (it has rope)")
    p += [f"{name}={getattr(cfg, name)!r} (it needs {value!r})" for name, value in want.items()
          if getattr(cfg, name) != value]
    if kind == "falcon" and cfg.block == "serial" and 1 < cfg.n_kv_head < cfg.n_head:
        p.append(f"n_kv_head={cfg.n_kv_head} in a serial block (it has GQA in parallel blocks only)")
    return p


def archflow_problems(cfg: ModelConfig) -> list[str]:
    """What no HF family has: the stacks, routed parts and per-layer widths of archflow's own designs."""
    p = []
    if cfg.block in ("par", "one-wide-ffn", "hybrid"):
        p.append(f"block={cfg.block!r} has no Hugging Face equivalent")
    for name, why in (("dwa", "DenseFormer's depth-weighted averaging"), ("n_expert", "an MoE FFN"),
                      ("n_attn_expert", "a mixture of attention"),
                      ("layer_d_ff", "per-layer widths (pruned, attention dropped or FFNs fused)"),
                      ("parallel_runs", "block-parallel runs of layers (FFN Fusion)")):
        if getattr(cfg, name):
            p.append(f"{name}={getattr(cfg, name)!r}: {why} has no Hugging Face equivalent")
    if cfg.n_loop != 1:
        p.append(f"n_loop={cfg.n_loop}: a looped (weight-shared) stack has no Hugging Face equivalent")
    return p


def hf_family(cfg: ModelConfig, prefer: str | None = None) -> str:
    """The HF model_type an archflow config exports to: `prefer` (the family it was imported from)
    when that one can express it, else the first of FAMILIES that can; a ParamsError saying why
    none can otherwise."""
    if problems := archflow_problems(cfg):
        raise ParamsError("this model cannot be exported to Hugging Face:\n" + "\n".join(f"  - {p}" for p in problems))
    order = [prefer] + [k for k in FAMILIES if k != prefer] if prefer in FAMILIES else list(FAMILIES)
    for kind in order:
        if not export_problems(cfg, kind):
            return kind
    raise ParamsError("no Hugging Face family expresses this model exactly:\n"
                      + "\n".join(f"  - {kind}: " + "; ".join(export_problems(cfg, kind)) for kind in FAMILIES))


def hf_config(cfg: ModelConfig, kind: str) -> dict:
    """The config.json of family `kind` for cfg (hf_family(cfg) picks kind); transformers fills the rest."""
    common = dict(model_type=kind, architectures=[ARCHITECTURES[kind]], vocab_size=cfg.vocab_size,
                  hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                  max_position_embeddings=cfg.block_size, tie_word_embeddings=cfg.tie_embeddings,
                  rope_scaling=None, torch_dtype="float32", bos_token_id=None, eos_token_id=None)
    if kind in LLAMA_LIKE:
        own = dict(num_key_value_heads=cfg.n_kv_head, intermediate_size=cfg.d_ff, hidden_act="silu",
                   rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_base)
        own |= {"llama": dict(head_dim=cfg.head_size, attention_bias=cfg.bias, mlp_bias=cfg.bias),
                "mistral": dict(head_dim=None, sliding_window=None),
                "qwen2": dict(use_sliding_window=False, sliding_window=None)}[kind]
    elif kind == "gpt_neox":
        own = dict(intermediate_size=cfg.d_ff, hidden_act="gelu", rotary_pct=cfg.rotary_pct,
                   rotary_emb_base=cfg.rope_base, layer_norm_eps=cfg.norm_eps, attention_bias=True,
                   use_parallel_residual=cfg.block == "parallel-2norm")
    else:
        mqa, mha = cfg.n_kv_head == 1, cfg.n_kv_head == cfg.n_head
        new = cfg.block == "parallel-2norm" or not (mqa or mha)   # GQA, two norms: Falcon-40B's layout
        own = dict(ffn_hidden_size=cfg.d_ff, activation="gelu", alibi=False, bias=cfg.bias,
                   layer_norm_epsilon=cfg.norm_eps, rope_theta=cfg.rope_base, parallel_attn=cfg.block != "serial",
                   new_decoder_architecture=new, multi_query=mqa, num_kv_heads=cfg.n_kv_head,
                   num_ln_in_parallel_attn=1 if new and cfg.block != "parallel-2norm" else None)  # None: 2 if new
    return common | own


# ---------------------------------------------------------------------------------------------
# checkpoint files


PICKLES = (".bin", ".pt", ".pth", ".ckpt")                 # torch.save files: unpickling can run code


def weights_problem(files: set[str]) -> str | None:
    """Why a checkpoint directory holding `files` (names) has no weights hf_import reads, or None:
    it reads safetensors only, model.safetensors or the shards model.safetensors.index.json lists
    (the dtype stored, float32, bfloat16 or float16, is upcast to float32 exactly). A pickle-only
    directory (pytorch_model.bin, *.pt, ...) is refused rather than unpickled: converting it once,
    where its source is trusted, gives a directory every tool can read without running code."""
    if {"model.safetensors", "model.safetensors.index.json"} & files:
        return None
    if pickles := sorted(f for f in files if f.endswith(PICKLES) or f == "pytorch_model.bin.index.json"):
        return (f"has PyTorch pickle weights ({', '.join(pickles)}) and no model.safetensors: hf_import reads "
                f"safetensors only, as unpickling a file can run code. Convert it where you trust its source: "
                f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir) writes model.safetensors (or "
                f"download the repository's *.safetensors files)")
    return ("has no weights (no model.safetensors, nor a model.safetensors.index.json of shards): give the "
            "directory save_pretrained wrote, or download the checkpoint's *.safetensors files beside config.json")


# ---------------------------------------------------------------------------------------------
# fused q, k, v rows


def grouped_to_qkv(t: torch.Tensor, n_head: int, n_kv_head: int) -> torch.Tensor:
    """Rows grouped per kv head, [q_{g*r}..q_{g*r+r-1}, k_g, v_g] for g = 0..nkv-1 (r = nh/nkv;
    GPT-NeoX: r = 1, Falcon), -> archflow's [q_0..q_{nh-1}; k_0..; v_0..]. t: (rows, in) or (rows,)."""
    r = n_head // n_kv_head
    g = t.reshape(n_kv_head, r + 2, -1, *t.shape[1:])               # (nkv, r+2, hs, ...)
    q, k, v = g[:, :r], g[:, r], g[:, r + 1]
    return torch.cat([q.reshape(-1, *t.shape[1:]), k.reshape(-1, *t.shape[1:]), v.reshape(-1, *t.shape[1:])])


def qkv_to_grouped(t: torch.Tensor, n_head: int, n_kv_head: int) -> torch.Tensor:
    """The inverse of grouped_to_qkv."""
    r, hs = n_head // n_kv_head, t.size(0) // (n_head + 2 * n_kv_head)
    q, k, v = t.split([n_head * hs, n_kv_head * hs, n_kv_head * hs])
    rest = t.shape[1:]
    g = torch.cat([q.reshape(n_kv_head, r, hs, *rest), k.reshape(n_kv_head, 1, hs, *rest),
                   v.reshape(n_kv_head, 1, hs, *rest)], dim=1)      # (nkv, r+2, hs, ...)
    return g.reshape(-1, *rest)


# ---------------------------------------------------------------------------------------------
# state dicts. Per family: the HF name of each archflow tensor of layer i (unfused parallel names:
# `ln`, `attn.qkv`, ...; fuse_parallel_state_dict makes the fused block's), where one HF tensor is
# one archflow tensor. attn.qkv (and Llama's mlp.fc) are put together by state_from_hf.


def names(cfg: ModelConfig, kind: str) -> tuple[dict, dict]:
    """({archflow name: HF name} of the model-level tensors, the same of layer i's with `{i}`)."""
    if kind in LLAMA_LIKE:
        top = {"wte.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight"}
        layer = {"ln_1.weight": "input_layernorm.weight", "ln_2.weight": "post_attention_layernorm.weight",
                 "attn.proj": "self_attn.o_proj", "mlp.proj": "mlp.down_proj"}
        prefix = "model.layers.{i}."
    elif kind == "gpt_neox":
        top = {"wte.weight": "gpt_neox.embed_in.weight", "norm_f": "gpt_neox.final_layer_norm"}
        layer = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.qkv": "attention.query_key_value",
                 "attn.proj": "attention.dense", "mlp.fc": "mlp.dense_h_to_4h", "mlp.proj": "mlp.dense_4h_to_h"}
        prefix = "gpt_neox.layers.{i}."
    else:
        top = {"wte.weight": "transformer.word_embeddings.weight", "norm_f": "transformer.ln_f"}
        one = {"ln": "input_layernorm"}                     # parallel: unfused names (fused by state_from_hf)
        norms = {"parallel": one, "parallel-unfused": one, "parallel-2norm": {"ln_1": "ln_attn", "ln_2": "ln_mlp"},
                 "serial": {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm"}}[cfg.block]
        layer = norms | {"attn.qkv": "self_attention.query_key_value", "attn.proj": "self_attention.dense",
                         "mlp.fc": "mlp.dense_h_to_4h", "mlp.proj": "mlp.dense_4h_to_h"}
        prefix = "transformer.h.{i}."
    if not cfg.tie_embeddings:
        top["lm_head.weight"] = "embed_out.weight" if kind == "gpt_neox" else "lm_head.weight"
    return leaves(top, cfg), {a: prefix + h for a, h in leaves(layer, cfg).items()}


def leaves(table: dict, cfg: ModelConfig) -> dict:
    """Module names -> weight (and bias, where the config has them) names; names with a leaf stay."""
    out = {}
    for a, h in table.items():
        if a.endswith((".weight", ".bias")):
            out[a] = h
            continue
        is_norm = a.startswith(("ln", "norm_f"))
        out[f"{a}.weight"] = f"{h}.weight"
        if cfg.bias or (is_norm and cfg.norm_bias):
            out[f"{a}.bias"] = f"{h}.bias"
    return out


def state_from_hf(cfg: ModelConfig, kind: str, hf_sd: dict) -> dict:
    """The archflow state dict (cfg's block names) of an HF state dict of family kind."""
    top, layer = names(cfg, kind)
    sd = {a: hf_sd[h] for a, h in top.items()}
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        sd |= {p + a: hf_sd[h.format(i=i)] for a, h in layer.items()}
        if kind in LLAMA_LIKE:
            hp = f"model.layers.{i}."
            for leaf in parts(cfg.bias or cfg.qkv_bias):
                sd[f"{p}attn.qkv.{leaf}"] = torch.cat([hf_sd[f"{hp}self_attn.{x}_proj.{leaf}"] for x in "qkv"])
            for leaf in parts(cfg.bias):
                sd[f"{p}mlp.fc.{leaf}"] = torch.cat([hf_sd[f"{hp}mlp.{x}_proj.{leaf}"] for x in ("gate", "up")])
        else:
            for leaf in parts(cfg.bias):
                sd[f"{p}attn.qkv.{leaf}"] = grouped_to_qkv(sd[f"{p}attn.qkv.{leaf}"], cfg.n_head, cfg.n_kv_head)
    if cfg.block == "parallel":
        sd = fuse_parallel_state_dict(sd)
    return {k: v.contiguous() for k, v in sd.items()}


def state_to_hf(cfg: ModelConfig, kind: str, sd: dict) -> dict:
    """The HF state dict of family kind of an archflow state dict (float weights; the tied
    lm_head left out, as transformers ties it on load). The inverse of state_from_hf."""
    sd = unfuse_parallel_state_dict(sd, cfg)
    top, layer = names(cfg, kind)
    hf = {h: sd[a] for a, h in top.items()}
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        hf |= {h.format(i=i): sd[p + a] for a, h in layer.items() if not a.startswith(("attn.qkv", "mlp.fc"))}
        hp, hs = f"model.layers.{i}.", cfg.head_size
        for leaf in parts(cfg.bias or cfg.qkv_bias):
            qkv = sd[f"{p}attn.qkv.{leaf}"]
            if kind in LLAMA_LIKE:
                for x, t in zip("qkv", qkv.split([cfg.n_head * hs, cfg.n_kv_head * hs, cfg.n_kv_head * hs])):
                    hf[f"{hp}self_attn.{x}_proj.{leaf}"] = t
            else:
                hf[layer[f"attn.qkv.{leaf}"].format(i=i)] = qkv_to_grouped(qkv, cfg.n_head, cfg.n_kv_head)
        for leaf in parts(cfg.bias):
            fc = sd[f"{p}mlp.fc.{leaf}"]
            if kind in LLAMA_LIKE:
                hf[f"{hp}mlp.gate_proj.{leaf}"], hf[f"{hp}mlp.up_proj.{leaf}"] = fc.chunk(2)
            else:
                hf[layer[f"mlp.fc.{leaf}"].format(i=i)] = fc
    return {k: v.contiguous() for k, v in hf.items()}


def parts(bias: bool) -> tuple[str, ...]:
    return ("weight", "bias") if bias else ("weight",)


def hf_norm_biases(cfg: ModelConfig, kind: str) -> list[str]:
    """HF layernorm biases archflow's config has none of (a Falcon export of bias: false, norm_bias:
    false): written as zeros, which is exact."""
    if kind != "falcon" or cfg.bias or cfg.norm_bias:
        return []
    norm_cfg = ModelConfig(**{**cfg.to_dict(), "norm_bias": True})
    top, layer = names(norm_cfg, kind)
    biased = [h for a, h in top.items() if a.endswith(".bias")]
    return biased + [h.format(i=i) for i in range(cfg.n_layer) for a, h in layer.items() if a.endswith(".bias")]


def dequantized_state(sd: dict) -> dict:
    """A float state dict of an int8 one (components/quant.py): each W_q (out, in) int8 with its
    per-row scale s -> W_q * s, the weight the int8 model computes with."""
    out = {}
    for k, t in sd.items():
        if k.endswith(".weight_q"):
            base = k[: -len("weight_q")]
            out[base + "weight"] = t.float() * sd[base + "scale"][:, None]
        elif not (k.endswith(".scale") and k[: -len("scale")] + "weight_q" in sd):
            out[k] = t
    return out
