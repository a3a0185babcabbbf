"""Compression transforms (docs/methods.md: attention-drop, ffn-fusion, pruning, int8): int8 weights,
structured pruning of attention KV groups and FFN channels, attention removal and FFN Fusion. Pure
functions of a model (and calibration batches); each returns a new TransformerLM whose config
describes it, so `save_model_dir` / `load_model_dir` need nothing else. The compress@ stage
(tasks/compress.py) runs them and trains afterwards; which models each method takes is checked in
components/params.py (compress_shape_problems, fusion_run_problems).

    small = prune(model, *keep_by_score(importance(model, "taylor", batches), fraction=0.3))
    ffn_only = drop_attention(model, [1, 2])     # layers 1, 2: FFN-only, still one after the other
    fused = fuse_ffns(ffn_only, [(1, 2)])        # then one wide FFN layer: x + f1(x) + f2(x)
    side_by_side = parallel_blocks(model, [(1, 2)])   # whole layers 1, 2 read the same input
    q8 = quantize(model, embeddings=True)

Pruning units, per layer i: a KV group g (its n_head/n_kv_head query heads, its key and value
head: q/k/v rows of the input projection, columns of the output projection) and an FFN channel c
(row c of fc, and row d_ff + c for swiglu's up half; column c of proj). Scores of a unit sum
element scores over those rows and columns: magnitude |W|, wanda |W| * ||X_j||_2 (X_j: input
feature j over the calibration tokens), taylor |W * dL/dW| (gradients summed over the batches).
"""
from __future__ import annotations

import copy
from dataclasses import replace

import torch
import torch.nn as nn

from components.config import ModelConfig
from components.model import FUSED_NAMES, TransformerLM, ffn_in_dim, fused_split, lm_loss
from components.quant import quantize_int8_

CRITERIA = ("magnitude", "wanda", "taylor")
Batch = tuple[torch.Tensor, torch.Tensor]       # inputs, targets: (B, T) each


# ---------------------------------------------------------------------------------------------
# int8


def quantize(model: TransformerLM, embeddings: bool) -> TransformerLM:
    """A copy of `model` with int8 weights in every Linear (and the embedding and head with `embeddings`)."""
    q = quantize_int8_(copy.deepcopy(model).cpu(), embeddings)
    q.cfg = replace(model.cfg, quant="int8", quant_embeddings=embeddings)
    return q.eval()


# ---------------------------------------------------------------------------------------------
# where a layer's units live


def layer_linears(cfg: ModelConfig, i: int) -> dict:
    """Names of layer i's matrices: qkv (input rows of q, k, v), o (attention output), fc (FFN input
    rows, from row fc_offset), proj (FFN output), norm (the norm before the FFN). The fused parallel
    block keeps qkv and fc in one matrix (model.FUSED_NAMES); an FFN-only layer has no qkv or o."""
    b = f"blocks.{i}."
    if cfg.layer_widths(i)[0] == 0:
        return {"qkv": None, "o": None, "fc": b + "mlp.fc", "fc_offset": 0, "proj": b + "mlp.proj", "norm": b + "ln"}
    fused = cfg.block == "parallel"
    name = {m: b + (FUSED_NAMES[m] if fused else m) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    return {"qkv": name["attn.qkv"], "o": name["attn.proj"], "fc": name["mlp.fc"], "proj": name["mlp.proj"],
            "fc_offset": fused_split(cfg, i)[0] if fused else 0, "norm": b + ("ln" if fused else "ln_2")}


def group_index(cfg: ModelConfig, i: int, groups: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of the qkv matrix, columns of the attention output) of KV groups `groups` of layer i,
    in the layout [q of their heads; k; v] that a layer with just these groups has."""
    n_head, n_kv_head, _ = cfg.layer_widths(i)
    hs, r = cfg.head_size, n_head // n_kv_head
    g = torch.tensor(groups, dtype=torch.long)
    heads = (g[:, None] * r + torch.arange(r)).flatten()                 # query heads of the groups
    q = (heads[:, None] * hs + torch.arange(hs)).flatten()
    kv = (g[:, None] * hs + torch.arange(hs)).flatten()
    return torch.cat([q, n_head * hs + kv, (n_head + n_kv_head) * hs + kv]), q


def channel_index(cfg: ModelConfig, i: int, channels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of the FFN input matrix, columns of the FFN output) of channels `channels` of layer i."""
    d_ff = cfg.layer_widths(i)[2]
    c = torch.tensor(channels, dtype=torch.long)
    return (torch.cat([c, d_ff + c]) if cfg.ffn == "swiglu" else c), c


# ---------------------------------------------------------------------------------------------
# pruning


def prune(model: TransformerLM, keep_groups: list[list[int]], keep_channels: list[list[int]]) -> TransformerLM:
    """A physically smaller copy of `model` with, in layer i, only KV groups keep_groups[i] and FFN
    channels keep_channels[i] (keeping everything gives back the same model)."""
    cfg, sd = model.cfg, model.state_dict()
    out = dict(sd)
    widths = []
    for i in range(cfg.n_layer):
        n_head, n_kv_head, _ = cfg.layer_widths(i)
        names = layer_linears(cfg, i)
        fc_rows, proj_cols = channel_index(cfg, i, keep_channels[i])
        rows = {names["fc"]: names["fc_offset"] + fc_rows}
        cols = {names["proj"]: proj_cols}
        if names["qkv"]:
            qkv_rows, o_cols = group_index(cfg, i, keep_groups[i])
            rows[names["qkv"]] = torch.cat([qkv_rows, rows[names["fc"]]]) if names["qkv"] == names["fc"] else qkv_rows
            cols[names["o"]] = o_cols
        for name, idx in rows.items():
            for leaf in ("weight", "bias"):
                if f"{name}.{leaf}" in sd:
                    out[f"{name}.{leaf}"] = sd[f"{name}.{leaf}"][idx]
        for name, idx in cols.items():
            out[f"{name}.weight"] = sd[f"{name}.weight"][:, idx]
        kept = len(keep_groups[i]) if names["qkv"] else 0
        widths.append((kept * (n_head // max(n_kv_head, 1)), kept, len(keep_channels[i])))
    return rebuild(model, out, widths)


def rebuild(model: TransformerLM, sd: dict, widths: list[tuple[int, int, int]]) -> TransformerLM:
    """A new model of `model`'s config with per-layer (n_head, n_kv_head, d_ff) `widths`, holding `sd`."""
    n_head, n_kv_head, d_ff = (list(w) for w in zip(*widths))
    cfg = replace(model.cfg, n_layer=len(widths), layer_n_head=n_head, layer_n_kv_head=n_kv_head, layer_d_ff=d_ff)
    new = TransformerLM(cfg).to(next(model.parameters()).device)        # on the source's device
    new.load_state_dict({k: v.clone() for k, v in sd.items()})
    return new.eval()


def unit_counts(cfg: ModelConfig) -> tuple[list[int], list[int]]:
    """(KV groups, FFN channels) of every layer."""
    return [cfg.layer_widths(i)[1] for i in range(cfg.n_layer)], [cfg.layer_widths(i)[2] for i in range(cfg.n_layer)]


def importance(model: TransformerLM, criterion: str, batches: list[Batch]) -> tuple[list, list]:
    """(scores of the KV groups, scores of the FFN channels), one tensor per layer each."""
    element = element_scores(model, criterion, batches)
    cfg = model.cfg
    groups, channels = [], []
    for i, (n_groups, d_ff) in enumerate(zip(*unit_counts(cfg))):
        names = layer_linears(cfg, i)
        fc, proj = element[names["fc"]], element[names["proj"]]
        c_rows = [channel_index(cfg, i, [c])[0] + names["fc_offset"] for c in range(d_ff)]
        channels.append(torch.stack([fc[r].sum() + proj[:, c].sum() for c, r in enumerate(c_rows)]))
        if names["qkv"]:
            qkv, o = element[names["qkv"]], element[names["o"]]
            idx = [group_index(cfg, i, [g]) for g in range(n_groups)]
            groups.append(torch.stack([qkv[r].sum() + o[:, c].sum() for r, c in idx]))
        else:
            groups.append(torch.zeros(0))
    return groups, channels


def element_scores(model: TransformerLM, criterion: str, batches: list[Batch]) -> dict[str, torch.Tensor]:
    """Module name -> element scores (out, in) of every Linear in the blocks."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("blocks.")}
    if criterion == "magnitude":
        return {name: m.weight.detach().abs() for name, m in linears.items()}
    if criterion == "wanda":
        sq = {name: torch.zeros(m.in_features) for name, m in linears.items()}   # sum over tokens of x_j^2

        def record(name):
            def hook(module, args):
                sq[name].add_(args[0].detach().float().pow(2).flatten(0, -2).sum(0))
            return hook
        hooks = [m.register_forward_pre_hook(record(name)) for name, m in linears.items()]
        with torch.no_grad():
            for x, _ in batches:
                model(x)
        for h in hooks:
            h.remove()
        return {name: m.weight.detach().abs() * sq[name].sqrt()[None, :] for name, m in linears.items()}
    if criterion == "taylor":
        model.zero_grad(set_to_none=True)
        for x, y in batches:
            lm_loss(model(x), y).backward()
        scores = {name: (m.weight.detach() * m.weight.grad).abs() for name, m in linears.items()}
        model.zero_grad(set_to_none=True)
        return scores
    raise ValueError(f"criterion {criterion!r} is unknown: use one of {', '.join(CRITERIA)}")


def keep_by_score(scores: tuple[list, list], fraction: float) -> tuple[list[list[int]], list[list[int]]]:
    """(KV groups, FFN channels) to keep in each layer: of each kind, the round(fraction * total)
    lowest-scoring units over all layers go, but every layer keeps at least one of each."""
    return tuple(keep_top(layer_scores, fraction) for layer_scores in scores)


def keep_top(scores: list[torch.Tensor], fraction: float) -> list[list[int]]:
    n_drop = round(fraction * sum(len(s) for s in scores))
    left = [len(s) for s in scores]
    dropped = set()
    for _, i, u in sorted((s.item(), i, u) for i, layer in enumerate(scores) for u, s in enumerate(layer)):
        if len(dropped) == n_drop:
            break
        if left[i] > 1:
            dropped.add((i, u))
            left[i] -= 1
    return [[u for u in range(len(layer)) if (i, u) not in dropped] for i, layer in enumerate(scores)]


# ---------------------------------------------------------------------------------------------
# attention removal


def drop_attention(model: TransformerLM, layers: list[int]) -> TransformerLM:
    """Attention removal (docs/methods.md#attention-drop): each layer of `layers` loses its attention
    sublayer (projections and output bias) and becomes an FFN-only layer, x + FFN(norm(x)), with its own
    FFN and the norm that fed it; the stack stays sequential. Dropping none gives back the same model."""
    cfg, sd = model.cfg, model.state_dict()
    assert all(0 <= i < cfg.n_layer and cfg.layer_widths(i)[0] for i in layers), \
        "no such layer, or one without attention (attention_layer_problems)"
    out = {k: v for k, v in sd.items() if not k.startswith("blocks.")}
    widths = []
    for i in range(cfg.n_layer):
        if i in layers:
            out |= ffn_only_state(cfg, sd, i)
            widths.append((0, 0, cfg.layer_widths(i)[2]))
        else:
            out |= {k: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
            widths.append(cfg.layer_widths(i))
    return rebuild(model, out, widths)


def ffn_only_state(cfg: ModelConfig, sd: dict, i: int) -> dict:
    """Layer i's FFN and the norm in front of it, under an FFN-only layer's names (ln, mlp.fc, mlp.proj)."""
    names, d_ff, new = layer_linears(cfg, i), cfg.layer_widths(i)[2], f"blocks.{i}."
    rows = slice(names["fc_offset"], names["fc_offset"] + ffn_in_dim(cfg, d_ff))   # a fused w_in: its FFN rows
    out = {}
    for leaf in ("weight", "bias"):
        for module, part, index in (("ln", names["norm"], slice(None)), ("mlp.fc", names["fc"], rows),
                                    ("mlp.proj", names["proj"], slice(None))):
            if f"{part}.{leaf}" in sd:
                out[f"{new}{module}.{leaf}"] = sd[f"{part}.{leaf}"][index]
    return out


def search_drops(model: TransformerLM, batches: list[Batch], max_loss_increase: float) -> tuple[list, list[dict]]:
    """Greedy attention removal on calibration batches: repeatedly drop the attention whose removal (with
    those already dropped) raises the loss least, while the loss stays within max_loss_increase of the
    source's. Returns (layers, every candidate measured: {layers, loss_increase})."""
    base, chosen, measured = mean_loss(model, batches), [], []
    while True:
        best = None
        for i in range(model.cfg.n_layer):
            if i in chosen or not model.cfg.layer_widths(i)[0]:
                continue
            layers = sorted(chosen + [i])
            increase = mean_loss(drop_attention(model, layers), batches) - base
            measured.append({"layers": layers, "loss_increase": round(increase, 6)})
            if increase <= max_loss_increase and (best is None or increase < best[1]):
                best = (i, increase)
        if best is None:
            return chosen, measured
        chosen = sorted(chosen + [best[0]])


# ---------------------------------------------------------------------------------------------
# FFN Fusion


def fuse_ffns(model: TransformerLM, runs: list[tuple[int, int]]) -> TransformerLM:
    """FFN Fusion (docs/methods.md#ffn-fusion): each run [a, b] of consecutive FFN-only layers (what
    drop_attention leaves) becomes one FFN-only layer computing x + sum_j FFN_j(norm_j(x)), j = a..b:
    one wide FFN holds the concatenated FFNs, each norm's gain (and LayerNorm bias) folded into its
    rows, under one norm with unit gain. Exact with respect to that parallel formulation; the
    approximation is dropping the sequential dependency."""
    cfg, sd = model.cfg, model.state_dict()
    assert not cfg.norm_bias, "a layernorm shift without FFN biases cannot be folded (compress_shape_problems)"
    assert not any(cfg.layer_widths(j)[0] for a, b in runs for j in range(a, b + 1)), \
        "a run with attention (fusion_run_problems): drop_attention first, or parallel_blocks"
    starts = {a: b for a, b in runs}
    out = {k: v for k, v in sd.items() if not k.startswith("blocks.")}
    widths, i = [], 0
    while i < cfg.n_layer:
        new = f"blocks.{len(widths)}."
        if i in starts:
            out |= fused_ffn_state(cfg, sd, range(i, starts[i] + 1), new)
            widths.append((0, 0, sum(cfg.layer_widths(j)[2] for j in range(i, starts[i] + 1))))
            i = starts[i] + 1
            continue
        out |= {new + k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        widths.append(cfg.layer_widths(i))
        i += 1
    return rebuild(model, out, widths)


def fused_ffn_state(cfg: ModelConfig, sd: dict, layers: range, prefix: str) -> dict:
    """The state of one FFN-only layer (ln, mlp.fc, mlp.proj under `prefix`) that sums `layers`' FFNs."""
    gates, ups, fc_bias_g, fc_bias_u, projs, proj_bias = [], [], [], [], [], 0
    for j in layers:
        names, d_ff = layer_linears(cfg, j), cfg.layer_widths(j)[2]
        rows = slice(names["fc_offset"], names["fc_offset"] + (2 * d_ff if cfg.ffn == "swiglu" else d_ff))
        w = sd[names["fc"] + ".weight"][rows]                              # (fc_in, C)
        gain = sd[names["norm"] + ".weight"]                               # (C,)
        b = sd[names["fc"] + ".bias"][rows] if cfg.bias else None
        if cfg.bias and names["norm"] + ".bias" in sd:                     # LayerNorm's shift: W beta joins the bias
            shift = w.double() @ sd[names["norm"] + ".bias"].double()      # in float64, then rounded: the same
            b = b + shift.to(b.dtype)                                      # bytes whatever the CPU's SIMD
        w = w * gain[None, :]                                              # W diag(gamma)
        half = d_ff if cfg.ffn == "swiglu" else w.size(0)
        gates.append(w[:half]), ups.append(w[half:])
        if b is not None:
            fc_bias_g.append(b[:half]), fc_bias_u.append(b[half:])
            proj_bias = proj_bias + sd[names["proj"] + ".bias"]
        projs.append(sd[names["proj"] + ".weight"])                         # (C, d_ff_j)
    out = {prefix + "ln.weight": torch.ones(cfg.n_embd), prefix + "mlp.fc.weight": torch.cat(gates + ups),
           prefix + "mlp.proj.weight": torch.cat(projs, dim=1)}
    if cfg.bias:
        out |= {prefix + "mlp.fc.bias": torch.cat(fc_bias_g + fc_bias_u), prefix + "mlp.proj.bias": proj_bias}
        if cfg.norm == "layernorm":
            out[prefix + "ln.bias"] = torch.zeros(cfg.n_embd)
    return out


def parallel_blocks(model: TransformerLM, runs: list[tuple[int, int]]) -> TransformerLM:
    """FFN Fusion's block parallelism (docs/methods.md#ffn-fusion): each run [a, b] of whole layers,
    attention kept, computes x + sum_j (block_j(x) - x), j = a..b: every layer of the run reads the
    run's input. The weights are the source's; only the config's parallel_runs changes."""
    new = TransformerLM(replace(model.cfg, parallel_runs=[list(r) for r in runs])).to(next(model.parameters()).device)
    new.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    return new.eval()


FUSIONS = {"ffn": fuse_ffns, "block-parallel": parallel_blocks}     # FfnFusion.mode -> its transform


@torch.no_grad()
def mean_loss(model: TransformerLM, batches: list[Batch]) -> float:
    return sum(lm_loss(model(x), y).item() for x, y in batches) / len(batches)


def search_runs(model: TransformerLM, batches: list[Batch], max_loss_increase: float,
                mode: str = "ffn") -> tuple[list, list[dict]]:
    """Greedy FFN Fusion search on calibration batches: repeatedly add the run that removes the most
    layers (then: the smallest loss increase) while the loss stays within max_loss_increase of the
    source's. Mode ffn tries runs of FFN-only layers only; block-parallel, any run. Returns (runs, every
    candidate measured: {runs, loss_increase})."""
    base, chosen, measured = mean_loss(model, batches), [], []
    fusable = [mode != "ffn" or not model.cfg.layer_widths(i)[0] for i in range(model.cfg.n_layer)]
    while True:
        used = {j for a, b in chosen for j in range(a, b + 1)}
        best = None
        for a in range(model.cfg.n_layer):
            for b in range(a + 1, model.cfg.n_layer):
                if used & set(range(a, b + 1)) or not all(fusable[a:b + 1]):
                    continue
                runs = sorted(chosen + [(a, b)])
                increase = mean_loss(FUSIONS[mode](model, runs), batches) - base
                measured.append({"runs": [list(r) for r in runs], "loss_increase": round(increase, 6)})
                if increase <= max_loss_increase and (best is None or (a - b, increase) < (best[0] - best[1], best[2])):
                    best = (a, b, increase)
        if best is None:
            return chosen, measured
        chosen = sorted(chosen + [best[:2]])
