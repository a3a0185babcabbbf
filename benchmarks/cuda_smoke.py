"""CUDA smoke check of every training recipe's pieces on a GPU machine (a check, not a test: CI has no GPU):
the MoE's grouped-matmul dispatch against its loop (fp32, bf16), pretrain (LitLM, bf16-mixed), BAM upcycle + mix (and its KV cache), KD (LitDistill with a hidden-state
term), Taylor pruning + KD recovery, the FFN Fusion search, int8 inference. Synthetic tokens; each
training must lower the validation loss on the GPU. Without a GPU it is a dry run on the CPU.

    PYTHONPATH=. python benchmarks/cuda_smoke.py /tmp/cuda-smoke     # writes report.json there
"""
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import lightning.pytorch as L

from components.config import ModelConfig
from components.model import TransformerLM
from components.lit import LitLM, LMDataModule, TrainingCurve, make_trainer
from components.distill import LitDistill
from components.params import Bam, TrainParams
from components.upcycle import upcycle_state_dict
from components import compress

DEV = "cuda" if torch.cuda.is_available() else "cpu"       # cpu: a dry run of this script
PRECISION = "bf16-mixed" if DEV == "cuda" else "32-true"
out = Path(sys.argv[1])
prep = out / "prepared"
prep.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
V = 512
# a learnable stream: a repeated random "vocabulary" of 64-token phrases
phrases = rng.integers(0, V, size=(200, 64))
stream = phrases[rng.integers(0, 200, size=4000)].ravel().astype(np.uint16)
split = len(stream) * 9 // 10
stream[:split].tofile(prep / "train.bin")
stream[split:].tofile(prep / "val.bin")
(prep / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": V, "train_tokens": split,
                                            "val_tokens": len(stream) - split}))
val = np.memmap(prep / "val.bin", dtype=np.uint16, mode="r")
report = {}


def fit(name, lit, steps, precision=PRECISION):
    train = TrainParams(max_steps=steps, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_every=10,
                        ckpt_every=10, precision=precision, deterministic="warn")
    lit.train_params = train
    curve = TrainingCurve(val, 64, 16, 2, 10, steps)
    data = LMDataModule(prep, 64, 16, 1337)
    trainer = make_trainer(train, out / "ckpt" / name, [curve], False)
    t0 = time.perf_counter()
    trainer.fit(lit, datamodule=data)
    dev = trainer.strategy.root_device                          # (Lightning moves the module back to cpu after fit)
    report[name] = {"device": str(dev), "first_val": curve.rows[0]["val_loss"], "last_val": curve.rows[-1]["val_loss"],
                    "seconds": round(time.perf_counter() - t0, 2)}
    print(name, report[name], flush=True)
    assert dev.type == DEV, dev
    assert curve.rows[-1]["val_loss"] < curve.rows[0]["val_loss"], curve.rows
    return lit.model


# MoE dispatch: grouped matmuls (archflow's choice on a GPU) against the loop over experts, fp32 and bf16
from components import model as model_mod                    # noqa: E402
L.seed_everything(0)
moe_model = TransformerLM(ModelConfig(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=128, block="parallel",
                                      ffn="swiglu", n_expert=4, top_k=2)).to(DEV)
tokens = torch.randint(0, V, (8, 64), device=DEV)
model_mod.GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16)   # fp32 too, for this check (torch's own loop)
for precision in ("fp32", "bf16"):
    got = {}
    for dispatch, devices in (("grouped", (DEV,)), ("loop", ())):
        model_mod.GROUPED_MM_DEVICES = devices
        moe_model.zero_grad()
        with torch.profiler.profile() as prof:                # which kernels, how many copies to the host
            with torch.autocast(DEV, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = moe_model(tokens)
            logits.float().square().mean().backward()
        names = [e.name for e in prof.events()]
        report[f"moe_{dispatch}_{precision}"] = {
            "device_to_host_copies": sum("DtoH" in n for n in names),
            "grouped_kernels": sorted({n[:80] for n in names if "group" in n.lower() or "cutlass" in n.lower()})[:6]}
        got[dispatch] = (logits.float(), moe_model.blocks[0].mlp.experts[1].fc.weight.grad.clone())
    diffs = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got["grouped"], got["loop"])]
    report[f"moe_grouped_vs_loop_{precision}_rel_diff"] = {"logits": diffs[0], "expert_grad": diffs[1]}
    print(precision, "grouped vs loop, relative max diff (logits, an expert's grad):", diffs,
          {k: v for k, v in report.items() if k.endswith(precision)}, flush=True)
    assert max(diffs) < (1e-4 if precision == "fp32" else 5e-2), diffs
model_mod.GROUPED_MM_DEVICES, model_mod.GROUPED_MM_DTYPES = ("cuda",), (torch.bfloat16,)
report["grouped_mm"] = model_mod.GROUPED_MM

L.seed_everything(0)
cfg = ModelConfig(vocab_size=V, block_size=64, n_layer=4, n_head=4, n_embd=128, block="parallel", ffn="swiglu",
                  norm="rmsnorm", pos="rope")
dense = fit("pretrain-parallel", LitLM(cfg, TrainParams()), 60)

# BAM: two "branches" = the dense model and a noisy copy
bam_cfg = dataclasses.replace(dense.cfg, **Bam(parent="p", method="bam").config_fields(2))
sd = dense.cpu().state_dict()
noisy = {k: v + 0.01 * torch.randn_like(v) if v.dim() == 2 else v for k, v in sd.items()}
bam = TransformerLM(bam_cfg)
bam.load_state_dict(upcycle_state_dict(bam_cfg, dense.cfg, [sd, noisy], [0, 1], 0))
bam = fit("upcycle-bam", LitLM(bam_cfg, TrainParams(), model=bam), 30).to(DEV)
x = torch.from_numpy(np.asarray(val[:48], dtype=np.int64))[None].to(DEV)
with torch.no_grad():
    bam.eval()
    full = bam(x)
    cache = bam.new_cache(1, 48)
    inc = torch.cat([bam(x[:, :32], cache), *[bam(x[:, t:t + 1], cache) for t in range(32, 48)]], 1)
report["bam_cache_max_abs_diff"] = (full - inc).abs().max().item()

# KD into a 1-layer student, the teacher on the GPU
student = TransformerLM(ModelConfig(**{**dense.cfg.to_dict(), "n_layer": 1}))
fit("distill", LitDistill(student, copy.deepcopy(dense).to(DEV), TrainParams(), alpha=0.5, temperature=2.0, hidden_weight=0.5), 30)

# prune 30% with the Taylor criterion on GPU batches, then KD recovery from the source
calib = [(torch.from_numpy(np.asarray(val[i:i + 65], dtype=np.int64))[None, :-1].to(DEV),
          torch.from_numpy(np.asarray(val[i:i + 65], dtype=np.int64))[None, 1:].to(DEV)) for i in range(0, 640, 65)]
pruned = compress.prune(dense.to(DEV), *compress.keep_by_score(compress.importance(dense.to(DEV), "taylor", calib), 0.3))
report["pruned_params"] = [dense.num_params(), pruned.num_params()]
print("pruned widths", pruned.cfg.layer_n_head, pruned.cfg.layer_n_kv_head, pruned.cfg.layer_d_ff, flush=True)
fit("prune-recover", LitDistill(pruned, copy.deepcopy(dense).to(DEV), TrainParams()), 20)

# attention removal and FFN fusion searches on the GPU, then int8 inference on the GPU
dropped = compress.drop_attention(dense.to(DEV), compress.search_drops(dense.to(DEV), calib, 0.5)[0])
runs, searched = compress.search_runs(dropped, calib, 0.5)
fused = compress.fuse_ffns(dropped, runs)
report["fusion_runs"] = [list(r) for r in runs]
q = compress.quantize(dense, True).to(DEV)
with torch.no_grad():
    report["int8_vs_fp32_logit_max_abs_diff"] = (q(x) - dense.to(DEV).eval()(x)).abs().max().item()
    report["fused_loss"] = compress.mean_loss(fused.to(DEV), calib)
report["gpu"] = torch.cuda.get_device_name() if DEV == "cuda" else "none (dry run)"
print(json.dumps(report, indent=1))
(out / "report.json").write_text(json.dumps(report, indent=1))
